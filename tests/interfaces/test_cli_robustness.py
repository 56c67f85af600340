"""The command line under real conditions: every file it writes is renamed into place, and awkward paths
(quotes, spaces, unicode, `~`, folders for files and the reverse, unreadable files) work or fail in one
line. Real runs on the tiny shapes dataset (tests.conftest: `tiny`, `reference_run`)."""
import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import error_line, no_temp_files, train_argv

pytestmark = pytest.mark.usefixtures("one_compute_thread")


# ---- every file is written to a temporary name, then renamed ----------------------------------------------

_AUDIT = {"log": None}


def _audit(event, args):
    log = _AUDIT["log"]
    if log is None:
        return
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in mode for c in "wax+")) or \
                 (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            log.append(("write", os.path.abspath(os.fsdecode(args[0]))))
    elif event == "os.rename":
        log.append(("rename", os.path.abspath(os.fsdecode(args[1]))))


def test_every_file_is_written_under_a_temporary_name_then_renamed(tiny, tmp_path, monkeypatch, run_main):
    """Audit every file opened for writing during a real `train` (with a fresh extraction) and `caption
    --attention`: each file that ends up in the workdir or output got there by a rename. The only files
    written in place are the feature arrays, whose rows count only once progress.json (renamed) says so."""
    if not getattr(sys, "_robustness_audit_hook", False):
        sys.addaudithook(_audit)   # audit hooks cannot be removed; it does nothing while _AUDIT["log"] is None
        sys._robustness_audit_hook = True
    real_save, saved = torch.save, []

    def save(obj, f, *args, **kwargs):
        saved.append(os.path.abspath(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    work, out = tmp_path / "work", tmp_path / "out"
    image = sorted((tiny.data / "Images").glob("*.jpg"))[0]
    _AUDIT["log"] = log = []
    try:
        code, _, err = run_main(*train_argv(tiny, work, 2))
        assert code == 0, err
        code, _, err = run_main("caption", image, "--workdir", work, "--device", "cpu", "--attention",
                                "--output", out / "captioned.png")
        assert code == 0, err
    finally:
        _AUDIT["log"] = None

    renamed = {p for kind, p in log if kind == "rename"}
    written = {p for kind, p in log if kind == "write"} | set(saved)
    in_place = {"grid.npy", "pooled.npy"}
    final = [str(p) for d in (work, out) for p in d.rglob("*") if p.is_file()]
    assert any(p.endswith("best.pt") for p in final) and any(p.endswith("captioned.png") for p in final)
    assert any(p.endswith("captioned_attention.png") for p in final)
    for p in final:
        assert p in renamed or Path(p).name in in_place, f"{p} was not renamed into place"
    for p in written:
        if p.startswith(str(tmp_path)) and Path(p).name not in in_place:
            assert Path(p).name.startswith(".") and p.endswith(".tmp"), f"{p} was written under its real name"
    assert no_temp_files(tmp_path) == []
    # Written files get the usual permissions (a temp file's private 0600 must not stick to a PNG).
    umask = os.umask(0)
    os.umask(umask)
    for p in final:
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, p


# ---- awkward paths -------------------------------------------------------------------------------------

@pytest.fixture
def model_workdir(reference_run, tmp_path):
    """A workdir holding only the reference run's models (caption looks there)."""
    work = tmp_path / "work"
    shutil.copytree(reference_run.work / "models", work / "models")
    return work


def test_paths_with_quotes_spaces_unicode_and_tilde_work(tiny, model_workdir, tmp_path, monkeypatch, run_main):
    home = tmp_path / "home"
    folder = home / "my phötos 写真"
    folder.mkdir(parents=True)
    photo = folder / "a 'quoted' pic, #1.jpg"
    shutil.copy(sorted((tiny.data / "Images").glob("*.jpg"))[0], photo)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cases = [(f'"{photo}"', '"out 1.png"'),                          # dragged in: double quotes
             (f"'{photo}'", "'out 2.png'"),                          # single quotes
             ("~/my phötos 写真/a 'quoted' pic, #1.jpg", "~/out 3.png"),  # ~ unexpanded (quoted in the shell)
             (str(photo).replace(" ", "\\ "), "out 4.png")]          # a terminal's backslash-escaped spaces
    for given, output in cases:
        code, out, err = run_main("caption", given, "--workdir", f"'{model_workdir}'", "--output", output,
                                  "--device", "cpu")
        assert code == 0, (given, err)
        assert out.splitlines()[0] == str(photo) and "Traceback" not in err
    for png in (tmp_path / "out 1.png", tmp_path / "out 2.png", home / "out 3.png", tmp_path / "out 4.png"):
        assert png.read_bytes()[:4] == b"\x89PNG", png


def test_wrong_kinds_of_paths_are_one_line_each(tiny, model_workdir, tmp_path, run_main):
    """A folder where a file is expected and the reverse, and missing paths: exit 1 with one line each."""
    image = sorted((tiny.data / "Images").glob("*.jpg"))[0]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    cases = [
        (["caption", image, "--model", a_folder], "got a folder"),
        (["caption", image, "--workdir", a_file], "is a file; it must be a folder"),
        (["caption", image, "--workdir", model_workdir, "--output", a_file / "x.png"], "A file is in the way"),
        (["caption", image, image, "--workdir", model_workdir, "--output", a_file], "A file is in the way"),
        (["caption", tmp_path / "missing.jpg", "--workdir", model_workdir], "Image not found"),
        (["caption", image, "--model", tmp_path / "missing.pt"], "Model file not found"),
        (["train", "--data", a_file, "--workdir", tmp_path / "w"], "not an annotation file of a known layout"),
        (["train", "--data", tmp_path / "missing", "--workdir", tmp_path / "w"], "does not exist"),
        (["evaluate", "--data", a_folder, "--workdir", model_workdir], "No captioning dataset found"),
        (["train", *train_argv(tiny, tmp_path / "w", 1)[1:], "--encoder-weights", a_folder], "folder"),
    ]
    for argv, expected in cases:
        code, out, err = run_main(*argv, "--device", "cpu")
        assert code == 1, (argv, err)
        line = error_line(err)
        assert expected in line and "unexpected" not in line, (argv, line)
        assert out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="runs as root: chmod 000 does not stop root from reading, so this "
                    "case is only checked with the permission error simulated (next test)")
def test_unreadable_files_for_real(tiny, model_workdir, tmp_path, run_main):
    image = tmp_path / "locked.jpg"
    shutil.copy(sorted((tiny.data / "Images").glob("*.jpg"))[0], image)
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    image.chmod(0)
    (data / "captions.json").chmod(0)
    try:
        code, _, err = run_main("caption", image, "--workdir", model_workdir, "--device", "cpu")
        assert code == 1 and "No permission to read image" in error_line(err)
        code, _, err = run_main("train", "--data", data, "--workdir", tmp_path / "w")
        assert code == 1 and "Permission denied" in error_line(err)
    finally:
        image.chmod(0o644)
        (data / "captions.json").chmod(0o644)


def test_unreadable_files_simulated(tiny, model_workdir, tmp_path, monkeypatch, run_main):
    """The same as the real test above, with the operating system's refusal simulated (tests run as root)."""
    import PIL.Image

    from captioning.data import annotations
    image = sorted((tiny.data / "Images").glob("*.jpg"))[0]

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        code, _, err = run_main("caption", image, "--workdir", model_workdir, "--device", "cpu")
    assert code == 1 and "No permission to read image" in error_line(err)

    with monkeypatch.context() as m:
        m.setattr(annotations, "open", refuse, raising=False)       # the annotation file
        code, _, err = run_main("train", "--data", tiny.data, "--workdir", tmp_path / "w")
    assert code == 1 and "Permission denied" in error_line(err) and "captions.json" in err

    with monkeypatch.context() as m:
        m.setattr(os, "listdir", refuse)                            # the dataset folder itself
        code, _, err = run_main("train", "--data", tiny.data, "--workdir", tmp_path / "w")
    assert code == 1 and "Permission denied" in error_line(err)

    from captioning.results import render
    with monkeypatch.context() as m:                                # an output folder the user cannot write to
        m.setattr(render, "atomic_write", refuse)
        code, _, err = run_main("caption", image, "--workdir", model_workdir, "--device", "cpu",
                                "--output", tmp_path / "locked" / "x.png")
    line = error_line(err)
    assert code == 1 and "No permission" in line and "unexpected" not in line



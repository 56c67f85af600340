"""The command line as users script it: exit codes, one-line errors, outputs. Mostly through the real entry
script in a subprocess (tests.conftest.cli); the download, --debug and no-model checks run main() in-process
(tests.conftest.run_main) so that kagglehub, the commands and the built-in model's path can be patched."""
import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from captioning.training import checkpoint
from captioning.interfaces import cli as cli_module
from captioning.utils import CaptioningError
from tests.helpers import ROOT, cli, error_line

TORCH_IMPORTED = re.compile(r"\|\s+torch(\.|$)", re.MULTILINE)  # a `-X importtime` line for torch or a submodule


@pytest.fixture
def no_builtin_model(monkeypatch, tmp_path):
    """This repository ships a built-in model, which answers whenever a workdir has none: point its path at
    a file that does not exist, as in an installation without it."""
    monkeypatch.setattr(checkpoint, "BUILTIN", tmp_path / "no-builtin-model.pt")


def shapes_images(shapes_data, n):
    return sorted((shapes_data / "Images").glob("*.jpg"))[:n]


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- help and usage errors (no torch, no model) --------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["caption", "--help"], ["train", "--help"]])
def test_help_is_quick_and_does_not_import_torch(args):
    start = time.perf_counter()
    r = cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})  # the import profile goes to stderr
    elapsed = time.perf_counter() - start
    assert r.returncode == 0
    assert "usage:" in r.stdout
    assert not TORCH_IMPORTED.search(r.stderr)
    assert elapsed < 5  # "well under a second" on an idle machine; generous for a shared one


def test_parser_does_not_import_torch():
    code = "import sys; from captioning.interfaces.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("args", [
    ["bogus"],
    ["train", "--data", "d", "--epochs", "0"],
    ["train", "--data", "d", "--epochs", "-3"],
    ["train", "--data", "d", "--batch-size", "abc"],
    ["train"],                                          # --data is required
    ["extract"],
    ["evaluate", "--data", "d", "--split", "holdout"],
    ["caption"],                                        # no image
    ["caption", "x.jpg", "--beam-size", "0"],
    ["caption", "x.jpg", "--device", "tpu"],
])
def test_usage_errors_exit_2(args, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "usage:" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_common_options_work_before_and_after_the_command(tmp_path, no_builtin_model, run_main):
    # argparse subparsers used to overwrite options given before the command with their defaults.
    args = cli_module.build_parser().parse_args(["--workdir", "w", "--seed", "3", "--device", "cpu", "--debug",
                                                 "download"])
    assert (args.workdir, args.seed, args.device, args.debug) == ("w", 3, "cpu", True)
    args = cli_module.build_parser().parse_args(["download", "--workdir", "w", "--seed", "3"])
    assert (args.workdir, args.seed, args.device, args.debug) == ("w", 3, "auto", False)

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["--workdir", empty, "caption", image], ["caption", image, "--workdir", empty]):
        code, out, err = run_main(*args)
        assert code == 1 and out == ""
        assert str(empty / "models") in error_line(err)


# ---- caption: failures before any model is loaded ------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "empty_folder"])
def test_caption_bad_input_is_one_line(tmp_path, kind):
    if kind == "missing":
        target, expected = tmp_path / "nowhere.jpg", "not found"
    else:
        target, expected = tmp_path / "folder", "No images"
        target.mkdir()
        (target / "notes.txt").write_text("no pictures here")
    r = cli("caption", target, cwd=tmp_path)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert expected in line and str(target) in line
    assert r.stdout == ""


def test_caption_without_a_model_says_how_to_train(tmp_path, no_builtin_model, run_main):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    (tmp_path / "work").mkdir()
    # No model of the user's, and no built-in one to fall back on or to ask for by name.
    for model, expected in (([], "No trained model"), (["--model", "default"], "no built-in model")):
        code, out, err = run_main("caption", image, "--workdir", tmp_path / "work", *model)
        assert code == 1 and out == ""
        line = error_line(err)
        assert expected in line and "train --data" in line


# ---- caption with a trained model ----------------------------------------------------------------------

def test_caption_one_image(attention_model, shapes_data, tmp_path):
    _, ckpt = attention_model
    # '[' in a file name is rich markup; the printed result must keep it as it is.
    image = tmp_path / "photo [draft].jpg"
    shutil.copy(shapes_images(shapes_data, 1)[0], image)
    r = cli("caption", image.name, "--model", ckpt, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert is_png(tmp_path / "captioned_image.png")
    lines = r.stdout.splitlines()
    assert lines[0] == image.name
    caption = lines[1].strip()
    assert len(caption.split()) >= 2 and "<" not in caption
    assert lines[2].strip() == "saved captioned_image.png"
    assert "Traceback" not in r.stderr


def test_caption_output_path_attention_and_greedy(attention_model, shapes_data, tmp_path):
    _, ckpt = attention_model
    out = tmp_path / "results" / "mine.png"
    r = cli("caption", shapes_images(shapes_data, 1)[0], "--model", ckpt, "--output", out, "--attention",
            "--beam-size", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert is_png(out)
    assert is_png(out.with_name("mine_attention.png"))
    assert not (tmp_path / "captioned_image.png").exists()


def test_caption_folder_as_json_with_several_captions(attention_model, shapes_data, tmp_path):
    _, ckpt = attention_model
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in shapes_images(shapes_data, 3):
        shutil.copy(p, folder)
    out = tmp_path / "annotated"
    r = cli("caption", folder, "--model", ckpt, "--json", "--num-captions", "3", "--output", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)  # stdout is one JSON document and nothing else
    assert isinstance(results, list) and len(results) == 3
    assert sorted(res["image"] for res in results) == sorted(str(p) for p in folder.iterdir())
    for res in results:
        assert isinstance(res["caption"], str) and res["caption"]
        assert len(res["captions"]) == 3 and len(set(res["captions"])) == 3
        assert res["captions"][0] == res["caption"]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and all(is_png(p) for p in pngs)


def test_caption_text_file_named_jpg(attention_model, tmp_path):
    _, ckpt = attention_model
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a picture\n")
    r = cli("caption", fake, "--model", ckpt, cwd=tmp_path)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert "Not an image" in line and "photo.jpg" in line
    assert not (tmp_path / "captioned_image.png").exists()


# ---- evaluate ------------------------------------------------------------------------------------------

def test_evaluate_writes_report(attention_model, shapes_data, tmp_path):
    workdir, ckpt = attention_model  # its workdir holds the feature cache from training: nothing to extract
    report = tmp_path / "report.json"
    r = cli("evaluate", "--data", shapes_data, "--model", ckpt, "--workdir", workdir, "--beam-size", "1",
            "--output", report, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scores = json.loads(report.read_text())["scores"]
    assert 0 <= scores["BLEU-4"] <= 1 and scores["CIDEr-D"] > 0


# ---- bad model files -----------------------------------------------------------------------------------

def write_random_bytes(path, seed):
    path.write_bytes(random.Random(seed).randbytes(4096))
    return path


def test_corrupt_checkpoint_is_refused(attention_model, tmp_path):
    _, ckpt = attention_model
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    for bad in (write_random_bytes(tmp_path / "random.pt", seed=0), truncated):
        r = cli("caption", image, "--model", bad, cwd=tmp_path)
        assert r.returncode == 1
        line = error_line(r.stderr)
        assert bad.name in line and "unexpected" not in line


@pytest.mark.parametrize("seed", [2, 20])
def test_every_garbage_checkpoint_gets_a_clear_message(tmp_path, capsys, seed):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    bad = write_random_bytes(tmp_path / "garbage.pt", seed)
    code = cli_module.main(["caption", str(image), "--model", str(bad), "--output", str(tmp_path / "out.png")])
    assert code == 1
    line = error_line(capsys.readouterr().err)
    assert bad.name in line and "unexpected" not in line


class RunsCode:
    """A pickle that runs a shell command when loaded the unsafe way."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        import os
        return (os.system, (f"touch '{self.mark}'",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    import torch
    mark = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "image-captioning", "version": 1, "payload": RunsCode(mark)}, evil)
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    r = cli("caption", image, "--model", evil, cwd=tmp_path)
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert "Refusing" in line and "evil.pt" in line
    assert not mark.exists()


# ---- in-process: download with kagglehub patched, --debug ---------------------------------------------

@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    """Replace kagglehub.dataset_download with `fn(handle, force_download)`; no test touches the network."""
    import kagglehub
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle-cache"))  # empty: no cached copy to fall back on
    calls = []

    def patch(fn):
        def fake(handle, path=None, *, force_download=False, output_dir=None):
            calls.append((handle, force_download))
            return fn(handle, force_download)
        monkeypatch.setattr(kagglehub, "dataset_download", fake)
        return calls
    return patch


def test_download_command_success(tmp_path, kaggle, run_main):
    from captioning.data.synthetic import make_shapes_dataset
    folder = make_shapes_dataset(tmp_path / "versions" / "1", n_images=6, size=32)
    calls = kaggle(lambda handle, force: str(folder))
    code, out, err = run_main("download", "--dataset", "flickr8k", "--force")
    assert code == 0, err
    assert out.strip() == str(folder)  # stdout: the folder alone, for scripts
    assert "Dataset ready" in err
    assert calls == [("adityajn105/flickr8k", True)]


def test_download_command_offline(kaggle, run_main):
    import requests

    def offline(handle, force):
        raise requests.exceptions.ConnectionError("Max retries exceeded with url: /api/v1/datasets")
    kaggle(offline)
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == ""
    line = error_line(err)
    assert "internet connection" in line and "adityajn105/flickr8k" in line


def test_download_command_http_error(kaggle, run_main):
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    def refuse(handle, force):
        response = requests.Response()
        response.status_code = 403
        raise KaggleApiHTTPError("403 Client Error.\n\nForbidden", response=response)
    kaggle(refuse)
    code, out, err = run_main("download")
    assert code == 1 and out == ""
    assert "403" in error_line(err)


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch, run_main):
    def broken(args):
        raise RuntimeError("boom\nsecond line of detail")
    monkeypatch.setitem(cli_module.COMMANDS, "download", broken)

    code, out, err = run_main("download")
    assert code == 1 and out == ""
    line = error_line(err)
    assert "RuntimeError: boom" in line and "--debug" in line and "second line" not in line

    for argv in (["--debug", "download"], ["download", "--debug"]):
        code, out, err = run_main(*argv)
        assert code == 1
        assert "Traceback" in err and "boom" in err


def test_captioning_error_is_one_line_without_unexpected(monkeypatch, run_main):
    def fails(args):
        raise CaptioningError("Something the user can fix.")
    monkeypatch.setitem(cli_module.COMMANDS, "download", fails)
    code, _, err = run_main("download")
    assert code == 1
    assert error_line(err) == "error: Something the user can fix."


@pytest.mark.parametrize("error", [CaptioningError("A thing the user can fix."), OSError(errno.ENOSPC, "No space"),
                                   KeyError("x")])
def test_debug_shows_the_traceback_and_nothing_else_does(monkeypatch, run_main, error):
    def fails(args):
        raise error
    monkeypatch.setitem(cli_module.COMMANDS, "download", fails)
    code, out, err = run_main("download")
    assert code == 1 and out == ""
    error_line(err)
    code, out, err = run_main("download", "--debug")
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("damaged", ["model", "encoder weights"])
def test_debug_shows_what_really_went_wrong_behind_a_clear_error(tmp_path, run_main, damaged):
    """A clear error keeps the exception it was raised from: without --debug the same one line as ever;
    with --debug the real failure (torch.load's, on a damaged file) and then that line."""
    import torch
    from captioning.data.synthetic import make_shapes_dataset
    garbage = write_random_bytes(tmp_path / "garbage.pt", seed=2)
    try:
        torch.load(garbage, weights_only=True)
        pytest.fail("these random bytes loaded")
    except Exception as e:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:40]   # e.g. "IndexError: pop from empty list"
    if damaged == "model":
        image = tmp_path / "photo.jpg"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
        argv = ["caption", image, "--model", garbage, "--output", tmp_path / "out.png"]
    else:
        data = make_shapes_dataset(tmp_path / "data", n_images=6, size=32)
        argv = ["extract", "--data", data, "--workdir", tmp_path / "work", "--device", "cpu", "--encoder",
                "resnet18", "--encoder-weights", garbage]
    code, out, err = run_main(*argv)
    assert code == 1 and out == ""
    line = error_line(err)
    assert cause not in line
    code, out, err = run_main(*argv, "--debug")
    assert code == 1
    assert cause in err and "The above exception was the direct cause of the following exception" in err
    assert err.rstrip().splitlines()[-1] == line


# ---- leaving the process ------------------------------------------------------------------------------

EXIT_SCRIPT = """
import atexit, sys, threading, time
import torch
from captioning.utils import exit_process
atexit.register(lambda: print("exit hook ran"))
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
print("x" * 200000)
exit_process(3)
"""


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_exit_process_flushes_runs_exit_hooks_and_waits_for_threads(case):
    """The fast exit after a command keeps everything a normal exit does that a user could see: the whole
    of stdout (a pipe here, so block-buffered), the exit code, libraries' exit hooks, running threads."""
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, case], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "x" * 200000 and "exit hook ran" in lines
    assert ("thread finished" in lines) == (case == "thread")

"""Never a traceback, never lost work (issue 4): processes killed at random moments, Ctrl-C at prompts and
during work, awkward paths, broken downloads, exhausted resources, and files that are only ever renamed
into place.

Everything runs on a tiny synthetic shapes dataset with a randomly initialised ResNet-18, given to the CLI
as a local weights file (`--encoder-weights`), so the real entry script runs offline. Subprocesses use one
compute thread so that a run and its resumed twin compute in the same order. What other test files cover
(odd and broken images, bad checkpoint files, usage errors, menu re-prompting, loader errors, in-process
Ctrl-C in training and extraction) is not repeated here.
"""
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from captioning import cli as cli_module
from captioning import menu
from captioning.checkpoint import load_checkpoint
from captioning.synthetic import make_shapes_dataset
from captioning.utils import CaptioningError
from tests.conftest import ROOT

ENTRY = ROOT / "image_captioning.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_IMAGES = 32
EPOCHS = 4


# ---- helpers -------------------------------------------------------------------------------------------

class Proc:
    """A running command whose stdout and stderr are collected as they arrive (prompts need no newline)."""

    def __init__(self, argv, cwd, stdin=False):
        self.p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=ENV,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out, self._err = bytearray(), bytearray()
        self._pumps = [threading.Thread(target=self._pump, args=(f, buf), daemon=True)
                       for f, buf in ((self.p.stdout, self._out), (self.p.stderr, self._err))]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(f, buf):
        while chunk := os.read(f.fileno(), 65536):
            buf += chunk

    @property
    def out(self):
        return self._out.decode("utf-8", "replace")

    @property
    def err(self):
        return self._err.decode("utf-8", "replace")

    def wait_for(self, condition, timeout=120, what="the expected output"):
        end = time.monotonic() + timeout
        while not condition():
            if self.p.poll() is not None:
                time.sleep(0.05)  # let the pumps drain the pipes
                if condition():
                    return
                pytest.fail(f"the process ended (rc {self.p.returncode}) before {what}:\n{self.out}\n{self.err}")
            if time.monotonic() > end:
                self.p.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.out}\n{self.err}")
            time.sleep(0.01)

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def finish(self, timeout=300):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        for t in self._pumps:
            t.join(5)
        return rc


def error_line(text):
    """The failure message: exactly one non-blank line, starting 'error:', and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return lines[0]


def the_error(text):
    """The one error line among a command's progress messages; no traceback anywhere."""
    assert "Traceback" not in text and "Exception ignored" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def no_temp_files(folder):
    return sorted(str(p) for p in Path(folder).rglob("*.tmp"))


def train_argv(tiny, workdir, epochs, *extra):
    return ["train", "--data", tiny.data, "--workdir", workdir, "--device", "cpu", "--encoder", "resnet18",
            "--encoder-weights", tiny.weights, "--extract-batch-size", "4", "--epochs", str(epochs),
            "--batch-size", "8", "--decoder", "attention", "--embed-dim", "16", "--hidden-dim", "32",
            "--attention-dim", "16", "--context-dim", "16", "--dropout", "0.2", "--min-count", "1",
            "--patience", "50", "--lr", "0.003", *map(str, extra)]


def copy_cache(src, dst):
    shutil.copytree(Path(src) / "cache", Path(dst) / "cache")
    return Path(dst)


@pytest.fixture(scope="module", autouse=True)
def one_compute_thread():
    """In-process runs use one thread too: on two busy cores, two threads per op are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """32 small shape images and a random-init ResNet-18 saved as a local weights file."""
    import torchvision
    root = tmp_path_factory.mktemp("robust")
    data = make_shapes_dataset(root / "data", n_images=N_IMAGES, size=64, seed=1)
    weights = root / "resnet18-random.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return SimpleNamespace(root=root, data=data, weights=weights)


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted CLI training run of EPOCHS epochs (it extracts the features first).
    Returns its workdir and how long its epochs took (to aim the kills)."""
    work = tiny.root / "reference"
    run = Proc([ENTRY, *train_argv(tiny, work, EPOCHS)], cwd=tiny.root)
    run.wait_for(lambda: "Training the" in run.err, what="training to start")
    t0 = time.monotonic()
    run.wait_for(lambda: f"epoch {EPOCHS}:" in run.err, what="the last epoch")
    seconds = time.monotonic() - t0
    assert run.finish() == 0, run.err
    assert "Traceback" not in run.err
    return SimpleNamespace(work=work, train_seconds=seconds, last=torch.load(work / "models" / "last.pt",
                                                                             weights_only=True))


@pytest.fixture
def run_main(monkeypatch, capsys):
    """cli.main(argv) in this process → (exit code, stdout, stderr)."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # main() sets it when unset

    def run(*argv):
        code = cli_module.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


# ---- killed at random moments: nothing lost --------------------------------------------------------------

def test_training_killed_at_random_moments_resumes_to_the_same_result(tiny, reference, tmp_path, run_main):
    """SIGKILL twice at random moments of real CLI training runs: after each kill the last checkpoint loads
    (weights_only) and never goes back; `--resume` then finishes with the uninterrupted run's result."""
    work = copy_cache(reference.work, tmp_path / "killed")
    last = work / "models" / "last.pt"
    rng, log, seen = random.Random(), [], 0
    for _ in range(2):
        resume = last.exists()
        run = Proc([ENTRY, *train_argv(tiny, work, EPOCHS, *(["--resume"] if resume else []))], cwd=tmp_path)
        run.wait_for(lambda: "Training the" in run.err, what="training to start")
        delay = rng.uniform(0, reference.train_seconds)
        time.sleep(delay)
        run.p.send_signal(signal.SIGKILL)
        run.finish()
        epoch = None
        if last.exists():
            ckpt = torch.load(last, weights_only=True)   # a kill never leaves a half-written checkpoint
            load_checkpoint(last)                       # ... and it passes the tool's own checks
            epoch = ckpt["epoch"]
            assert [h["epoch"] for h in ckpt["history"]] == list(range(1, epoch + 1))
            assert epoch >= seen, log
            seen = epoch
            if (work / "models" / "best.pt").exists():
                load_checkpoint(work / "models" / "best.pt")
        log.append(f"resume={resume} killed after {delay:.2f}s of training, last.pt at epoch {epoch}")

    code, _, err = run_main(*train_argv(tiny, work, EPOCHS, *(["--resume"] if last.exists() else [])))
    assert code == 0, (log, err)

    a, b = reference.last, torch.load(last, weights_only=True)
    assert [h["epoch"] for h in b["history"]] == list(range(1, EPOCHS + 1)), log
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("train_loss", "val_loss", "CIDEr-D", "BLEU-4", "lr"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (key, ha["epoch"], log)
    for k in a["decoder_state"]:
        assert torch.allclose(a["decoder_state"][k], b["decoder_state"][k], rtol=1e-4, atol=1e-5), (k, log)
    # A kill can orphan a hidden temp file, never a half file under a real name; a finished run leaves none.
    assert all(Path(p).name.startswith(".") for p in no_temp_files(work)), no_temp_files(work)
    assert no_temp_files(reference.work) == []


EXTRACT_DRIVER = '''
"""The `extract` command with the cache's flush interval (argv[1]) set: 0 records every batch at once."""
import dataclasses, sys
from captioning import cli

flush, argv = float(sys.argv[1]), sys.argv[2:]
config = cli._extract_config
cli._extract_config = lambda args: dataclasses.replace(config(args), flush_every_s=flush)
sys.exit(cli.main(argv))
'''


class CountingTrunk(torch.nn.Module):
    """Counts the images a trunk encodes (all-zero inputs are shape probes, not images)."""

    def __init__(self, inner, counts):
        super().__init__()
        self.inner, self.counts = inner, counts

    def forward(self, x):
        self.counts.append(int((x.flatten(1).abs().sum(1) > 0).sum()))
        return self.inner(x)


def test_extraction_interrupted_then_killed_resumes_to_an_identical_cache(tiny, reference, tmp_path, monkeypatch,
                                                                          run_main):
    """Ctrl-C, then SIGKILL at a random moment, during `extract`: the first is one calm line, neither loses a
    finished row, and the next run encodes only the rest and ends with the uninterrupted run's exact cache."""
    driver = tmp_path / "extract_driver.py"
    driver.write_text(EXTRACT_DRIVER)
    work = tmp_path / "work"
    argv = ["extract", "--data", tiny.data, "--workdir", work, "--device", "cpu", "--encoder", "resnet18",
            "--encoder-weights", tiny.weights, "--batch-size", "4"]

    def progress():
        found = list((work / "cache").glob("*/progress.json"))
        return json.loads(found[0].read_text()) if found else {}

    # Ctrl-C once some rows are recorded.
    a = Proc([driver, "0", *argv], cwd=tmp_path)
    a.wait_for(lambda: progress().get("done", 0) >= 4, what="the first recorded rows")
    a.p.send_signal(signal.SIGINT)
    assert a.finish() == 1
    assert "Interrupted" in a.err and "Traceback" not in a.err + a.out, a.err
    first = progress()["done"]
    assert 4 <= first < N_IMAGES and not progress()["complete"]

    # SIGKILL a little after the next recorded rows (decoding inline this time).
    b = Proc([driver, "0", *argv, "--workers", "0"], cwd=tmp_path)
    b.wait_for(lambda: progress().get("done", 0) > first, what="more recorded rows")
    time.sleep(random.uniform(0, 0.3))
    b.p.send_signal(signal.SIGKILL)
    b.finish()
    killed = progress()["done"]          # progress.json is whole: it is only ever replaced atomically
    assert killed > first

    from captioning import features
    build, encoded = features.build_encoder, []

    def counting_build(spec):
        trunk, transform = build(spec)
        return CountingTrunk(trunk, encoded), transform

    monkeypatch.setattr(features, "build_encoder", counting_build)
    code, _, err = run_main(*argv)
    assert code == 0, err
    assert sum(encoded) == N_IMAGES - killed           # the finished rows were reused, not encoded again
    assert progress()["complete"] and progress()["bad"] == []

    [ref] = [p for p in (reference.work / "cache").iterdir() if p.is_dir()]
    [got] = [p for p in (work / "cache").iterdir() if p.is_dir()]
    assert got.name == ref.name
    for name in ("grid.npy", "pooled.npy"):
        assert np.array_equal(np.load(got / name), np.load(ref / name)), name
    assert json.loads((got / "images.json").read_text()) == json.loads((ref / "images.json").read_text())
    assert all(Path(p).name.startswith(".") for p in no_temp_files(work))


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the tool may catch it."""


def test_a_kill_between_saving_last_and_best_keeps_the_best_model(tiny, reference, tmp_path, monkeypatch,
                                                                  run_main):
    """Killed right after an epoch's last.pt but before its best.pt: once resumed, best.pt must still be
    the epoch that the history calls best (else the best model is silently an older one)."""
    import captioning.train as train_module
    work = copy_cache(reference.work, tmp_path / "w")
    real_save, killed_at = train_module.save_checkpoint, []

    def save(path, ckpt):
        if Path(path).name == "best.pt" and ckpt["epoch"] >= 2:
            killed_at.append(ckpt["epoch"])
            raise Killed
        return real_save(path, ckpt)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    with pytest.raises(Killed):
        run_main(*train_argv(tiny, work, EPOCHS))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    [epoch] = killed_at
    code, _, err = run_main(*train_argv(tiny, work, epoch, "--resume"))
    assert code == 0, err
    history = torch.load(work / "models" / "last.pt", weights_only=True)["history"]
    best_epoch = max(h["epoch"] for h in history if h["best"])
    assert torch.load(work / "models" / "best.pt", weights_only=True)["epoch"] == best_epoch


def test_the_lstm_decoder_trains_through_the_cli(tiny, reference, tmp_path, run_main):
    work = copy_cache(reference.work, tmp_path / "w")
    argv = train_argv(tiny, work, 1)
    argv[argv.index("--decoder") + 1] = "lstm"
    code, _, err = run_main(*argv)
    assert code == 0, err


def test_random_bytes_are_called_corrupt_not_code(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CaptioningError) as e:
        load_checkpoint(bad)
    assert "code" not in str(e.value) and "corrupt" in str(e.value)


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tiny, reference, tmp_path, monkeypatch,
                                                                    run_main):
    """The disk fills up while epoch 2 is saved: one line saying so, epoch 1's checkpoint intact, no temp file."""
    work = copy_cache(reference.work, tmp_path / "w")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            with open(f, "wb") as fh:
                fh.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_main(*train_argv(tiny, work, 3))
    assert code == 1
    line = the_error(err)
    assert "disk is full" in line and "free some space" in line
    assert load_checkpoint(work / "models" / "last.pt")["epoch"] == 1
    assert no_temp_files(work) == []


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
def model_workdir(reference, tmp_path):
    """A workdir holding only the reference run's models (caption looks there)."""
    work = tmp_path / "work"
    shutil.copytree(reference.work / "models", work / "models")
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

    from captioning import datasets
    image = sorted((tiny.data / "Images").glob("*.jpg"))[0]

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        code, _, err = run_main("caption", image, "--workdir", model_workdir, "--device", "cpu")
    assert code == 1 and "No permission to read image" in error_line(err)

    with monkeypatch.context() as m:
        m.setattr(datasets, "open", refuse, raising=False)          # the annotation file
        code, _, err = run_main("train", "--data", tiny.data, "--workdir", tmp_path / "w")
    assert code == 1 and "Permission denied" in error_line(err) and "captions.json" in err

    with monkeypatch.context() as m:
        m.setattr(os, "listdir", refuse)                            # the dataset folder itself
        code, _, err = run_main("train", "--data", tiny.data, "--workdir", tmp_path / "w")
    assert code == 1 and "Permission denied" in error_line(err)

    from captioning import render
    with monkeypatch.context() as m:                                # an output folder the user cannot write to
        m.setattr(render, "atomic_write", refuse)
        code, _, err = run_main("caption", image, "--workdir", model_workdir, "--device", "cpu",
                                "--output", tmp_path / "locked" / "x.png")
    line = error_line(err)
    assert code == 1 and "No permission" in line and "unexpected" not in line


# ---- the menu: Ctrl-C and end of input -----------------------------------------------------------------

def test_ctrl_c_at_a_prompt_returns_to_the_menu_and_at_the_menu_quits(tmp_path):
    """A real SIGINT to the menu process while it waits at an option's prompt, then at the main menu."""
    run = Proc([ENTRY, "--workdir", tmp_path], cwd=tmp_path, stdin=True)
    run.wait_for(lambda: run.out.count("Choose") == 1, timeout=30, what="the menu")
    run.send("4\n")
    run.wait_for(lambda: "Image file or folder" in run.out, timeout=30, what="the path prompt")
    run.p.send_signal(signal.SIGINT)
    run.wait_for(lambda: run.out.count("Choose") == 2, timeout=30, what="the menu again")
    assert "Cancelled; back to the menu." in run.out
    run.send("3\n")                                   # train: its first prompt asks for the dataset folder
    run.wait_for(lambda: "Dataset folder" in run.out, timeout=30, what="the dataset prompt")
    run.p.send_signal(signal.SIGINT)
    run.wait_for(lambda: run.out.count("Choose") == 3, timeout=30, what="the menu a third time")
    run.p.send_signal(signal.SIGINT)                  # Ctrl-C at the menu itself: goodbye
    assert run.finish(30) == 0
    assert run.out.rstrip().endswith("Bye.") and run.out.count("Cancelled; back to the menu.") == 2
    assert run.err == "" and "Traceback" not in run.out


class Script:
    """Answers for the menu's prompts; KeyboardInterrupt / EOFError entries are raised like Ctrl-C / Ctrl-D."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def input(self, prompt="", **kwargs):
        menu.out.print(prompt, end="")
        self.prompts.append(str(prompt))
        if not self.answers:
            raise EOFError
        answer = self.answers.pop(0)
        if isinstance(answer, type) and issubclass(answer, BaseException):
            menu.out.print()
            raise answer
        return answer


@pytest.fixture
def scripted_menu(monkeypatch, capsys):
    """Run the menu in this process with scripted answers → (exit code, stdout)."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))

    def run(answers, *argv):
        monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
        script = Script(answers)
        monkeypatch.setattr(menu.out, "input", script.input)
        code = cli_module.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return run


@pytest.mark.parametrize("answers, prompt", [
    (["3", KeyboardInterrupt], "Dataset folder"),
    (["3", "{data}", KeyboardInterrupt], "Encoder"),
    (["3", "{data}", "", KeyboardInterrupt], "Decoder"),
    (["3", "{data}", "", "", "0", KeyboardInterrupt], "Epochs"),             # after a rejected answer, too
    (["3", "{data}", "", "", "", KeyboardInterrupt], "Batch size"),
    (["1", KeyboardInterrupt], "Download mini-coco"),
    (["4", KeyboardInterrupt], "Image file or folder"),
    (["5", "{data}", KeyboardInterrupt], "Split"),
])
def test_ctrl_c_at_every_kind_of_prompt_returns_to_the_menu(tiny, tmp_path, scripted_menu, answers, prompt):
    answers = [a.format(data=tiny.data) if isinstance(a, str) else a for a in answers]
    code, out = scripted_menu(answers + ["7"], "--workdir", tmp_path)
    assert code == 0
    cut = out.rindex(prompt)
    assert "Cancelled; back to the menu." in out[cut:]
    assert out.count("Choose") == 2 and out.rstrip().endswith("Bye.")
    assert "Traceback" not in out and "error" not in out


@pytest.mark.parametrize("stop", [KeyboardInterrupt, EOFError])
def test_ctrl_c_or_ctrl_d_at_the_main_menu_quits_cleanly(tmp_path, scripted_menu, stop):
    code, out = scripted_menu(["abc", stop], "--workdir", tmp_path)
    assert code == 0 and out.rstrip().endswith("Bye.") and "Traceback" not in out


@pytest.mark.parametrize("encoder", ["-h", "--help", "--data", "resnet 50"])
def test_any_encoder_answer_is_one_line_and_the_menu_goes_on(tiny, tmp_path, scripted_menu, encoder):
    """Menu answers reach the CLI's parser: one that looks like an option must not end the menu with a usage."""
    dash = tmp_path / "-data"                      # a folder whose name starts with a dash, too
    shutil.copytree(tiny.data, dash)
    code, out = scripted_menu(["2", str(dash), encoder, "7"], "--workdir", tmp_path)
    assert code == 0 and "usage:" not in out and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert f"Unknown encoder '{encoder}'" in line
    assert out.count("Choose") == 2 and out.rstrip().endswith("Bye.")


def test_ctrl_c_during_work_returns_to_the_menu(tiny, tmp_path, scripted_menu, monkeypatch):
    import captioning.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "prepare", interrupted)   # e.g. during the feature extraction
    code, out = scripted_menu(["2", str(tiny.data), "", "7"], "--workdir", tmp_path)
    assert code == 0 and "Cancelled; back to the menu." in out and out.count("Choose") == 2


def test_menu_errors_are_one_line_unless_debug(tiny, tmp_path, scripted_menu, monkeypatch):
    import captioning.train as train_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nmore detail")
    monkeypatch.setattr(train_module, "prepare", bug)
    code, out = scripted_menu(["2", str(tiny.data), "", "7"], "--workdir", tmp_path)
    assert code == 0 and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert "ZeroDivisionError: division by zero" in line and "--debug" in line and "more detail" not in out
    code, out = scripted_menu(["2", str(tiny.data), "", "7"], "--workdir", tmp_path, "--debug")
    assert code == 0 and "Traceback" in out and out.count("Choose") == 2


def test_menu_whose_output_is_closed_exits_quietly(tmp_path):
    """stdout closed under the tool (a pager quit early, `| head`): no BrokenPipeError trace on stderr."""
    p = subprocess.Popen([sys.executable, str(ENTRY), "--workdir", str(tmp_path)], cwd=tmp_path, env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    _, err = p.communicate(b"7\n", timeout=60)
    assert err.decode() == ""


# ---- resources -----------------------------------------------------------------------------------------

def cuda_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total "
                                      "capacity; 5.12 GiB already allocated)\nSee documentation for Memory Management")


def test_gpu_out_of_memory_suggests_a_smaller_batch(tiny, reference, tmp_path, monkeypatch, run_main,
                                                    scripted_menu):
    import captioning.train as train_module
    work = copy_cache(reference.work, tmp_path / "w")
    monkeypatch.setattr(train_module, "train_epoch", cuda_oom)
    code, out, err = run_main(*train_argv(tiny, work, 1))
    line = the_error(err)
    assert code == 1 and "out of memory" in line and "smaller --batch-size" in line
    assert "Tried to allocate" not in err and "Traceback" not in err

    monkeypatch.setattr(train_module, "train", cuda_oom)    # the menu's default encoder needs ImageNet weights
    code, out = scripted_menu(["3", str(tiny.data), "", "", "", "", "7"], "--workdir", work)
    assert code == 0 and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert "out of memory" in line and "smaller batch size" in line and out.count("Choose") == 2


# ---- downloads: offline, refused, interrupted; never half a dataset ------------------------------------

@pytest.fixture
def kaggle_http(monkeypatch, tmp_path):
    """The real kagglehub (cache, completion markers, archive extraction) with its HTTP calls replaced.
    `net.online`, `net.status` (an HTTP error), `net.archive` (bytes served), `net.cut_at` (bytes served before
    the connection breaks) and `net.extract_fails` (stop the archive's extraction half-way) steer it."""
    import requests
    from kagglehub import http_resolver
    from kagglehub.exceptions import KaggleApiHTTPError
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle-cache"))
    net = SimpleNamespace(online=True, status=None, archive=b"", cut_at=None, extract_fails=None)

    def check():
        if not net.online:
            raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='www.kaggle.com', port=443): "
                                                      "Max retries exceeded")
        if net.status:
            response = requests.Response()
            response.status_code = net.status
            raise KaggleApiHTTPError(f"{net.status} Client Error.\n\nmore lines", response=response)

    def current_version(client, handle):
        check()
        return 3

    class Response:
        headers, url = {}, "https://storage.example/archive.zip"

    def call(fn, handle=None):
        check()
        return Response()

    def download_file(response, out_file, handle, cached_path=None, **kwargs):
        data = net.archive if net.cut_at is None else net.archive[:net.cut_at]
        with open(out_file, "wb") as f:
            f.write(data)
        if net.cut_at is not None:
            raise requests.exceptions.ChunkedEncodingError("('Connection broken: IncompleteRead(1024 bytes read, "
                                                           "9000 more expected)')")
        return True

    real_extract = http_resolver._extract_archive

    def extract(archive_path, out_path):
        if net.extract_fails is None:
            return real_extract(archive_path, out_path)
        with zipfile.ZipFile(archive_path) as z:              # half the files, then the failure
            names = z.namelist()
            z.extractall(out_path, names[: len(names) // 2])
        raise net.extract_fails

    monkeypatch.setattr(http_resolver, "_get_current_version", current_version)
    monkeypatch.setattr(http_resolver, "handle_call", call)
    monkeypatch.setattr(http_resolver, "download_file", download_file)
    monkeypatch.setattr(http_resolver, "_extract_archive", extract)
    return net


def zipped_dataset(tmp_path):
    folder = make_shapes_dataset(tmp_path / "served", n_images=6, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        # Annotations first: an archive cut short then holds a folder that looks like a dataset.
        for p in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.suffix != ".json", p)):
            z.write(p, p.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_a_broken_download_is_never_taken_for_a_whole_one(tmp_path, kaggle_http, run_main):
    net = kaggle_http
    net.archive = zipped_dataset(tmp_path)
    version = tmp_path / "kaggle-cache" / "datasets" / "adityajn105" / "flickr8k" / "versions" / "3"

    net.cut_at = 1024                                   # the connection breaks mid-way
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == ""
    line = error_line(err)
    assert "interrupted" in line and "run the download again" in line

    net.cut_at, net.extract_fails = None, KeyboardInterrupt   # Ctrl-C while the archive is unpacked
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == "" and "Interrupted" in err and "Traceback" not in err
    assert (version / "captions.json").exists()        # half a folder lies there, loadable on its own...
    assert 0 < len(list((version / "Images").iterdir())) < 6

    net.online = False                                 # ... and offline it must not be served as the dataset
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == ""
    assert "Could not reach Kaggle" in error_line(err)

    net.extract_fails = OSError(errno.ENOSPC, "No space left on device")   # the disk fills while unpacking
    net.online = True
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and "No space left on device" in error_line(err)

    net.extract_fails = None                           # a whole download at last
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 0, err
    assert Path(out.strip()) == version
    net.online = False                                 # ... which offline is served from the cache
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 0 and Path(out.strip()) == version and "cached copy" in err


@pytest.mark.parametrize("status, words", [(404, "no such dataset"), (403, "no permission"),
                                           (401, "credentials"), (500, "HTTP status 500")])
def test_http_errors_are_one_sentence(kaggle_http, run_main, status, words):
    kaggle_http.status = status
    code, out, err = run_main("download")
    line = error_line(err)
    assert code == 1 and out == "" and str(status) in line and words in line


# ---- --debug -------------------------------------------------------------------------------------------

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

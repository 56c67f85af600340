"""Shared fixtures: a synthetic shapes dataset and models really trained on it, once per test session;
for the *_robustness tests, a tiny dataset, one uninterrupted CLI training run on it, and a helper for
commands that are interrupted or killed while they run.

Everything is offline: the encoder is a randomly initialised ResNet-18 (weights=None), as in the demo.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "datasets" / "flickr8k"
TORCH_HOME = ROOT.parent / "shared" / "torch_home"
ENTRY = ROOT / "image_captioning.py"

# Two cores: keep torch from oversubscribing them when tests run DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# A test run started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and
# an ignored signal stays ignored in every process the tests start: the Ctrl-C tests need it to arrive as
# it does for a user at a terminal. A handled signal is reset to the default in a started program.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Fixtures that train a model (minutes on 2 cores): every test that needs one is `slow` (pytest.ini).
TRAINED = {"attention_model", "lstm_model", "reference_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def run_training(workdir, data, decoder, epochs, **model_kw):
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    from captioning.training.train import train
    spec, cfg = demo_configs(epochs=epochs, seed=0)
    cfg.model.decoder = decoder
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    return train(data, workdir, cfg, spec, ExtractConfig(device="cpu", num_workers=1))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from captioning.data.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=400, seed=0)


@pytest.fixture(scope="session")
def attention_model(shapes_data, tmp_path_factory):
    """(workdir, best checkpoint path) of an attention decoder trained on the shapes."""
    workdir = tmp_path_factory.mktemp("attention-run")
    best = run_training(workdir, shapes_data, "attention", epochs=10)
    return workdir, best


@pytest.fixture(scope="session")
def lstm_model(shapes_data, tmp_path_factory):
    """(workdir, best checkpoint path) of a Show-and-Tell decoder trained on the same shapes."""
    workdir = tmp_path_factory.mktemp("lstm-run")
    best = run_training(workdir, shapes_data, "lstm", epochs=6)
    return workdir, best


def cli(*args, cwd=None, env=None, input=None, timeout=600):
    """Run the real entry script in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, str(ENTRY), *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """cli.main(argv) in this process → (exit code, stdout, stderr)."""
    from captioning.interfaces import cli as cli_module
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # main() sets it when unset

    def run(*argv):
        code = cli_module.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


# ---- for the *_robustness tests: processes killed at random moments, Ctrl-C, awkward paths ---------------
# Their subprocesses use one compute thread so that a run and its resumed twin compute in the same order.

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_IMAGES = 32
EPOCHS = 4


@pytest.fixture
def kill_times(request):
    """(generator, seed) for random kill times. The seed is new each run and shown with a failure (a report
    section of its own, which capsys cannot swallow); KILL_SEED=<seed> replays it."""
    seed = int(os.environ.get("KILL_SEED") or random.randrange(2 ** 32))
    request.node.add_report_section("setup", "kill seed", f"random kill times from seed {seed}: "
                                                          f"replay with KILL_SEED={seed}")
    return random.Random(seed), seed


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

    def wait_for(self, condition, timeout=300, what="the expected output"):
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
            "--patience", "50", "--lr", "0.003",
            # The shapes' captions say "left" and "right" (no mirror images), and a few epochs learn faster
            # with the plateau schedule than with a cosine.
            "--no-flip", "--lr-schedule", "plateau", *map(str, extra)]


def copy_cache(src, dst):
    shutil.copytree(Path(src) / "cache", Path(dst) / "cache")
    return Path(dst)


@pytest.fixture
def one_compute_thread():
    """In-process runs use one thread too: on two busy cores, two threads per op are several times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """32 small shape images and a random-init ResNet-18 saved as a local weights file (`--encoder-weights`),
    so that the real entry script runs offline."""
    import torch
    import torchvision
    from captioning.data.synthetic import make_shapes_dataset
    root = tmp_path_factory.mktemp("robust")
    data = make_shapes_dataset(root / "data", n_images=N_IMAGES, size=64, seed=1)
    weights = root / "resnet18-random.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return SimpleNamespace(root=root, data=data, weights=weights)


@pytest.fixture(scope="session")
def reference_run(tiny):
    """An uninterrupted CLI training run of EPOCHS epochs (it extracts the features first).
    Returns its workdir and how long its epochs took (to aim the kills)."""
    import torch
    work = tiny.root / "reference"
    run = Proc([ENTRY, *train_argv(tiny, work, EPOCHS)], cwd=tiny.root)
    # Seconds on an idle machine, minutes on a busy one; pytest.ini's timeout bounds the whole test anyway.
    run.wait_for(lambda: "Training the" in run.err, timeout=600, what="training to start")
    t0 = time.monotonic()
    run.wait_for(lambda: f"epoch {EPOCHS}:" in run.err, timeout=600, what="the last epoch")
    seconds = time.monotonic() - t0
    assert run.finish(600) == 0, run.err
    assert "Traceback" not in run.err
    return SimpleNamespace(work=work, train_seconds=seconds, last=torch.load(work / "models" / "last.pt",
                                                                             weights_only=True))

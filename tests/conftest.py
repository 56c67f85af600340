"""Shared fixtures: a synthetic shapes dataset and models really trained on it, once per test session;
for the *_robustness tests, a tiny dataset, one uninterrupted CLI training run on it, and a helper for
commands that are interrupted or killed while they run.

Everything is offline: the encoder is a randomly initialised ResNet-18 (weights=None), as in the demo.
"""
import os
import random
import signal
import time
from types import SimpleNamespace

import pytest
from tests.helpers import ENTRY, EPOCHS, N_IMAGES, Proc, run_training, train_argv

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


@pytest.fixture
def kill_times(request):
    """(generator, seed) for random kill times. The seed is new each run and shown with a failure (a report
    section of its own, which capsys cannot swallow); KILL_SEED=<seed> replays it."""
    seed = int(os.environ.get("KILL_SEED") or random.randrange(2 ** 32))
    request.node.add_report_section("setup", "kill seed", f"random kill times from seed {seed}: "
                                                          f"replay with KILL_SEED={seed}")
    return random.Random(seed), seed


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

"""Shared fixtures: a synthetic shapes dataset and models really trained on it, once per test session.

Everything is offline: the encoder is a randomly initialised ResNet-18 (weights=None), as in the demo.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "datasets" / "flickr8k"
TORCH_HOME = ROOT.parent / "shared" / "torch_home"

# Two cores: keep torch from oversubscribing them when tests run DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# A test run started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and
# an ignored signal stays ignored in every process the tests start: the Ctrl-C tests need it to arrive as
# it does for a user at a terminal. A handled signal is reset to the default in a started program.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_training(workdir, data, decoder, epochs, **model_kw):
    from captioning.demo import demo_configs
    from captioning.features import ExtractConfig
    from captioning.train import train
    spec, cfg = demo_configs(epochs=epochs, seed=0)
    cfg.model.decoder = decoder
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    return train(data, workdir, cfg, spec, ExtractConfig(device="cpu", num_workers=1))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from captioning.synthetic import make_shapes_dataset
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
    import subprocess
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "image_captioning.py"), *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, input=input, capture_output=True, text=True, timeout=timeout)

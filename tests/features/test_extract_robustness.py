"""Extraction never loses a finished row: `extract` interrupted by Ctrl-C, then killed at a random moment,
resumes to the uninterrupted run's exact cache. Real CLI runs on the tiny shapes dataset (tests.conftest)."""
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import N_IMAGES, no_temp_files, Proc

pytestmark = pytest.mark.usefixtures("one_compute_thread")


EXTRACT_DRIVER = '''
"""The `extract` command with the cache's flush interval (argv[1]) set: 0 records every batch at once."""
import dataclasses, sys
from captioning.interfaces import cli

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


def test_extraction_interrupted_then_killed_resumes_to_an_identical_cache(tiny, reference_run, tmp_path, monkeypatch,
                                                                          run_main, kill_times):
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
    rng, seed = kill_times
    time.sleep(rng.uniform(0, 0.3))
    b.p.send_signal(signal.SIGKILL)
    b.finish()
    killed = progress()["done"]          # progress.json is whole: it is only ever replaced atomically
    assert killed > first, f"KILL_SEED={seed}"

    from captioning.features import extract as features
    build, encoded = features.build_encoder, []

    def counting_build(spec):
        trunk, transform = build(spec)
        return CountingTrunk(trunk, encoded), transform

    monkeypatch.setattr(features, "build_encoder", counting_build)
    code, _, err = run_main(*argv)
    assert code == 0, (f"KILL_SEED={seed}", err)
    assert sum(encoded) == N_IMAGES - killed, f"KILL_SEED={seed}"  # the finished rows were reused, not encoded again
    assert progress()["complete"] and progress()["bad"] == []

    [ref] = [p for p in (reference_run.work / "cache").iterdir() if p.is_dir() and "-mirror-" not in p.name]
    [got] = [p for p in (work / "cache").iterdir() if p.is_dir()]
    assert got.name == ref.name
    for name in ("grid.npy", "pooled.npy"):
        assert np.array_equal(np.load(got / name), np.load(ref / name)), (name, f"KILL_SEED={seed}")
    assert json.loads((got / "images.json").read_text()) == json.loads((ref / "images.json").read_text())
    assert all(Path(p).name.startswith(".") for p in no_temp_files(work))



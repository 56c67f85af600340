"""Distributed training and extraction under torchrun, for real: 2 CPU processes (gloo) on localhost.

The torchrun tests share one small shapes dataset, a random MobileNetV3-small encoder (passed as a local
weights file, as a user would) and one single-process run to compare against. The rest checks the pieces
in this process: sharding, the loss weighting that makes 2 ranks' averaged gradient the whole batch's,
the options, and clear errors."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning.interfaces import cli as cli_module
from captioning import distributed
from captioning.config import ModelConfig
from captioning.models.decoders import build_decoder
from captioning.config import TrainConfig
from captioning.training.objectives import decoder_loss
from captioning.utils import CaptioningError
from tests.helpers import ROOT, copy_cache

ENCODER = ["--encoder", "mobilenet_v3_small", "--extract-batch-size", "4", "--device", "cpu"]
MODEL = ["--decoder", "lstm", "--hidden-dim", "64", "--embed-dim", "32", "--dropout", "0", "--min-count", "1",
         "--lr", "2e-3"]
GLOBAL_BATCH = 16


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, wait=True, timeout=120):
    """`torchrun --nproc-per-node N image_captioning.py ARGS` with a c10d rendezvous on localhost, as in
    the README. One compute thread per process: the 2 processes share this machine's 2 cores."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
           str(ROOT / "image_captioning.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset, encoder weights file): 100 shape images (about 5 dev images) and a random encoder."""
    import torchvision
    from captioning.data.synthetic import make_shapes_dataset
    root = tmp_path_factory.mktemp("dist")
    data = make_shapes_dataset(root / "shapes", n_images=100, size=96, seed=1)
    torch.manual_seed(0)
    weights = root / "mobilenet_v3_small.pt"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    return data, weights


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """The same command as one plain process (in this one: no second torch import to wait for): extract,
    then train 2 epochs with the global batch. Returns its workdir."""
    data, weights = setup
    workdir = tmp_path_factory.mktemp("single")
    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    torch.set_num_threads(1)   # as each rank under torchrun (OMP_NUM_THREADS=1)
    try:
        mp.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # main() would set it
        code = cli_module.main([str(a) for a in ["train", "--data", data, "--workdir", workdir, *ENCODER,
                                                 "--encoder-weights", weights, *MODEL, "--epochs", 2,
                                                 "--batch-size", GLOBAL_BATCH]])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    assert code == 0
    return workdir


def cache_folder(workdir):
    folders = [f for f in (workdir / "cache").glob("mobilenet_v3_small-*") if "-mirror-" not in f.name]
    assert len(folders) == 1, folders
    return folders[0]


# ---- for real, under torchrun -----------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_extract_writes_the_single_process_cache(setup, single, tmp_path, monkeypatch):
    """Two ranks write the cache a single process writes: the same files, images, rows and metadata, and each
    feature equal to within fp16 rounding (2**-10 relative: the gap between neighbouring fp16 numbers). Not
    always bit for bit: a convolution's sums run in an order that depends on the number of compute threads,
    so a plain `extract` with 2 threads and two ranks with 1 each may round a value to the next fp16 number
    (reported for 96 Flickr8k photos: max relative difference 6.5e-4). With 1 thread each they are identical."""
    data, weights = setup
    r = torchrun(2, "extract", "--data", data, "--workdir", tmp_path, *ENCODER, "--encoder-weights", weights)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Features for 100 images") == 1, r.stderr   # rank 0 speaks, rank 1 is quiet
    ours = cache_folder(tmp_path)

    # A plain `extract` with this machine's 2 compute threads (as on an idle machine: on a busy one it would
    # use fewer).
    from captioning.features import tuning
    plain, threads = tmp_path / "plain", torch.get_num_threads()
    monkeypatch.setattr(tuning.CpuShare, "others", lambda self: 0.0)
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # main() would set it
    torch.set_num_threads(2)
    try:
        code = cli_module.main([str(a) for a in ["extract", "--data", data, "--workdir", plain, *ENCODER,
                                                 "--encoder-weights", weights]])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for theirs, same_threads in ((cache_folder(single), True), (cache_folder(plain), False)):
        assert ours.name == theirs.name
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())  # no rank markers
        for name in ("images.json", "progress.json"):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
        for name in ("grid.npy", "pooled.npy"):
            a, b = np.load(ours / name), np.load(theirs / name)
            assert a.dtype == b.dtype == np.float16 and a.shape == b.shape, name
            # 2**-14: fp16's smallest normal number; below it its steps are absolute, not relative.
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2 ** -10, atol=2 ** -14,
                                       err_msg=name)
            if same_threads:
                assert np.array_equal(a, b), name   # 1 thread in each process: identical


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_same_global_batch(setup, single, tmp_path):
    data, weights = setup
    workdir = copy_cache(single, tmp_path / "w")
    r = torchrun(2, "train", "--data", data, "--workdir", workdir, *ENCODER, "--encoder-weights", weights, *MODEL,
                 "--epochs", 2, "--batch-size", GLOBAL_BATCH // 2, "--dist-timeout", 60)
    assert r.returncode == 0, r.stderr
    assert f"global batch = {GLOBAL_BATCH // 2} per process × 2 = {GLOBAL_BATCH}" in r.stderr
    assert r.stderr.count("epoch 2: train loss") == 1, r.stderr   # messages from rank 0 only
    files = sorted(p.name for p in (workdir / "models").iterdir())
    assert files == ["best.json", "best.pt", "curves.png", "last.json", "last.pt"]   # one writer, no temp files

    a = torch.load(single / "models" / "last.pt", weights_only=True)
    b = torch.load(workdir / "models" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for ha, hb in zip(a["history"], b["history"]):   # measured: 2e-8 apart (float sums in another order)
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-6)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-6)
    assert a["history"][1]["train_loss"] < 0.9 * a["history"][0]["train_loss"]  # it did learn: a real comparison
    for k, v in a["decoder_state"].items():      # after 46 AdamW steps: within 1e-6
        assert torch.allclose(b["decoder_state"][k], v, rtol=0, atol=2e-5), k


def test_two_ranks_run_self_critical_training(setup, single, tmp_path):
    """SCST under torchrun: each rank samples for its part of every global batch of images; rank 0 alone
    scores (beam search), speaks and writes; the cross-entropy model it started from is kept."""
    import shutil
    data, weights = setup
    workdir = copy_cache(single, tmp_path / "w")
    (workdir / "models").mkdir()
    for name in ("best.pt", "best.json"):
        shutil.copy(single / "models" / name, workdir / "models" / name)
    r = torchrun(2, "train", "--data", data, "--workdir", workdir, *ENCODER, "--encoder-weights", weights,
                 "--objective", "scst", "--epochs", 1, "--batch-size", 8, "--scst-samples", 4, "--dist-timeout", 60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("epoch 1: train reward") == 1 and r.stderr.count("start: dev") == 1, r.stderr
    files = sorted(p.name for p in (workdir / "models").iterdir())
    assert files == ["best.json", "best.pt", "curves.png", "last.json", "last.pt", "xe_best.json", "xe_best.pt"]
    last = torch.load(workdir / "models" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [0, 1] and last["history"][1]["train_reward"] > 0
    assert last["train_config"]["objective"] == "scst"


def rank_pid(parent, rank):
    """The pid of torchrun's worker process with RANK=`rank` (its child; read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_with_the_last_checkpoint_intact_and_resumable(setup, single, tmp_path):
    data, weights = setup
    workdir = copy_cache(single, tmp_path / "w")
    last = workdir / "models" / "last.pt"
    timeout = 20
    proc = torchrun(2, "train", "--data", data, "--workdir", workdir, *ENCODER, "--encoder-weights", weights, *MODEL,
                    "--epochs", 200, "--patience", 200, "--batch-size", 8, "--dist-timeout", timeout, wait=False)
    try:
        deadline = time.monotonic() + 90
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and last.exists(), proc.communicate()[1] if proc.poll() is not None else "slow"
        victim = rank_pid(proc.pid, 1)
        assert victim, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=timeout + 30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0     # torchrun reports the failed rank
    assert took < timeout, (took, err)
    ckpt = torch.load(last, weights_only=True)  # intact: written whole or not at all
    assert ckpt["epoch"] >= 1 and len(ckpt["history"]) == ckpt["epoch"]

    # Both ranks resume from that checkpoint and finish the next epoch.
    done = ckpt["epoch"]
    r = torchrun(2, "train", "--data", data, "--workdir", workdir, *ENCODER, "--encoder-weights", weights,
                 "--epochs", done + 1, "--resume", "--dist-timeout", 60)
    assert r.returncode == 0, r.stderr
    assert f"Resuming after epoch {done}" in r.stderr
    after = torch.load(last, weights_only=True)
    assert after["epoch"] == done + 1 and [h["epoch"] for h in after["history"]] == list(range(1, done + 2))


HANG = """
import os, sys, time
import torch, torch.distributed as dist
from captioning import distributed
from captioning.utils import CaptioningError
try:
    with distributed.session("cpu", 3):
        if distributed.rank() == 1:
            time.sleep(15)        # alive, but never joins the collective below
            os._exit(0)
        t0 = time.monotonic()
        dist.all_reduce(torch.ones(3))
except CaptioningError as e:
    print(f"rank 0 gave up after {time.monotonic() - t0:.1f}s: {e}", flush=True)
    os._exit(1)
"""


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_others_after_the_timeout(tmp_path):
    """What --dist-timeout guards against: a peer that is alive but stuck (or on a machine that vanished),
    which torchrun on this machine cannot see. The waiting rank gives up after the timeout, in one line."""
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    line = next((l for l in r.stdout.splitlines() if l.startswith("rank 0 gave up")), None)
    assert line, r.stdout + r.stderr
    assert 2.5 < float(line.split("after ")[1].split("s:")[0]) < 10, line
    assert "lost contact" in line and "--dist-timeout 3s" in line


# ---- the pieces, in this process --------------------------------------------------------------------


@pytest.mark.parametrize("n,world,align", [(100, 2, 4), (101, 2, 4), (7, 3, 1), (3, 2, 4), (64, 8, 8), (0, 2, 4)])
def test_shard_ranges_cover_every_row_once_in_whole_batches(n, world, align):
    ranges = [distributed.shard_range(n, r, world, align) for r in range(world)]
    rows = [i for lo, hi in ranges for i in range(lo, hi)]
    assert rows == list(range(n))                          # disjoint, contiguous, in rank order
    assert all(lo % align == 0 for lo, _ in ranges)        # every rank runs a single process's batches
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= align


@pytest.mark.parametrize("decoder", ["lstm", "attention"])
def test_weighted_parts_give_the_whole_batch_gradient(decoder, monkeypatch):
    """What DDP computes with 2 ranks — the mean of each rank's gradient of its weighted loss — is the
    single-process gradient of the whole batch, although the parts hold different numbers of tokens."""
    from captioning.training import optim
    torch.manual_seed(0)
    cfg = TrainConfig(att_reg=1.0, label_smoothing=0.1,
                      model=ModelConfig(decoder=decoder, vocab_size=30, feat_dim=8, embed_dim=8, hidden_dim=16,
                                        attention_dim=8, context_dim=8, dropout=0.0))
    model = build_decoder(cfg.model)
    n, width = 9, 8
    lengths = torch.randint(3, width + 1, (n,))
    lengths[0] = width
    tokens = torch.randint(3, 30, (n, width))
    tokens[:, 0] = 1
    tokens[torch.arange(width) >= lengths[:, None]] = 0
    feats = torch.randn(n, 4, 8) if model.uses_grid else torch.randn(n, 8)
    idx = torch.arange(n)

    def grads(part, weights):
        model.zero_grad()
        loss, _ = decoder_loss(model, feats[part], tokens[part], lengths[part], cfg, None, weights)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(idx, (1.0, 1.0))
    world, parts = 2, []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        part = distributed.batch_part(idx)
        tok = int((lengths[idx] - 1).sum())
        weights = (world * int((lengths[part] - 1).sum()) / tok, world * len(part) / len(idx))
        parts.append(grads(part, weights))
    for g, g0, g1 in zip(whole, *parts):
        torch.testing.assert_close((g0 + g1) / world, g, rtol=1e-5, atol=1e-6)
    assert optim.amp_dtype(torch.device("cpu"), True) is None   # no mixed precision off CUDA


def test_train_options_parse():
    parser = cli_module.build_parser()
    args = parser.parse_args(["train", "--data", "d"])
    assert args.amp is None and args.compile is False and args.dist_timeout == 1800
    args = parser.parse_args(["train", "--data", "d", "--no-amp", "--compile", "--dist-timeout", "30"])
    assert args.amp is False and args.compile is True and args.dist_timeout == 30
    assert parser.parse_args(["train", "--data", "d", "--amp"]).amp is True
    assert parser.parse_args(["extract", "--data", "d", "--dist-timeout", "5"]).dist_timeout == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--dist-timeout", "0"])


def test_cmd_train_passes_the_runtime_options(monkeypatch, tmp_path):
    import captioning.training.train as train_mod
    seen = {}
    monkeypatch.setattr(train_mod, "train", lambda data, workdir, cfg, spec, extract_cfg, resume: seen.update(
        cfg=cfg, device=extract_cfg.device))
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))
    assert cli_module.main(["train", "--data", str(tmp_path), "--workdir", str(tmp_path), "--no-amp", "--compile"]) == 0
    assert seen["cfg"].amp is False and seen["cfg"].compile is True and seen["device"] == "auto"


def test_without_torchrun_nothing_changes(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with distributed.session("auto") as device:
        assert device == "auto" and distributed.world_size() == 1 and distributed.is_main()
        assert distributed.from_main(("x",), lambda: {"x": 2.5}) == {"x": 2.5}
        assert distributed.all_sum(1.0, 2.0) == (1.0, 2.0)
        idx = torch.arange(5)
        assert distributed.batch_part(idx) is idx


@pytest.mark.parametrize("device,message", [("cuda", "no CUDA GPU"), ("mps", "MPS")])
def test_torchrun_on_a_device_it_cannot_use_is_one_clear_line(device, message, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CaptioningError, match=message):
        with distributed.session(device):
            pass
    code = cli_module.main(["extract", "--data", "nowhere", "--device", device])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not distributed.active()

"""Training never loses work: `train` killed at random moments, killed between saving last.pt and best.pt,
the disk full while a checkpoint is saved, the GPU out of memory. Real CLI runs on the tiny shapes dataset
(tests.conftest: `tiny`, and `reference_run`, one uninterrupted run to compare with)."""
import errno
import signal
import time
from pathlib import Path

import pytest
import torch

from captioning.training.checkpoint import load_checkpoint
from tests.helpers import ENTRY, EPOCHS, copy_cache, cuda_oom, no_temp_files, Proc, the_error, train_argv

pytestmark = pytest.mark.usefixtures("one_compute_thread")


# ---- killed at random moments: nothing lost --------------------------------------------------------------

def test_training_killed_at_random_moments_resumes_to_the_same_result(tiny, reference_run, tmp_path, run_main,
                                                                    kill_times):
    """SIGKILL twice at random moments of real CLI training runs: after each kill the last checkpoint loads
    (weights_only) and never goes back; `--resume` then finishes with the uninterrupted run's result."""
    work = copy_cache(reference_run.work, tmp_path / "killed")
    last = work / "models" / "last.pt"
    rng, seed = kill_times
    log, seen = [f"KILL_SEED={seed}"], 0
    for _ in range(2):
        resume = last.exists()
        run = Proc([ENTRY, *train_argv(tiny, work, EPOCHS, *(["--resume"] if resume else []))], cwd=tmp_path)
        run.wait_for(lambda: "Training the" in run.err, what="training to start")
        delay = rng.uniform(0, reference_run.train_seconds)
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

    a, b = reference_run.last, torch.load(last, weights_only=True)
    assert [h["epoch"] for h in b["history"]] == list(range(1, EPOCHS + 1)), log
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("train_loss", "val_loss", "CIDEr-D", "BLEU-4", "lr"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), (key, ha["epoch"], log)
    for k in a["decoder_state"]:
        assert torch.allclose(a["decoder_state"][k], b["decoder_state"][k], rtol=1e-4, atol=1e-5), (k, log)
    # A kill can orphan a hidden temp file, never a half file under a real name; a finished run leaves none.
    assert all(Path(p).name.startswith(".") for p in no_temp_files(work)), no_temp_files(work)
    assert no_temp_files(reference_run.work) == []


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the tool may catch it."""


def test_a_kill_between_saving_last_and_best_keeps_the_best_model(tiny, reference_run, tmp_path, monkeypatch,
                                                                  run_main):
    """Killed right after an epoch's last.pt but before its best.pt: once resumed, best.pt must still be
    the epoch that the history calls best (else the best model is silently an older one)."""
    import captioning.training.train as train_module
    work = copy_cache(reference_run.work, tmp_path / "w")
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


def test_the_lstm_decoder_trains_through_the_cli(tiny, reference_run, tmp_path, run_main):
    work = copy_cache(reference_run.work, tmp_path / "w")
    argv = train_argv(tiny, work, 1)
    argv[argv.index("--decoder") + 1] = "lstm"
    code, _, err = run_main(*argv)
    assert code == 0, err


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tiny, reference_run, tmp_path, monkeypatch,
                                                                    run_main):
    """The disk fills up while epoch 2 is saved: one line saying so, epoch 1's checkpoint intact, no temp file."""
    work = copy_cache(reference_run.work, tmp_path / "w")
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


# ---- resources -----------------------------------------------------------------------------------------


def test_gpu_out_of_memory_suggests_a_smaller_batch(tiny, reference_run, tmp_path, monkeypatch, run_main):
    import captioning.training.train as train_module
    work = copy_cache(reference_run.work, tmp_path / "w")
    monkeypatch.setattr(train_module, "train_epoch", cuda_oom)
    code, out, err = run_main(*train_argv(tiny, work, 1))
    line = the_error(err)
    assert code == 1 and "out of memory" in line and "smaller --batch-size" in line
    assert "Tried to allocate" not in err and "Traceback" not in err

"""Several processes, one job: torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 4 image_captioning.py train --data DIR ...

torchrun starts one process (a "rank") per GPU, or per CPU slot, and tells each who it is through
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them, or with a
world of one, every helper here is a no-op and the tool runs as the plain single process it always was.
Under torchrun:
  - `session` joins the process group: NCCL with one GPU per rank when CUDA is used, gloo on CPUs, with
    a timeout, so that a peer that died or hangs ends the job instead of blocking it forever;
  - training builds the same global batches on every rank (per-rank batch × world size, one shared
    seeded generator) and each rank trains on its own contiguous part of each (`batch_part`);
  - extraction gives each rank a contiguous, batch-aligned slice of the image list (`shard_range`);
  - rank 0 alone writes files and prints; what only it computes (dev scores) it broadcasts
    (`from_main`), so that learning-rate and stopping decisions are the same on every rank.
Every collective here is entered by all ranks in the same order: that is what keeps them from hanging.
"""
import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist

from captioning.utils import CaptioningError, console, failure_message

DEFAULT_TIMEOUT_S = 1800   # longest a rank waits for the others in one collective (dev scoring, slow slices)


def launched_by_torchrun():
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def active():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if active() else 1


def rank():
    return dist.get_rank() if active() else 0


def is_main():
    return rank() == 0


def backend():
    return dist.get_backend() if active() else None


def _comm_device():
    """NCCL moves only GPU tensors; gloo only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def _device_for_rank(name):
    """'cuda' (this rank's GPU made the current one) or 'cpu', or one clear sentence on what is wrong."""
    if name == "mps":
        raise CaptioningError("torchrun jobs run on CUDA GPUs or CPUs (MPS has no multi-process backend); "
                              "use --device cpu.")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CaptioningError("CUDA was requested but no CUDA GPU is available on this machine; "
                                  "use --device cpu or auto.")
        local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= gpus:
            raise CaptioningError(f"torchrun started more processes on this machine than it has GPUs ({gpus}); "
                                  f"use --nproc-per-node {gpus} or less.")
        torch.cuda.set_device(local)  # one GPU per rank: 'cuda' below means this one
        return "cuda"
    return "cpu"


def _stop_like_ctrl_c(signum, frame):
    # torchrun ends the surviving ranks with SIGTERM when one fails (and on Ctrl-C): stop the way Ctrl-C
    # stops a single process, so that a half-written temporary file is removed, not left behind.
    raise KeyboardInterrupt


def _lost_contact(exc):
    """A collective failed because a peer is gone or too slow (not a bug of this rank)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out", "NCCL", "Gloo")))


@contextlib.contextmanager
def session(device="auto", timeout_s=DEFAULT_TIMEOUT_S):
    """Join torchrun's process group for the duration of a command; yields the device name every stage
    should use ('cuda' or 'cpu' under torchrun, `device` unchanged otherwise). Ranks other than 0 keep
    quiet unless they fail; a failure says which rank failed."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield device
        return
    me, quiet = int(os.environ["RANK"]), console.quiet
    console.quiet = me != 0        # progress bars and messages from rank 0 only
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    try:
        device = _device_for_rank(device)
        kind = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(kind, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", torch.cuda.current_device()) if kind == "nccl" else None)
        yield device
    except KeyboardInterrupt:
        raise
    except Exception as e:
        console.quiet = False      # a failing rank says why
        if _lost_contact(e):
            raise CaptioningError(f"rank {me}: lost contact with the other processes of this job (one stopped, "
                                  f"failed, or did not answer within --dist-timeout {timeout_s:g}s); stopping too. "
                                  "Finished work is saved: run the same command again (train: with --resume).") from e
        raise CaptioningError(f"rank {me}: {failure_message(e)}") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.quiet = quiet
        if active():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


# --- splitting work ----------------------------------------------------------------------------------

def shard_range(n, rank_=None, world=None, align=1):
    """Rows [lo, hi) of this rank's contiguous slice of `n` items. Cuts fall on multiples of `align`
    (whole batches), so every rank runs exactly the batches a single process would; slices differ by at
    most one batch, and a rank may get none when there are fewer batches than ranks."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    blocks = -(-n // align)
    return min(n, blocks * rank_ // world * align), min(n, blocks * (rank_ + 1) // world * align)


def batch_part(idx):
    """This rank's contiguous part of a global batch (a tensor of indices); the parts of all ranks are
    disjoint, cover the batch, and differ in size by at most one."""
    return torch.tensor_split(idx, world_size())[rank()] if world_size() > 1 else idx


def wrap(module, device):
    """DistributedDataParallel around `module` under torchrun (gradients averaged across ranks during
    backward); the module itself otherwise. Save `module`'s state_dict, never the wrapper's."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    # The feature statistics (buffers) are the same on every rank and never change: nothing to broadcast.
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


# --- agreeing --------------------------------------------------------------------------------------

def barrier():
    if world_size() > 1:
        dist.barrier()


def all_sum(*values):
    """The sums over all ranks of a few numbers (e.g. a loss total and a token count)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def from_main(keys, compute):
    """`compute()` (a dict of numbers with `keys`) runs on rank 0 only; every rank returns rank 0's numbers.
    Whatever follows from them (halving the learning rate, the best epoch, stopping early) is then decided
    identically everywhere without another message."""
    if world_size() == 1:
        return compute()
    values = compute() if is_main() else {}
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return dict(zip(keys, t.tolist()))


def check_same(value, message):
    """Raise CaptioningError(message) on every rank unless all ranks hold the same whole number (or bool)."""
    if world_size() == 1:
        return
    t = torch.tensor([int(value or 0), -int(value or 0)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)      # [max, -min]
    if int(t[0]) != -int(t[1]):
        raise CaptioningError(message)

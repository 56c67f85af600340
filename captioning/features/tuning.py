"""Making feature extraction fast on this machine without changing what it computes.

- `fold_batchnorm`: each BatchNorm folded into the convolution before it (same features to float rounding;
  mobilenet_v2 runs 1.6x faster on a CPU).
- `choose_settings`: batch size, memory format, decoding threads or worker processes, compute threads. A CPU
  wants small batches in channels_last layout, and the best batch size differs by encoder and machine, so it
  is measured: the first large extraction spends a few seconds timing forward passes per candidate
  (`calibrate`) and remembers the fastest in `<workdir>/cache/calibration.json`, keyed by encoder, device
  and thread count. Given options always win.
- `CpuShare`: how many cores other programs keep busy, so that extraction uses the ones they leave.
features.py runs the extraction with what this module decides; bench/extract_speed.py measures it.
"""
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from captioning.utils import atomic_write_json, console

CALIBRATE_MIN_IMAGES = 1000   # below this, a few seconds of calibration cannot pay for themselves
CPU_BATCH = 4                 # uncalibrated CPU default: within ~5% of the best for mobilenet_v2/resnet18/50
GPU_BATCH = 64
SHARE_EVERY_S = 5.0           # how often extraction re-checks how busy other programs keep the CPU


@dataclass
class Settings:
    """How one extraction runs, and where each choice came from (shown to the user, used by bench/)."""
    batch_size: int
    channels_last: bool
    workers: int          # DataLoader worker processes (0: none)
    decode_threads: int   # background decoding threads when workers == 0 (0: decode inline)
    threads: int          # torch compute threads
    source: str           # "given", "calibrated", "remembered" or "default"


# --- the encoder, made faster without changing what it computes ---------------------------------------

def fold_batchnorm(module):
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into the convolution's weights and
    bias, in place. The outputs stay the same up to float32 rounding (~1e-6 relative; the cache is fp16),
    but every folded layer saves a full pass over its activations: on a 2-core CPU mobilenet_v2 runs 1.6x
    faster, resnet50 1.2x (bench/README.md). Only pairs whose data flow is known are folded: neighbours
    in an nn.Sequential, and convN -> bnN inside torchvision's ResNet blocks."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    pairs = []
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        pairs = list(zip(names, names[1:]))
    elif isinstance(module, (BasicBlock, Bottleneck)):
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if f"conv{i}" in module._modules]
    for a, b in pairs:
        conv, bn = module._modules[a], module._modules[b]
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training
                and bn.running_mean is not None):
            continue
        with torch.no_grad():
            scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else 0.0
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        module._modules[b] = nn.Identity()
    for child in module.children():
        fold_batchnorm(child)
    return module


# --- sharing the CPU with other programs ------------------------------------------------------------

class CpuShare:
    """How many cores other programs keep busy: all CPU time from /proc/stat minus this process's own
    (Linux; elsewhere it reports 0 and nothing changes). torch's OpenMP threads spin while they wait for
    each other, so next to another busy program N threads on N cores run 1.3-3x slower than fewer
    threads would (bench/threads.py). Extraction therefore uses the cores others leave, re-checked as it
    goes. Worker processes would count as "others": only used when decoding runs in this process."""

    def __init__(self):
        self.last = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
            busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        except (OSError, ValueError, AttributeError):
            return None
        return busy, sum(os.times()[:2]), time.monotonic()

    def others(self):
        """Cores other processes kept busy since the last call (or since this was made)."""
        now = self._read()
        if now is None or self.last is None or now[2] - self.last[2] < 0.05:
            return 0.0
        (busy0, own0, t0), (busy1, own1, t1) = self.last, now
        self.last = now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)

    def threads(self, wanted):
        """Compute threads to use: `wanted`, less one for each core others keep busy (at least one)."""
        return max(1, wanted - int(self.others() + 0.5))


# --- calibration -----------------------------------------------------------------------------------

def _autocast(device):
    """fp16 on CUDA: the cache is fp16 anyway, and tensor cores make it several times faster."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_format(trunk, channels_last):
    return trunk.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def measure_throughput(trunk, crop, device, batch_size, channels_last, min_seconds=0.3, min_batches=2):
    """Images/s of the trunk alone on ready tensors: one warm-up batch (oneDNN builds its kernels for each
    new shape), then the fastest of at least `min_batches` timed batches — the fastest, because a
    background process can only ever slow a batch down."""
    _set_format(trunk, channels_last)
    x = torch.randn(batch_size, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    best, spent, n = float("inf"), 0.0, 0
    with torch.inference_mode(), _autocast(device):
        trunk(x)
        _sync(device)
        while n < min_batches or spent < min_seconds:
            t0 = time.perf_counter()
            trunk(x)
            _sync(device)
            dt = time.perf_counter() - t0
            best, spent, n = min(best, dt), spent + dt, n + 1
    return batch_size / best


def calibrate(trunk, crop, device, budget_s=15.0):
    """Find the fastest batch size and memory format for this trunk on this device.

    Batch sizes are tried in doubling steps (channels_last first: on CPUs it is never much worse) until
    throughput falls clearly below the best so far; then the other memory format at the best size.
    Returns {"batch_size", "channels_last", "images_per_s", "tried": [[batch, channels_last, img/s], ...]}."""
    sizes = [1, 2, 4, 8, 16, 32, 64] if device.type == "cpu" else [16, 32, 64, 128, 256]
    tried, start = [], time.monotonic()
    best = None
    for b in sizes:
        ips = measure_throughput(trunk, crop, device, b, True)
        tried.append([b, True, round(ips, 1)])
        if best is None or ips > best[2]:
            best = (b, True, ips)
        elif ips < 0.85 * best[2] or time.monotonic() - start > budget_s:
            break
    b = best[0]
    ips = measure_throughput(trunk, crop, device, b, False)
    tried.append([b, False, round(ips, 1)])
    if ips > best[2]:
        best = (b, False, ips)
    return {"batch_size": best[0], "channels_last": best[1], "images_per_s": round(best[2], 1), "tried": tried}


def calibration_key(name, device, threads):
    where = device.type + (f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    return f"{name}|{where}|threads={threads}"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: calibrate again rather than fail


def choose_settings(cfg, device, name, trunk, crop, workdir, todo, busy=False):
    """Settings for this extraction (`cfg`: a features.ExtractConfig): what the user gave, else what was
    measured before, else measure now (large jobs on a machine not `busy` with other work, whose timings
    would mislead), else defaults that are near the best on the CPUs measured."""
    on_cpu = device.type == "cpu"
    threads = cfg.threads or torch.get_num_threads()
    cpus = os.cpu_count() or 1
    if cfg.num_workers is not None:
        workers, decode_threads = cfg.num_workers, 0
    elif on_cpu:
        # Decoding takes a fraction of what the CNN does per image, and the CNN's OpenMP threads must not
        # share their cores: a decoder that preempts one of them leaves the others spinning at the next
        # barrier (measured on 2 cores: decoding inline 194 img/s, in a background thread 171, in a worker
        # process 146; bench/README.md). So background decoding only on cores torch leaves free.
        workers = 0
        decode_threads = cfg.decode_threads if cfg.decode_threads is not None else min(4, max(0, cpus - threads))
    else:
        workers, decode_threads = max(1, min(8, cpus - 1)), 0

    batch, channels_last, source = cfg.batch_size, cfg.channels_last, "given"
    if batch is None:
        key = calibration_key(name, device, threads)
        store = Path(workdir) / "cache" / "calibration.json"
        known = _read_json(store).get(key)
        wanted = cfg.calibrate if cfg.calibrate is not None else (todo >= CALIBRATE_MIN_IMAGES and not busy)
        if isinstance(known, dict) and {"batch_size", "channels_last"} <= known.keys():
            batch, source = int(known["batch_size"]), "remembered"
            channels_last = known["channels_last"] if channels_last is None else channels_last
        elif wanted:
            console.print(f"Measuring the fastest settings for {name} on this {device.type} (once, a few seconds)...")
            found = calibrate(trunk, crop, device)
            atomic_write_json(store, {**_read_json(store), key: found})
            batch, source = found["batch_size"], "calibrated"
            channels_last = found["channels_last"] if channels_last is None else channels_last
        else:
            batch, source = (CPU_BATCH if on_cpu else GPU_BATCH), "default"
    if channels_last is None:
        channels_last = device.type != "mps"  # MPS support for channels_last convolutions is patchy
    return Settings(batch, bool(channels_last), workers, decode_threads, threads, source)

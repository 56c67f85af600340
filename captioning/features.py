"""Batched feature extraction with a resumable on-disk cache.

The cache for one (encoder, image list) pair is a folder under `<workdir>/cache/`:
    images.json    the image paths, in row order
    grid.npy       fp16 [N, h*w, C]  spatial features (attention decoder), read memory-mapped
    pooled.npy     fp16 [N, C]       their mean (Show-and-Tell decoder)
    progress.json  how many rows are finished, which images could not be read, whether it is complete
Rows are written in place and `progress.json` is replaced atomically only after they are flushed, so a
killed run leaves a cache whose recorded rows are all valid: the next run continues from there and ends
with exactly the cache an uninterrupted run writes.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .encoders import EncoderSpec, build_encoder, concrete_spec, draft_size_for, load_image
from .utils import CaptioningError, atomic_write_json, add_task, advance_task, console, make_progress

CACHE_VERSION = 1


@dataclass
class ExtractConfig:
    batch_size: int | None = None     # None: the fast setting for the device (CPUs prefer small batches)
    num_workers: int | None = None    # None: decode in background workers, leaving the cores to the CNN
    channels_last: bool | None = None  # None: on for CPU, where it is up to 2x faster for these CNNs
    device: str = "auto"
    flush_every_s: float = 10.0       # how much work a kill can cost at most


def pick_device(name="auto"):
    """CUDA, then Apple's MPS, then CPU — or exactly what the user asked for."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaptioningError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CaptioningError("MPS was requested but is not available on this machine; use --device cpu or auto.")
    return torch.device(name)


def auto_settings(cfg: ExtractConfig, device):
    """Fill in batch size, workers and memory format for this device (measured: see bench/)."""
    cpus = os.cpu_count() or 1
    on_cpu = device.type == "cpu"
    batch = cfg.batch_size or (8 if on_cpu else 64)
    workers = cfg.num_workers if cfg.num_workers is not None else (max(1, min(4, cpus // 2)) if on_cpu else min(8, cpus))
    channels_last = cfg.channels_last if cfg.channels_last is not None else on_cpu
    return batch, workers, channels_last


class ImageFiles(Dataset):
    """Decodes and transforms images in DataLoader workers. An unreadable file yields a flag, not a crash."""

    def __init__(self, paths, transform, start=0):
        self.paths, self.transform, self.start = paths, transform, start
        self.draft = draft_size_for(transform)
        self.crop = int(transform.crop_size[0])

    def __len__(self):
        return len(self.paths) - self.start

    def __getitem__(self, i):
        row = self.start + i
        try:
            return row, self.transform(load_image(self.paths[row], self.draft)), True
        except CaptioningError:
            return row, torch.zeros(3, self.crop, self.crop), False


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not steal the compute threads


def cache_dir_for(workdir, spec: EncoderSpec, paths):
    """Same encoder and same images → same folder, so every command reuses one extraction."""
    key = [CACHE_VERSION, spec.to_dict(), [str(p) for p in paths]]
    if spec.weights_path and os.path.exists(spec.weights_path):
        st = os.stat(spec.weights_path)   # a weights file replaced in place must not reuse old features
        key.append([st.st_size, st.st_mtime_ns])
    h = hashlib.sha1(json.dumps(key).encode()).hexdigest()
    return Path(workdir) / "cache" / f"{spec.name}-{h[:12]}"


@dataclass
class FeatureStore:
    """A finished cache, memory-mapped: rows are read from disk on demand, not loaded whole."""
    folder: Path
    paths: list
    grid: np.ndarray
    pooled: np.ndarray
    bad: set
    grid_hw: tuple

    def row_of(self):
        return {p: i for i, p in enumerate(self.paths)}

    @property
    def grid_size(self):
        return self.grid.shape[1]

    @property
    def channels(self):
        return self.grid.shape[2]


def open_store(folder):
    folder = Path(folder)
    progress = json.loads((folder / "progress.json").read_text())
    if not progress.get("complete"):
        raise CaptioningError(f"The feature cache in {folder} is not finished; run extract again to resume it.")
    paths = json.loads((folder / "images.json").read_text())
    grid = np.load(folder / "grid.npy", mmap_mode="r")
    pooled = np.load(folder / "pooled.npy", mmap_mode="r")
    return FeatureStore(folder, paths, grid, pooled, set(progress.get("bad", [])), tuple(progress["grid_hw"]))


def _probe_shape(trunk, transform, device, channels_last):
    crop = int(transform.crop_size[0])
    x = torch.zeros(1, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        g = trunk(x)
    return g.shape[1], g.shape[2] * g.shape[3], (g.shape[2], g.shape[3])


def extract_features(paths, spec: EncoderSpec, workdir, cfg: ExtractConfig = ExtractConfig()):
    """Encode every image in `paths` once; reuse or resume the cache when it exists. Returns a FeatureStore."""
    paths = [str(p) for p in paths]
    spec = concrete_spec(spec)
    if not paths:
        raise CaptioningError("There are no images to extract features from.")
    folder = cache_dir_for(workdir, spec, paths)
    progress_file = folder / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else None
    if progress and progress.get("complete"):
        console.print(f"Reusing cached features: {folder}")
        return open_store(folder)

    device = pick_device(cfg.device)
    batch, workers, channels_last = auto_settings(cfg, device)
    trunk, transform = build_encoder(spec)
    trunk = trunk.to(device)
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    channels, cells, hw = _probe_shape(trunk, transform, device, channels_last)

    folder.mkdir(parents=True, exist_ok=True)
    if progress is None:  # a fresh cache: allocate the files, then record that zero rows are done
        atomic_write_json(folder / "images.json", paths)
        np.lib.format.open_memmap(folder / "grid.npy", "w+", np.float16, (len(paths), cells, channels)).flush()
        np.lib.format.open_memmap(folder / "pooled.npy", "w+", np.float16, (len(paths), channels)).flush()
        progress = {"version": CACHE_VERSION, "encoder": spec.to_dict(), "done": 0, "bad": [],
                    "grid_hw": list(hw), "complete": False}
        atomic_write_json(progress_file, progress)
    grid = np.load(folder / "grid.npy", mmap_mode="r+")
    pooled = np.load(folder / "pooled.npy", mmap_mode="r+")
    start, bad = progress["done"], list(progress["bad"])
    if start:
        console.print(f"Resuming feature extraction at image {start:,} of {len(paths):,}.")

    loader = DataLoader(ImageFiles(paths, transform, start), batch_size=batch, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if workers else None)

    def checkpoint(done, complete=False):
        grid.flush()
        pooled.flush()  # rows reach the disk before the marker says they exist
        atomic_write_json(progress_file, {**progress, "done": done, "bad": bad, "complete": complete})

    done, last_flush = start, time.monotonic()
    with make_progress() as bar, torch.inference_mode():
        task = add_task(bar, f"Extracting {spec.name}", len(paths), unit="img")
        bar.update(task, completed=start)
        for rows, images, ok in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            g = trunk(images).flatten(2).transpose(1, 2)              # [B, h*w, C]
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            grid[r0:r1] = g.to(torch.float16).cpu().numpy()
            pooled[r0:r1] = g.mean(1).to(torch.float16).cpu().numpy()
            bad += [paths[int(r)] for r, good in zip(rows, ok) if not good]
            done = r1
            advance_task(bar, task, len(rows))
            if time.monotonic() - last_flush > cfg.flush_every_s:
                checkpoint(done)
                last_flush = time.monotonic()
    checkpoint(done, complete=True)
    if bad:
        console.print(f"[yellow]{len(bad)} image(s) could not be read and will be left out.[/]")
    return open_store(folder)

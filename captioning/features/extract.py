"""Batched feature extraction with a resumable on-disk cache (its layout and readers: store.py).

Rows are written in place and `progress.json` is replaced atomically only after they are flushed, so a
killed run leaves a cache whose recorded rows are all valid: the next run continues from there and ends
with the cache an uninterrupted run writes. Under torchrun each rank writes a contiguous slice of whole
batches with its own marker, progress-<first>-<end>.json; rank 0 marks the cache complete once all are
done: the rows one process writes. Both equal to within fp16 rounding, bit for bit only where the runs use
the same number of compute threads (a convolution's sums run in an order that depends on it, and on a busy
CPU extraction uses fewer threads).

Speed (figures in bench/README.md; the choices are made in tuning.py). BatchNorm layers are folded into
the convolutions before them (the same features up to float rounding; mobilenet_v2 1.4-1.6x faster on a CPU).
A CPU wants small batches in channels_last layout, and the best batch size differs by encoder and
machine, so it is measured: the first large extraction spends a few seconds timing forward passes per
candidate setting and remembers the fastest in `<workdir>/cache/calibration.json` (keyed by encoder,
device and thread count). Images are decoded, resized and cropped as uint8 (decoding.py; in background threads only on
cores torch leaves free: on a CPU whose cores all run the CNN, a decoder beside them costs more than it
saves); the conversion to float and the normalisation run per batch, with the same arithmetic as the
encoder's own transform. On a GPU, decoding runs in worker processes and the CNN in fp16.
"""
import contextlib
import json
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from captioning import distributed
from captioning.config import ExtractConfig
from captioning.features.encoders import EncoderSpec, build_encoder, concrete_spec
from captioning.features.decoding import Preprocess, describe_decoding, image_batches
from captioning.features.store import CACHE_VERSION, RowWriter, cache_dir_for, open_store
from captioning.features.tuning import SHARE_EVERY_S, CpuShare, Settings, _autocast, _set_format, choose_settings, fold_batchnorm
from captioning.utils import CaptioningError, atomic_write_json, add_task, advance_task, console, make_progress


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


def _probe_shape(trunk, crop, device, channels_last):
    x = torch.zeros(1, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        g = trunk(x)
    return g.shape[1], g.shape[2] * g.shape[3], (g.shape[2], g.shape[3])


@contextlib.contextmanager
def _torch_threads(n):
    """torch's thread count is process-wide: set it for the extraction only."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


@dataclass
class _Slice:
    """The rows one process writes, [start, len(paths)), and the marker that records how far it got
    (progress.json, or under torchrun a rank's own)."""
    paths: list
    start: int
    marker: object
    progress: dict
    bad: list


@dataclass
class _Encoder:
    """The folded CNN and how it runs here."""
    trunk: torch.nn.Module
    prep: Preprocess
    settings: Settings
    device: torch.device
    label: str
    share: object = None    # CpuShare: follow other programs' load on the CPU, or None
    wanted: int = 1         # compute threads when the CPU is free


def extract_features(paths, spec: EncoderSpec, workdir, cfg: ExtractConfig = ExtractConfig()):
    """Encode every image in `paths` once; reuse or resume the cache when it exists. Returns a FeatureStore."""
    paths = [str(p) for p in paths]
    spec = concrete_spec(spec)
    if not paths:
        raise CaptioningError("There are no images to extract features from.")
    folder = cache_dir_for(workdir, spec, paths, cfg.mirror)
    progress_file = folder / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else None
    sharded = distributed.world_size() > 1   # under torchrun: each rank extracts one slice of the rows
    if sharded:
        distributed.check_same(progress and progress.get("complete"), f"The processes of this job see different "
                               f"feature caches in {folder}: on several machines --workdir must be a shared folder.")
    if progress and progress.get("complete"):
        console.print(f"Reusing cached features: {folder}")
        return open_store(folder)
    if sharded and cfg.calibrate is None:
        # Ranks must batch alike (and each rank's peers would look like other programs' load to a
        # calibration): under torchrun, the given, remembered or default settings.
        cfg = replace(cfg, calibrate=False)
    device = pick_device(cfg.device)
    share = CpuShare() if cfg.threads is None and device.type == "cpu" and not sharded else None  # measures now
    trunk, transform = build_encoder(spec)
    enc = _Encoder(fold_batchnorm(trunk).to(device), Preprocess(transform, cfg.mirror), None, device,
                   spec.name + (" (mirror images)" if cfg.mirror else ""), share, cfg.threads or torch.get_num_threads())
    start = progress["done"] if progress else 0
    threads = share.threads(enc.wanted) if share else enc.wanted
    if threads < enc.wanted:
        console.print(f"Other programs are keeping the CPU busy: extracting with {threads} of {enc.wanted} threads.")
    with _torch_threads(threads):
        enc.settings = choose_settings(cfg, device, spec.name, enc.trunk, enc.prep.crop, workdir, len(paths) - start,
                                       busy=threads < enc.wanted)
        if enc.settings.workers:
            enc.share = None  # worker processes' CPU time would look like other programs' load
        _set_format(enc.trunk, enc.settings.channels_last)
        progress = _allocate(folder, paths, progress, spec, enc)
        part = _my_slice(folder, paths, progress, enc.settings, sharded)
        console.print(f"[dim]Batches of {enc.settings.batch_size}{', channels_last' if enc.settings.channels_last else ''}"
                      f", {describe_decoding(enc.settings)}, {enc.settings.threads} compute thread(s) ({enc.settings.source}).[/]")
        if part.start > (part.progress.get("start", 0)):
            console.print(f"Resuming feature extraction at image {part.start:,} of {len(paths):,}.")
        _run(part, enc, folder, cfg.flush_every_s)
    return _finish(folder, len(paths), enc.settings.batch_size, sharded)


def _allocate(folder, paths, progress, spec, enc):
    """A fresh cache's files, full size, with 0 rows recorded done (rank 0); the progress it starts from."""
    folder.mkdir(parents=True, exist_ok=True)
    channels, cells, hw = _probe_shape(enc.trunk, enc.prep.crop, enc.device, enc.settings.channels_last)
    if progress is None and distributed.is_main():
        atomic_write_json(folder / "images.json", paths)
        np.lib.format.open_memmap(folder / "grid.npy", "w+", np.float16, (len(paths), cells, channels)).flush()
        np.lib.format.open_memmap(folder / "pooled.npy", "w+", np.float16, (len(paths), channels)).flush()
        progress = {"version": CACHE_VERSION, "encoder": spec.to_dict(), "done": 0, "bad": [],
                    "grid_hw": list(hw), "complete": False}
        atomic_write_json(folder / "progress.json", progress)
    distributed.barrier()  # the files exist before any rank writes into them
    return progress or json.loads((folder / "progress.json").read_text())


def _my_slice(folder, paths, progress, settings, sharded):
    """All rows for one process; under torchrun rows [lo, hi) in whole batches, with their own progress
    marker (resumable on their own)."""
    if not sharded:
        return _Slice(paths, progress["done"], folder / "progress.json", progress, list(progress["bad"]))
    distributed.check_same(settings.batch_size, "The processes of this job chose different batch sizes; "
                           "pass --extract-batch-size.")
    lo, hi = distributed.shard_range(len(paths), align=settings.batch_size)
    marker = folder / f"progress-{lo}-{hi}.json"
    mine = json.loads(marker.read_text()) if marker.exists() else {"start": lo, "stop": hi, "done": lo, "bad": []}
    return _Slice(paths[:hi], mine["done"], marker, mine, list(mine["bad"]))


def _finish(folder, n_rows, batch_size, sharded):
    """The finished store; under torchrun once every rank's slice is written."""
    if sharded:
        distributed.barrier()  # every slice is written
        if distributed.is_main():
            _merge_slices(folder, n_rows, batch_size)
        distributed.barrier()
    else:
        _drop_slice_markers(folder)
    store = open_store(folder)
    if store.bad:
        console.print(f"[yellow]{len(store.bad)} image(s) could not be read and will be left out.[/]")
    return store


def _merge_slices(folder, n_rows, batch_size):
    """Rank 0, once every rank has finished its slice: one progress.json exactly as a single process writes
    it (the slices are contiguous and in rank order, so their unreadable images are in row order too)."""
    progress, bad = json.loads((folder / "progress.json").read_text()), []
    for r in range(distributed.world_size()):
        lo, hi = distributed.shard_range(n_rows, r, align=batch_size)
        part = json.loads((folder / f"progress-{lo}-{hi}.json").read_text())
        if not part.get("complete"):
            raise CaptioningError(f"Rows {lo}-{hi} of the feature cache in {folder} are not finished; run again.")
        bad += part["bad"]
    atomic_write_json(folder / "progress.json", {**progress, "done": n_rows, "bad": bad, "complete": True})
    _drop_slice_markers(folder)


def _drop_slice_markers(folder):
    """The per-rank markers of torchrun extractions, once the whole cache is complete (any world size)."""
    for f in folder.glob("progress-*.json"):
        f.unlink(missing_ok=True)


def _run(part: _Slice, enc: _Encoder, folder, flush_every_s):
    """Rows `part.start` to len(part.paths) into the cache; `part.marker` records how far."""
    grid, pooled = RowWriter(folder / "grid.npy"), RowWriter(folder / "pooled.npy")

    def checkpoint(done, complete=False):
        grid.flush()
        pooled.flush()  # rows reach the disk before the marker says they exist
        atomic_write_json(part.marker, {**part.progress, "done": done, "bad": part.bad, "complete": complete})

    paths, done, last_flush = part.paths, part.start, time.monotonic()
    last_share = last_flush
    batches = image_batches(paths, part.start, enc.prep, enc.settings, enc.device)
    try:
        with make_progress() as bar, torch.inference_mode(), _autocast(enc.device):
            task = add_task(bar, f"Extracting {enc.label}", len(paths), unit="img")
            bar.update(task, completed=part.start)
            for rows, images, ok in batches:
                g = enc.trunk(enc.prep.batch(images, enc.device, enc.settings.channels_last)).flatten(2)
                g = g.transpose(1, 2).float()                              # [B, h*w, C]
                grid.write(rows[0], g.to(torch.float16).cpu().numpy())
                pooled.write(rows[0], g.mean(1).to(torch.float16).cpu().numpy())
                part.bad += [paths[r] for r, good in zip(rows, ok) if not good]
                done = rows[-1] + 1
                advance_task(bar, task, len(rows))
                if time.monotonic() - last_flush > flush_every_s:
                    checkpoint(done)
                    last_flush = time.monotonic()
                if enc.share and time.monotonic() - last_share > SHARE_EVERY_S:
                    torch.set_num_threads(enc.share.threads(enc.wanted))  # others started or stopped meanwhile
                    last_share = time.monotonic()
        checkpoint(done, complete=True)
    finally:
        if hasattr(batches, "close"):
            batches.close()  # stop the decoding thread now, not whenever the generator is collected
        grid.close()
        pooled.close()

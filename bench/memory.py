"""Peak memory of feature extraction and of training on all of Flickr8k.

Each job runs in a fresh process whose memory is sampled every 0.2 s from /proc: peak RSS (VmHWM), and
its two parts at their peaks: anonymous memory (Python objects, tensors: what the job really needs) and
file-backed pages (memory-mapped files and libraries: the kernel drops these whenever memory is short,
so they cost page cache, not RAM that other programs lose).
  extract         mobilenet_v2 over all 8,091 photos into a fresh cache, as `extract` runs it
  extract before  the same with captioning/features.py as of commit e2dbc85 (--before; ~4 min more)
  train           `train --decoder attention` for one epoch on the cached features (memory-mapped),
                  validation and dev scoring included; --quick stops the epoch after 100 batches
  feature_stats   the part of training that needs the most memory, now and before (512-image chunks)
  load whole      for scale: the grid cache read into memory instead of memory-mapped

    python -m bench.memory --before     # ~9 min on 2 cores
    python -m bench.memory --quick      # ~1.5 min: 1,000 photos, 100 training batches
"""
import argparse
import os
import sys
import tempfile

from bench.common import FLICKR8K, ROOT, flickr_cache, flickr_images, header, run_sampled, table


def child_extract(n, before):
    from captioning.features.encoders import EncoderSpec
    if before:
        from bench.extract_speed import baseline_module
        module = baseline_module()
    else:
        from captioning.features import extract as module
    with tempfile.TemporaryDirectory() as work:
        module.extract_features(flickr_images(n), EncoderSpec("mobilenet_v2"), work, module.ExtractConfig(device="cpu"))


def child_train(batches):
    import captioning.training.train as T
    from captioning.features.encoders import EncoderSpec
    from captioning.config import ExtractConfig
    from captioning.config import ModelConfig
    if batches:
        make = T.make_batches
        T.make_batches = lambda *a: make(*a)[:batches]
    with tempfile.TemporaryDirectory() as work:
        os.symlink(flickr_cache().parent, os.path.join(work, "cache"))  # the finished cache, read only
        cfg = T.TrainConfig(epochs=1, batch_size=64, lr=5e-4, model=ModelConfig(decoder="attention"))
        T.train(FLICKR8K, work, cfg, EncoderSpec("mobilenet_v2"), ExtractConfig(device="cpu"))


def child_stats(before):
    """store.py's feature_stats over the Flickr8k train images, or as train.py had it before (512 images
    a chunk, their squares in a second float64 temporary of the same size)."""
    import numpy as np
    import torch
    from captioning.data.datasets import load_dataset
    from captioning.features.store import feature_stats, open_store
    store = open_store(flickr_cache())
    row_of = store.row_of()
    rows = torch.tensor(sorted(row_of[str(r.image)] for r in load_dataset(FLICKR8K).split("train")
                               if str(r.image) in row_of))
    if not before:
        return feature_stats(store, rows, True)
    total, sq, n = 0.0, 0.0, 0
    for i in range(0, len(rows), 512):
        x = np.asarray(store.grid[rows[i:i + 512].numpy()], dtype=np.float64).reshape(-1, store.channels)
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    return total / n


def child_load_whole():
    import numpy as np
    grid = np.load(flickr_cache() / "grid.npy")
    print(grid.nbytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", action="store_true", help="also extract with the code of commit e2dbc85")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "extract":
            child_extract(int(rest[0]), rest[1] == "before")
        elif kind == "train":
            child_train(int(rest[0]))
        elif kind == "stats":
            child_stats(rest[0] == "before")
        else:
            child_load_whole()
        return
    header("memory")
    n = 1000 if args.quick else len(flickr_images())
    jobs = [(f"extract, {n:,} photos (after)", ["extract", str(n), "after"])]
    if args.before:
        jobs.append((f"extract, {n:,} photos (before, e2dbc85)", ["extract", str(n), "before"]))
    jobs.append(("train attention, " + ("100 batches" if args.quick else "1 epoch") + " + dev scoring",
                 ["train", "100" if args.quick else "0"]))
    jobs.append(("feature_stats alone (128 images a chunk, squared in place)", ["stats", "after"]))
    jobs.append(("feature_stats alone, before (512 images a chunk, a squares temporary)", ["stats", "before"]))
    jobs.append(("grid cache loaded whole (np.load, no mmap)", ["load"]))
    rows = []
    for label, child in jobs:
        proc, peaks, seconds = run_sampled([sys.executable, "-m", "bench.memory", "--child", *child], cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{label} failed:\n{proc.stderr_text[-2000:]}")
        rows.append([label, f"{peaks.get('VmHWM', 0):,.0f}", f"{peaks.get('RssAnon', 0):,.0f}",
                     f"{peaks.get('RssFile', 0):,.0f}", f"{seconds:.0f}"])
        print(f"  {label}: {seconds:.0f}s", flush=True)
    table("Peak memory, MB (sampled every 0.2 s)", ["job", "peak RSS", "anonymous", "file-backed", "seconds"], rows)


if __name__ == "__main__":
    main()

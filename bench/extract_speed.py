"""Feature extraction speed, images/s from JPEG files on disk to the finished on-disk cache.

Side by side, per encoder, in one run:
  limit      the encoder alone on ready tensors, best of batch {1, 4, 16, 64} x {plain, channels_last},
             as torchvision builds it, and with its BatchNorm folded into the convolutions (as extracted):
             images/s over a second of back-to-back batches (a mean over time, like an extraction's);
             also the fastest single batch (how calibration ranks settings; higher under any noise)
  plain      one image at a time: decode, transform, forward, store (what the seed scripts did)
  before     extract_features as of commit e2dbc85 (batch 8, one worker process, channels_last)
  after      extract_features now, with its automatic (calibrated) settings
The limit is the best of its settings; plain, before and after are each the best of --repeat runs; and
each "after" run against the limit's best setting timed just before it (the median of those ratios).
and, with --ablations (mobilenet_v2 only), the choices the automatic settings make, one at a time.

    python -m bench.extract_speed            # ~10 min on 2 cores
    python -m bench.extract_speed --quick    # ~1.5 min: fewer images and batch sizes
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time

from bench.common import BASELINE, Timer, flickr_images, header, module_at, table

import numpy as np
import torch

from captioning.features import extract as features

from captioning.features import tuning
from captioning.features.encoders import EncoderSpec, build_encoder
from captioning.features.images import load_image
from captioning.config import ExtractConfig
from captioning.features.tuning import choose_settings, fold_batchnorm, measure_throughput
from captioning.utils import atomic_write_json

from bench.naive import plain_extract

ENCODERS = {"mobilenet_v2": "DEFAULT", "resnet18": None, "resnet50": None}  # only mobilenet_v2 has weights here


def baseline_module():
    """captioning/features.py as of BASELINE, loaded beside the current one (None without git)."""
    return module_at(BASELINE, "captioning/features.py")


def timed_extract(module, paths, spec, cfg, work=None):
    """Seconds of extract_features minus building the encoder (a one-off cost the same for every method).
    In a fresh workdir unless one is given (one that holds a remembered calibration, say)."""
    built = []
    real_build = module.build_encoder

    def build(s):
        with Timer() as t:
            out = real_build(s)
        built.append(t.seconds)
        return out
    module.build_encoder = build
    try:
        with tempfile.TemporaryDirectory() as fresh, Timer() as t:
            store = module.extract_features(paths, spec, work or fresh, cfg)
            assert store.grid.shape[0] == len(paths)
    finally:
        module.build_encoder = real_build
    return t.seconds - sum(built)


def remembered_run(paths, spec, name, auto):
    """images/s of extract_features in a fresh workdir that holds the calibration `auto`: the run uses the
    remembered settings, as every run after the first does."""
    with tempfile.TemporaryDirectory() as work:
        atomic_write_json(f"{work}/cache/calibration.json", {
            tuning.calibration_key(name, torch.device("cpu"), auto.threads):
                {"batch_size": auto.batch_size, "channels_last": auto.channels_last}})
        return len(paths) / timed_extract(features, paths, spec, ExtractConfig(device="cpu"), work)


def sustained(trunk, crop, device, batch_size, channels_last, min_seconds=1.0):
    """Images/s of the trunk alone on ready tensors, over batches run back to back for `min_seconds` after
    one warm-up batch: the same statistic as an extraction's images/s (a mean over time), where
    tuning.measure_throughput reports the fastest single batch (right for ranking settings, and higher)."""
    tuning._set_format(trunk, channels_last)
    x = torch.randn(batch_size, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        trunk(x)
        n, t0 = 0, time.perf_counter()
        while n < 2 * batch_size or time.perf_counter() - t0 < min_seconds:
            trunk(x)
            n += batch_size
    return n / (time.perf_counter() - t0)


def limit(trunk, crop, sizes, min_seconds, measure=sustained):
    """The best images/s over batch sizes x memory formats, and its setting (batch, channels_last)."""
    results = {}
    for channels_last in (False, True):
        for b in sizes:
            results[(b, channels_last)] = measure(trunk, crop, torch.device("cpu"), b, channels_last,
                                                  min_seconds=min_seconds)
    best = max(results, key=results.get)
    return results[best], best


def fmt(setting):
    return f"b{setting[0]}{' cl' if setting[1] else ''}"


def plain(paths, trunk, transform):
    trunk = trunk.to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory() as work:
        grid = np.lib.format.open_memmap(f"{work}/grid.npy", "w+", np.float16, (len(paths), 49, trunk_channels(trunk)))
        pooled = np.lib.format.open_memmap(f"{work}/pooled.npy", "w+", np.float16, (len(paths), grid.shape[2]))
        with Timer() as t:
            plain_extract(paths, trunk, transform, grid, pooled)
            grid.flush()
            pooled.flush()
    return len(paths) / t.seconds


def trunk_channels(trunk):
    with torch.inference_mode():
        return trunk(torch.zeros(1, 3, 224, 224)).shape[1]


def decode_table(n):
    """Per-image decoding cost: the Flickr8k copy here is 224x224, the Kaggle originals ~500x375 and a
    phone photo 4032x3024; Pillow's draft mode lets the JPEG decoder skip detail the resize drops."""
    from PIL import Image
    rows = []
    src = Image.open(flickr_images(1)[0]).convert("RGB")
    with tempfile.TemporaryDirectory() as work:
        for size in [(224, 224), (500, 375), (1600, 1200), (4032, 3024)]:
            path = f"{work}/{size[0]}.jpg"
            src.resize(size, Image.BICUBIC).save(path, quality=90)
            reps = max(3, int(n * 224 * 224 / (size[0] * size[1])))
            times = {}
            for label, draft in (("full", None), ("draft", 256)):
                load_image(path, draft)
                with Timer() as t:
                    for _ in range(reps):
                        load_image(path, draft)
                times[label] = t.seconds / reps * 1000
            rows.append([f"{size[0]}x{size[1]}", f"{times['full']:.2f}", f"{times['draft']:.2f}",
                         f"{times['full'] / times['draft']:.1f}x"])
    table("JPEG decoding (load_image), ms per image, 1 thread", ["photo", "full decode", "draft (256)", "speed-up"],
          rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and batch sizes (about 1.5 minutes)")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    ap.add_argument("--images", type=int, help="images per extraction (default 1000, quick 200)")
    ap.add_argument("--ablations", action="store_true", help="also time each automatic choice on its own")
    ap.add_argument("--repeat", type=int, default=3, help="extractions per method, the best reported (default 3)")
    args = ap.parse_args()
    repeat = max(1, args.repeat)
    header("extract_speed")
    n = args.images or (200 if args.quick else 1000)
    sizes = [4, 16] if args.quick else [1, 4, 16, 64]
    paths = flickr_images(n)
    baseline = baseline_module()
    rows, chosen = [], {}
    for name in args.encoders:
        spec = EncoderSpec(name, weights=ENCODERS.get(name, None))
        trunk, transform = build_encoder(spec)
        crop = int(transform.crop_size[0])
        seconds = 0.3 if args.quick else 1.0
        best, setting = limit(trunk, crop, sizes, seconds)             # the trunk as torchvision builds it
        peak, peak_setting = limit(trunk, crop, sizes, seconds, measure_throughput)   # fastest single batch
        plain_ips = max(plain(paths[:max(50, n // 4)], trunk, transform) for _ in range(repeat))
        folded = fold_batchnorm(copy.deepcopy(trunk))                   # as extract_features runs it
        best_folded, setting_folded = limit(folded, crop, sizes, seconds)
        with tempfile.TemporaryDirectory() as work, Timer() as cal:
            auto = choose_settings(ExtractConfig(device="cpu", calibrate=True), torch.device("cpu"), name, folded,
                                   crop, work, n)
        # Best of --repeat runs, as the limit is the best of its settings' runs: one run of a few seconds
        # on a shared machine moves by 10-20% from run to run. And side by side: each run against the
        # limit's best setting timed just before it, so that both meet the same machine (the median ratio).
        afters, paired = [], []
        for _ in range(repeat):
            now_limit = sustained(trunk, crop, torch.device("cpu"), *setting, min_seconds=seconds)
            afters.append(remembered_run(paths, spec, name, auto))
            paired.append(afters[-1] / now_limit)
        after = max(afters)
        before = max(n / timed_extract(baseline, paths, spec, baseline.ExtractConfig(device="cpu"))
                     for _ in range(repeat)) if baseline else None
        rows.append([name, f"{best:.1f} ({fmt(setting)})", f"{peak:.1f} ({fmt(peak_setting)})",
                     f"{best_folded:.1f} ({fmt(setting_folded)})", f"{plain_ips:.1f}", f"{before:.1f}" if before else "-",
                     f"{after:.1f} ({fmt((auto.batch_size, auto.channels_last))})", f"{after / best:.2f}",
                     f"{statistics.median(paired):.2f}", f"{after / peak:.2f}", f"{after / best_folded:.2f}",
                     f"{after / plain_ips:.1f}x", f"{before / best:.2f}" if before else "-", f"{cal.seconds:.1f}"])
        chosen[name] = auto.batch_size
        print(f"  {name}: done", file=sys.stderr)
    table(f"Feature extraction, images/s ({n} Flickr8k photos, JPEG to finished cache)",
          ["encoder", "limit (setting)", "limit, fastest batch", "limit, BN folded", "plain loop", "before",
           "after (setting)", "after/limit", "after/limit, paired runs (median)", "after/fastest-batch limit",
           "after/folded limit", "after/plain", "before/limit", "calibration s"], rows)
    if args.ablations:
        ablations(paths, args.encoders[0], chosen[args.encoders[0]])
    decode_table(20 if args.quick else 60)


def describe(cfg, name):
    """What the automatic settings do on this machine, in words."""
    s = choose_settings(cfg, torch.device("cpu"), name, None, 224, tempfile.gettempdir(), 0)
    decoding = f"{s.decode_threads} decoding thread(s)" if s.decode_threads else "decoding inline"
    return f"{decoding}, {s.threads} torch threads"


def ablations(paths, name, batch):
    """Each automatic choice against its alternatives, the others as chosen automatically."""
    spec = EncoderSpec(name, weights=ENCODERS.get(name))
    other = 16 if batch < 16 else 4
    auto = ExtractConfig(device="cpu", batch_size=batch)
    variants = [
        (f"auto: batch {batch}, channels_last, {describe(auto, name)}", auto),
        ("1 decoding thread beside the CNN's threads", ExtractConfig(device="cpu", batch_size=batch, decode_threads=1)),
        ("1 worker process", ExtractConfig(device="cpu", batch_size=batch, num_workers=1)),
        ("2 worker processes", ExtractConfig(device="cpu", batch_size=batch, num_workers=2)),
        ("1 torch thread", ExtractConfig(device="cpu", batch_size=batch, threads=1)),
        (f"batch {other}", ExtractConfig(device="cpu", batch_size=other)),
        ("contiguous layout", ExtractConfig(device="cpu", batch_size=batch, channels_last=False)),
    ]
    rows = []
    for label, cfg in variants:
        seconds = timed_extract(features, paths, spec, cfg)
        rows.append([label, f"{len(paths) / seconds:.1f}"])
    fold, features.fold_batchnorm = features.fold_batchnorm, lambda trunk: trunk
    try:
        seconds = timed_extract(features, paths, spec, ExtractConfig(device="cpu", batch_size=batch))
        rows.append(["BatchNorm not folded", f"{len(paths) / seconds:.1f}"])
    finally:
        features.fold_batchnorm = fold
    table(f"Extraction settings, {name}, images/s ({len(paths)} photos)", ["setting", "images/s"], rows)


if __name__ == "__main__":
    main()

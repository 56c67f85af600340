"""Captioning a folder of photos, images/s, side by side in one run on the same Flickr8k photos (built-in model,
mobilenet_v2 + soft attention, beam 3):

  encoder limit     the folded encoder alone on ready tensors, best of batch {1, 4, 16} x memory format
                    (bench/extract_speed.py's sustained rate)
  search alone      batched beam search on those photos' features, computed beforehand
  compute stages    both in a row: 1 / (1/encoder + 1/search), what a tool with free decoding and writing gets
  --no-png --jsonl  caption_files as `caption DIR --no-png --jsonl FILE` runs it (decoding, JSONL written),
                    with beam 3 and with the default search (mirror reading, beam 10, consensus re-ranking);
                    and with the search beside the encoder on one torch thread each (the PNG runs' way)
  with PNGs         caption_files as `caption DIR` runs it (a captioned PNG per photo, outputs.PNG_WORKERS
                    drawing processes), the same with the other choice of 1 or 2 drawing processes, and
                    with each batch's search waited for instead of run beside the encoder
  today's code      caption_files and render.py as of commit BEFORE (matplotlib PNGs, batches of 8)
The caption_files figures are timed in this process after the model is loaded (the command adds its ~4 s
start). Targets (issue 15): --no-png >= 0.8x the compute stages; with PNGs >= 3x today's code.

The default search, side by side (issue 25: the new default >= 1.3x the old one's rate): `caption DIR --no-png
--jsonl FILE` with the default search in a fresh process for each checkout in turn, this one and --base (a
checkout of DEFAULT_BEFORE, e.g. `git worktree add /tmp/speed-base 0a24c2a`), alternated for --rounds rounds
(the median of each), timed after the model is loaded, with how many photos got the same first caption.

    python -m bench.caption_folder                                   # 500 photos, ~4 min on 2 cores
    python -m bench.caption_folder --n 100                           # a quick look
    python -m bench.caption_folder --base /tmp/speed-base --default-only --n 300 --rounds 3
"""
import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import flickr_images, header, module_at, table

# Nothing heavier at the top: the drawing processes are spawned, and each imports this module as its
# __main__ first (as `caption DIR`'s do with image_captioning.py, which imports no torch). Importing torch
# here would cost every drawer seconds of CPU that the command does not pay.

BEFORE = "c2c9293"   # the commit before issue 15
DEFAULT_BEFORE = "0a24c2a"   # the default search before issue 25's speed work

# One `caption DIR --no-png --jsonl FILE` in a fresh process on the checkout argv[1]: prints images/s and
# writes the first captions to argv[4]. A few photos first, so that both checkouts find the encoder's
# calibration remembered in the shared workdir and neither pays for it in the timing.
ONE_RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
try:
    from captioning.inference.captioner import Captioner, caption_files
    from captioning.results.outputs import OutputConfig
    from captioning.config import SearchConfig
except ImportError:   # a checkout from before the sub-packages
    from captioning.captioner import Captioner, caption_files
    from captioning.outputs import OutputConfig
    from captioning.search import SearchConfig
root, folder, workdir, out = sys.argv[1:5]
captioner = Captioner.load("default", device="cpu")
photos = sorted(Path(folder).iterdir())
caption_files(captioner, photos[:4], SearchConfig(), OutputConfig(png=False, jsonl=out + ".warm"), workdir=workdir)
t0 = time.perf_counter()
results = caption_files(captioner, [folder], SearchConfig(), OutputConfig(png=False, jsonl=out + ".jsonl"),
                        workdir=workdir)
rate = len(results) / (time.perf_counter() - t0)
Path(out).write_text(json.dumps({r.image: r.captions[0] for r in results}))
print(rate)
"""


def folder_of(photos, root):
    """The photos as one folder of links, as a user's library would be."""
    root.mkdir(parents=True)
    for p in photos:
        (root / p.name).symlink_to(p)
    return root


def search_alone(captioner, photos, cfg):
    """Images/s of batched beam search on ready features of `photos`."""
    import torch
    from captioning.search.numpy_search import SEARCH_BATCH
    from captioning.features.decoding import Preprocess
    trunk, transform = captioner.encoder()
    prep = Preprocess(transform)
    feats = []
    for i in range(0, len(photos), 16):
        images = torch.stack([prep.image(p)[0] for p in photos[i:i + 16]])
        feats.append(captioner.encode_batch(prep.batch(images, captioner.device, True)))
    feats = torch.cat(feats)
    t0 = time.perf_counter()
    for i in range(0, len(feats), SEARCH_BATCH):
        captioner.search(feats[i:i + SEARCH_BATCH], cfg)
    return len(feats) / (time.perf_counter() - t0)


def timed(fn, n):
    t0 = time.perf_counter()
    results = fn()
    assert len(results) == n, f"{len(results)} of {n} photos captioned"
    return n / (time.perf_counter() - t0)


def today(captioner, folder, cfg, out):
    """Images/s of caption_files as of commit BEFORE, drawing with that commit's render.py (matplotlib)."""
    old = module_at(BEFORE, "captioning/captioner.py")
    old_render = module_at(BEFORE, "captioning/render.py")
    if old is None or old_render is None:
        return None
    saved = sys.modules["captioning._flat_render"]
    sys.modules["captioning._flat_render"] = old_render   # the old module imports `.render` when it runs
    try:
        return timed(lambda: old.caption_files(captioner, [folder], cfg, output=out), len(list(folder.iterdir())))
    finally:
        sys.modules["captioning._flat_render"] = saved


@contextlib.contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def search_beside(background, threads=None):
    """caption_files with its batched search run beside the encoder (or waited for), torch on `threads`."""
    import torch
    from captioning.inference import captioner
    from captioning.results import outputs

    class Forced(outputs.Pending):
        def __init__(self, *args, background=None):
            super().__init__(*args, background=forced)
    forced, saved = background, torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        with patched(captioner, "Pending", Forced):
            yield
    finally:
        torch.set_num_threads(saved)


def folder_runs(captioner, folder, cfg, tmp):
    """[(label, images/s)] of caption_files on `folder`, each the way a `caption DIR` option runs it."""
    from captioning.results import outputs
    from captioning.inference.captioner import caption_files
    from captioning.results.outputs import OutputConfig
    from captioning.config import SearchConfig
    workers = outputs.PNG_WORKERS
    other = 2 if workers == 1 else 1     # the other choice, for comparison
    none = contextlib.nullcontext()
    runs = [("caption DIR --no-png --jsonl", cfg, False, none),
            ("caption DIR --no-png --jsonl, the default search (mirror, beam 10, re-ranked)", SearchConfig(), False,
             none),
            ("caption DIR --no-png --jsonl, search beside the encoder, 1 torch thread", cfg, False,
             search_beside(True, threads=1)),
            (f"caption DIR (PNGs, {workers} drawing processes, the default)", cfg, True, none),
            (f"caption DIR (PNGs, {other} drawing process(es))", cfg, True, patched(outputs, "PNG_WORKERS", other)),
            (f"caption DIR (PNGs, {workers} drawing processes, each search waited for)", cfg, True,
             search_beside(False))]
    out = []
    for i, (label, search, png, context) in enumerate(runs):
        opts = OutputConfig(output=str(tmp / f"pngs{i}")) if png else OutputConfig(png=False,
                                                                                 jsonl=str(tmp / f"{i}.jsonl"))
        with context:
            out.append((label, timed(lambda: caption_files(captioner, [folder], search, opts, workdir=tmp),
                                     len(list(folder.iterdir())))))
    return out


def default_side_by_side(folder, base, rounds, tmp):
    """[(label, median images/s, [each round's])] of the default search in fresh processes, this checkout and
    `base` alternated, and the number of photos whose first caption is the same in both."""
    import statistics
    import subprocess
    from bench.common import ROOT
    rates, captions = {"base": [], "now": []}, {}
    for r in range(rounds):
        for side, root in (("base", base), ("now", ROOT)) if r % 2 == 0 else (("now", ROOT), ("base", base)):
            out = tmp / f"{side}{r}.json"
            proc = subprocess.run([sys.executable, "-c", ONE_RUN, str(root), str(folder), str(tmp / "wd"), str(out)],
                                  capture_output=True, text=True, check=True)
            rates[side].append(float(proc.stdout.strip().splitlines()[-1]))
            captions[side] = json.loads(out.read_text())
    same = sum(captions["base"][k] == captions["now"].get(k) for k in captions["base"])
    return [(f"the default search at {DEFAULT_BEFORE} ({base})", statistics.median(rates["base"]), rates["base"]),
            ("the default search now", statistics.median(rates["now"]), rates["now"])], same


def print_side_by_side(folder, base, rounds, tmp):
    import statistics
    from captioning.config import SearchConfig
    cfg = SearchConfig()
    runs, same = default_side_by_side(folder, base, rounds, tmp)
    n = len(list(folder.iterdir()))
    rows = [[label, f"{rate:.1f}", ", ".join(f"{x:.1f}" for x in each), f"{rate / runs[0][1]:.2f}x"]
            for label, rate, each in runs]
    table(f"`caption DIR --no-png --jsonl FILE`, {n} Flickr8k photos, the default search (beam {cfg.rerank_pool}, "
          f"mirror {cfg.mirror}, re-ranked {cfg.rerank}), images/s, {rounds} rounds alternated; same first caption: "
          f"{same}/{n}", ["checkout", "img/s (median)", "each round", "vs before"], rows)
    paired = [now / before for before, now in zip(runs[0][2], runs[1][2])]
    print(f"\nEach round's own ratio, now / before (the two ran next to each other): "
          f"{', '.join(f'{x:.2f}x' for x in paired)}; median {statistics.median(paired):.2f}x")


def main():
    from bench.extract_speed import limit
    from captioning.results import render  # noqa: F401 (today() swaps it for the old one)
    from captioning.search.numpy_search import SEARCH_BATCH
    from captioning.inference.captioner import Captioner
    from captioning.features.decoding import Preprocess
    from captioning.config import SearchConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--base", help=f"a checkout of {DEFAULT_BEFORE}: time its default search beside this one's")
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (each checkout once a round)")
    ap.add_argument("--default-only", action="store_true", help="only the side-by-side default search")
    args = ap.parse_args()
    header("caption_folder")
    photos = flickr_images()[-args.n:]
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            print_side_by_side(folder_of(photos, Path(tmp) / "library"), Path(args.base).resolve(), args.rounds,
                               Path(tmp))
    if args.default_only:
        return
    cfg = SearchConfig(beam_size=3, mirror=False, rerank=False)   # as the old code searches: one reading, beam 3
    captioner = Captioner.load("default", device="cpu")
    trunk, transform = captioner.encoder()
    enc, best = limit(trunk, Preprocess(transform).crop, (1, 4, 16), 1.0)
    search = search_alone(captioner, photos, cfg)
    stages = 1 / (1 / enc + 1 / search)
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder_of(photos, Path(tmp) / "library")
        runs = folder_runs(captioner, folder, cfg, Path(tmp))
        before = today(captioner, folder, cfg, Path(tmp) / "old")
    rows = [["encoder limit (ready tensors, batch %d%s)" % (best[0], ", channels_last" if best[1] else ""),
             f"{enc:.1f}", ""],
            ["beam search alone (batches of %d, beam 3)" % SEARCH_BATCH, f"{search:.1f}", ""],
            ["compute stages in a row", f"{stages:.1f}", "1.00x"]]
    for label, rate in runs:
        ratio = f"{rate / stages:.2f}x of compute stages" if "no-png" in label else \
            f"{rate / before:.1f}x today's" if before else ""
        rows.append([label, f"{rate:.1f}", ratio])
    rows.append([f"today's code ({BEFORE}, PNGs)", f"{before:.1f}" if before else "n/a", "1.0x" if before else ""])
    table(f"Captioning {len(photos)} Flickr8k photos (built-in model, beam 3), images/s", ["path", "img/s", "ratio"],
          rows)


if __name__ == "__main__":
    main()

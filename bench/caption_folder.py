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

    python -m bench.caption_folder            # 500 photos, ~4 min on 2 cores
    python -m bench.caption_folder --n 100    # a quick look
"""
import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bench.common import flickr_images, header, module_at, table

# Nothing heavier at the top: the drawing processes are spawned, and each imports this module as its
# __main__ first (as `caption DIR`'s do with image_captioning.py, which imports no torch). Importing torch
# here would cost every drawer seconds of CPU that the command does not pay.

BEFORE = "c2c9293"   # the commit before issue 15


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


def main():
    from bench.extract_speed import limit
    from captioning.results import render  # noqa: F401 (today() swaps it for the old one)
    from captioning.search.numpy_search import SEARCH_BATCH
    from captioning.inference.captioner import Captioner
    from captioning.features.decoding import Preprocess
    from captioning.config import SearchConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    header("caption_folder")
    photos = flickr_images()[-args.n:]
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

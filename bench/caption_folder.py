"""Captioning a folder of photos, images/s, side by side in one run on the same Flickr8k photos (built-in model,
mobilenet_v2 + soft attention, beam 3):

  encoder limit     the folded encoder alone on ready tensors, best of batch {1, 4, 16} x memory format
                    (bench/extract_speed.py's sustained rate)
  search alone      batched beam search on those photos' features, computed beforehand
  compute stages    both in a row: 1 / (1/encoder + 1/search), what a tool with free decoding and writing gets
  --no-png --jsonl  caption_files as `caption DIR --no-png --jsonl FILE` runs it (decoding, JSONL written),
                    with beam 3 and with the default search (mirror reading, beam 10, consensus re-ranking)
  with PNGs         caption_files as `caption DIR` runs it (a captioned PNG per photo, outputs.PNG_WORKERS
                    drawing processes), and the same with the other choice of 1 or 2 drawing processes
  today's code      caption_files and render.py as of commit BEFORE (matplotlib PNGs, batches of 8)
The caption_files figures are timed in this process after the model is loaded (the command adds its ~4 s
start). Targets (issue 15): --no-png >= 0.8x the compute stages; with PNGs >= 3x today's code.

    python -m bench.caption_folder            # 500 photos, ~4 min on 2 cores
    python -m bench.caption_folder --n 100    # a quick look
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import flickr_images, header, module_at, table

import torch

from bench.extract_speed import limit
from captioning.captioner import SEARCH_BATCH, Captioner, caption_files
from captioning.features import Preprocess
from captioning import render  # noqa: F401 (today() swaps it for the old one)
from captioning import outputs
from captioning.outputs import OutputConfig
from captioning.search import SearchConfig

BEFORE = "c2c9293"   # the commit before issue 15


def folder_of(photos, root):
    """The photos as one folder of links, as a user's library would be."""
    root.mkdir(parents=True)
    for p in photos:
        (root / p.name).symlink_to(p)
    return root


def search_alone(captioner, photos, cfg):
    """Images/s of batched beam search on ready features of `photos`."""
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
    saved = sys.modules["captioning.render"]
    sys.modules["captioning.render"] = old_render   # the old module imports `.render` when it runs
    try:
        return timed(lambda: old.caption_files(captioner, [folder], cfg, output=out), len(list(folder.iterdir())))
    finally:
        sys.modules["captioning.render"] = saved


def main():
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
        tmp = Path(tmp)
        folder = folder_of(photos, tmp / "library")
        n = len(photos)
        no_png = timed(lambda: caption_files(captioner, [folder], cfg, outputs=OutputConfig(
            png=False, jsonl=str(tmp / "out.jsonl")), workdir=tmp), n)
        pngs = timed(lambda: caption_files(captioner, [folder], cfg, OutputConfig(output=str(tmp / "pngs")),
                                           workdir=tmp), n)
        default = timed(lambda: caption_files(captioner, [folder], SearchConfig(), outputs=OutputConfig(
            png=False, jsonl=str(tmp / "default.jsonl")), workdir=tmp), n)
        workers = outputs.PNG_WORKERS
        other = outputs.PNG_WORKERS = 2 if workers == 1 else 1     # the other choice, for comparison
        one_drawer = timed(lambda: caption_files(captioner, [folder], cfg, OutputConfig(output=str(tmp / "pngs1")),
                                                 workdir=tmp), n)
        outputs.PNG_WORKERS = workers
        before = today(captioner, folder, cfg, tmp / "old")
    rows = [["encoder limit (ready tensors, batch %d%s)" % (best[0], ", channels_last" if best[1] else ""),
             f"{enc:.1f}", ""],
            ["beam search alone (batches of %d, beam 3)" % SEARCH_BATCH, f"{search:.1f}", ""],
            ["compute stages in a row", f"{stages:.1f}", "1.00x"],
            ["caption DIR --no-png --jsonl", f"{no_png:.1f}", f"{no_png / stages:.2f}x of compute stages"],
            ["caption DIR --no-png --jsonl, the default search (mirror, beam 10, re-ranked)", f"{default:.1f}",
             f"{default / no_png:.2f}x of beam 3"],
            [f"caption DIR (PNGs, {workers} drawing process(es), the default)", f"{pngs:.1f}",
             f"{pngs / before:.1f}x today's" if before else ""],
            [f"caption DIR (PNGs, {other} drawing process(es))", f"{one_drawer:.1f}",
             f"{one_drawer / before:.1f}x today's" if before else ""],
            [f"today's code ({BEFORE}, PNGs)", f"{before:.1f}" if before else "n/a", "1.0x" if before else ""]]
    table(f"Captioning {n} Flickr8k photos (built-in model, beam 3), images/s", ["path", "img/s", "ratio"], rows)


if __name__ == "__main__":
    main()

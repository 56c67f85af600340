"""Beam search speed (beam 3) over the Flickr8k test images' cached features, batched vs one at a time.

Side by side, in one run: captioning/search.py's beam_search on batches of B images (B = 1 is one image
at a time; evaluate.py uses 100), images/s, speed-up over B = 1, and whether every caption is the same
as the one-at-a-time caption. Greedy search (what training runs on 1,000 dev images every epoch) too.
Before: search.py and the attention step of models.py as of commit SESSION_BASE (finished images stayed
in the batch until the last one was done; attention's weighted sum as a product tensor), same images.

    python -m bench.beam_speed                       # ~2 min on 2 cores: 1,000 test images
    python -m bench.beam_speed --quick               # ~30 s: 200 images
    python -m bench.beam_speed --model path/best.pt  # default: ../runs/att and ../runs/lstm, else the built-in model
"""
import argparse
import copy
import types

from bench.common import FLICKR8K, SESSION_BASE, Timer, checkpoint, flickr_cache, header, module_at, table

import torch

from captioning.inference.captioner import Captioner
from captioning.training.checkpoint import load_checkpoint
from captioning.data.datasets import load_dataset
from captioning.models.attention import AttentionDecoder
from captioning.config import SearchConfig
from captioning.search.torch_search import beam_search
from captioning.features.store import load_features, open_store


def before(decoder):
    """(beam_search, decoder) as of SESSION_BASE: its search.py, and for the attention decoder its _attend
    (bound to a shallow copy that shares the weights), or None without git."""
    search, models = module_at(SESSION_BASE, "captioning/search.py"), module_at(SESSION_BASE, "captioning/models.py")
    if search is None or models is None:
        return None
    if isinstance(decoder, AttentionDecoder):
        decoder = copy.copy(decoder)
        decoder._attend = types.MethodType(models.AttentionDecoder._attend, decoder)
    return search.beam_search, decoder


def captions_at(decoder, feats, batch, cfg, search=beam_search):
    out = []
    for i in range(0, feats.shape[0], batch):
        out += [tuple(h[0].tokens) for h in search(decoder, feats[i:i + batch], cfg)]
    return out


def bench_model(path, n, batches, before_batches):
    captioner = Captioner(load_checkpoint(path), "cpu", source=path)
    decoder = captioner.decoder
    store = open_store(flickr_cache(captioner.spec.name))
    row_of = store.row_of()
    test = [r for r in load_dataset(FLICKR8K).split("test") if str(r.image) in row_of][:n]
    feats = load_features(store, torch.tensor([row_of[str(r.image)] for r in test]), decoder.uses_grid, "cpu")
    rows = []
    old = before(decoder)
    for label, cfg in (("beam 3", SearchConfig(beam_size=3)), ("greedy", SearchConfig(beam_size=1))):
        reference = None
        runs = [("now", beam_search, decoder, batches)]
        if old:
            runs.append((f"before ({SESSION_BASE})", old[0], old[1], before_batches))
        for when, search, dec, sizes in runs:
            base = None
            for b in sizes:
                captions_at(dec, feats[:min(b, 8)], b, cfg, search)  # warm-up (oneDNN kernels for new shapes)
                with Timer() as t:
                    got = captions_at(dec, feats, b, cfg, search)
                reference = reference or got
                base = base or t.seconds
                same = sum(a == c for a, c in zip(got, reference))
                rows.append([f"{captioner.config.decoder}, {label}", when, "one at a time" if b == 1 else b,
                             f"{len(test) / t.seconds:.1f}", f"{base / t.seconds:.1f}x", f"{same}/{len(test)}"])
                print(f"  {label} {when} batch {b}: {t.seconds:.1f}s", flush=True)
    return rows, len(test)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", nargs="+", help="checkpoint(s) (default: the lead's attention and lstm runs)")
    ap.add_argument("--images", type=int, help="test images (default 1000, quick 200)")
    args = ap.parse_args()
    header("beam_speed")
    n = args.images or (200 if args.quick else 1000)
    models = args.model or [p for p in (checkpoint("att"), checkpoint("lstm")) if p]
    if not models:
        raise SystemExit("No checkpoint: pass --model PATH (e.g. from 'python image_captioning.py train').")
    batches = [1, 10, 100, 250] if args.quick else [1, 10, 100, 250, 1000]
    rows = []
    for path in models:
        got, n = bench_model(path, n, [b for b in batches if b <= n], [b for b in (1, 100, 1000) if b <= n])
        rows += got
    table(f"Caption search over {n} Flickr8k test images (cached features), {torch.get_num_threads()} threads",
          ["model, search", "code", "images per batch", "images/s", "vs one at a time (same code)",
           "same captions as now, one at a time"], rows)


if __name__ == "__main__":
    main()

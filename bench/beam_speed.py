"""Beam search speed (beam 3) over the Flickr8k test images' cached features, batched vs one at a time.

Side by side, in one run: captioning/search.py's beam_search on batches of B images (B = 1 is one image
at a time; evaluate.py uses 100), images/s, speed-up over B = 1, and whether every caption is the same
as the one-at-a-time caption. Greedy search (what training runs on 1,000 dev images every epoch) too,
and search.py before it set the image-side state aside (ReorderAll below), on the same images.

    python -m bench.beam_speed                       # ~2 min on 2 cores: 1,000 test images
    python -m bench.beam_speed --quick               # ~30 s: 200 images
    python -m bench.beam_speed --model path/best.pt  # default: ../runs/att and ../runs/lstm, else the built-in model
"""
import argparse

from bench.common import FLICKR8K, Timer, checkpoint, flickr_cache, header, table

import torch

from captioning.captioner import Captioner
from captioning.checkpoint import load_checkpoint
from captioning.datasets import load_dataset
from captioning.features import open_store
from captioning.search import SearchConfig, beam_search
from captioning.train import load_features


class ReorderAll:
    """search.py as it was before: the image-side state (the grid, its attention keys, the Show-and-Tell
    image embedding) reordered with the beams at every step like h and c, though it is the same for the
    K beams of an image. Hiding the decoder's `per_image` keys from beam_search does just that."""
    per_image = ()

    def __init__(self, decoder):
        self.decoder = decoder

    def init_state(self, features):
        return self.decoder.init_state(features)

    def step(self, tokens, state):
        return self.decoder.step(tokens, state)


def captions_at(decoder, feats, batch, cfg):
    out = []
    for i in range(0, feats.shape[0], batch):
        out += [tuple(h[0].tokens) for h in beam_search(decoder, feats[i:i + batch], cfg)]
    return out


def bench_model(path, n, batches, before_batches):
    captioner = Captioner(load_checkpoint(path), "cpu", source=path)
    decoder = captioner.decoder
    store = open_store(flickr_cache(captioner.spec.name))
    row_of = store.row_of()
    test = [r for r in load_dataset(FLICKR8K).split("test") if str(r.image) in row_of][:n]
    feats = load_features(store, torch.tensor([row_of[str(r.image)] for r in test]), decoder.uses_grid, "cpu")
    rows = []
    for label, cfg in (("beam 3", SearchConfig(beam_size=3)), ("greedy", SearchConfig(beam_size=1))):
        reference, base = None, None
        for b in batches:
            captions_at(decoder, feats[:min(b, 8)], b, cfg)  # warm-up (oneDNN kernels for new shapes)
            with Timer() as t:
                got = captions_at(decoder, feats, b, cfg)
            reference = reference or got
            base = base or t.seconds
            same = sum(a == c for a, c in zip(got, reference))
            rows.append([f"{captioner.config.decoder}, {label}", "one at a time" if b == 1 else b,
                         f"{len(test) / t.seconds:.1f}", f"{base / t.seconds:.1f}x", f"{same}/{len(test)}"])
            print(f"  {label} batch {b}: {t.seconds:.1f}s", flush=True)
        for b in before_batches:
            with Timer() as t:
                got = captions_at(ReorderAll(decoder), feats, b, cfg)
            same = sum(a == c for a, c in zip(got, reference))
            rows.append([f"{captioner.config.decoder}, {label}", f"{b}, image state reordered too (before)",
                         f"{len(test) / t.seconds:.1f}", f"{base / t.seconds:.1f}x", f"{same}/{len(test)}"])
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
        got, n = bench_model(path, n, [b for b in batches if b <= n], [b for b in (100, 1000) if b <= n])
        rows += got
    table(f"Caption search over {n} Flickr8k test images (cached features), {torch.get_num_threads()} threads",
          ["model, search", "images per batch", "images/s", "vs one at a time", "same captions"], rows)


if __name__ == "__main__":
    main()

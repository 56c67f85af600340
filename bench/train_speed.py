"""Decoder training speed on cached Flickr8k features (mobilenet_v2, memory-mapped), both decoders.

Side by side, in one run, each from the same initial weights on the same captions:
  naive          random batches, every caption padded to the longest (32 tokens), the decoder and the
                 vocabulary projection run on every padded position (bench/naive.py)
  naive before   the same with bench/naive.py as of commit NAIVE_BEFORE (it reached into the decoders'
                 private layers; now it goes through the decoder contract): the same arithmetic, timed
  length-bucket  batches of captions of equal length, packed: nothing runs on padding (captioning/train.py)
  image-grouped  batches of whole images (all 5 captions of each), the image-side work once per image,
                 padded steps skipped (captioning/train.py; the attention decoder's default)
Reported: seconds per epoch (scaled to the full 30,000-caption epoch), real caption tokens/s, speed-up
over naive, the losses after the same number of epochs (train, and dev on the same captions through the
same evaluator) — faster must not mean worse — and the dev loss each fast variant reaches when it trains
for as long as the naive one took (more epochs in the same time).
Also: AdamW's optimizer step, default vs fused=True (what train.py uses where torch has it).

    python -m bench.train_speed             # ~5 min on 2 cores (600 train images, 2 epochs)
    python -m bench.train_speed --quick     # ~40 s (200 images, 1 epoch)
"""
import argparse
import math
import random

from bench.common import FLICKR8K, Timer, flickr_cache, header, module_at, table

import torch

from captioning.data.datasets import load_dataset
from captioning.config import ModelConfig
from captioning.models.decoders import build_decoder
from captioning.features.store import feature_stats, load_unique, open_store
from captioning.config import TrainConfig
from captioning.training.objectives import decoder_loss, image_batches, length_buckets
from captioning.features.prepare import encode_split
from captioning.training.optim import make_optimizer, optimizer_step
from captioning.training.validation import validation_loss
from captioning.data.vocab import Vocabulary

from bench.naive import naive_train_epoch

FULL_EPOCH = 30000  # Flickr8k's train captions
NAIVE_BEFORE = "b1b00f1"   # the last commit whose bench/naive.py used the decoders' private layers


def fast_epoch(decoder, optimizer, store, data, batches, cfg):
    """captioning/train.py's train_epoch, with the batching passed in (so both kinds can be timed)."""
    decoder.train()
    total, count = 0.0, 0
    for idx in batches:
        feats, index = load_unique(store, data.rows[idx], decoder.uses_grid, torch.device("cpu"))
        width = int(data.lengths[idx].max())
        loss, n = decoder_loss(decoder, feats, data.tokens[idx, :width], data.lengths[idx], cfg, index)
        optimizer_step(loss, optimizer, decoder.parameters(), cfg.clip)
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def setup(n_images, n_val, seed=0):
    folder = flickr_cache()
    if folder is None:
        raise SystemExit("No finished Flickr8k mobilenet_v2 feature cache under ../runs/f8k/cache; run "
                         "'python image_captioning.py extract --data ../shared/datasets/flickr8k --encoder "
                         "mobilenet_v2 --workdir ../runs/f8k' first.")
    store = open_store(folder)
    dataset = load_dataset(FLICKR8K)
    row_of = store.row_of()
    records = [r for r in dataset.records if str(r.image) in row_of]
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    vocab = Vocabulary.build((c for r in train for c in r.captions), min_count=5)  # as train.py: all of train
    rng = random.Random(seed)
    train, val = rng.sample(train, min(n_images, len(train))), rng.sample(val, min(n_val, len(val)))
    return store, vocab, encode_split(train, vocab, row_of, 30), encode_split(val, vocab, row_of, 30)


def run_variant(kind, decoder_name, store, vocab, data, val, epochs, batch_size, stats, budget=None):
    """Train `epochs` epochs; returns (fastest epoch's seconds, last train loss, dev loss, dev loss after
    `budget` seconds of training in all — the naive run's time: what the same wait buys — or None)."""
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=batch_size)
    cfg.model = ModelConfig(decoder=decoder_name, vocab_size=len(vocab), feat_dim=store.channels)
    decoder = build_decoder(cfg.model)
    decoder.norm.set_stats(*stats[decoder.uses_grid])
    # Naive: the plain optimizer; the fast paths: train.py's (fused AdamW where torch has it).
    optimizer = (torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
                 if kind.startswith("naive") else make_optimizer(decoder.parameters(), cfg))
    generator = torch.Generator().manual_seed(0)
    seconds, loss, val_loss, same_time = [], math.nan, None, None
    while len(seconds) < epochs or (budget and sum(seconds) < budget):
        with Timer() as t:
            if kind.startswith("naive"):
                # Full width: the tokens tensor is padded to the longest caption in the data set.
                epoch = naive_train_epoch if kind == "naive" else \
                    module_at(NAIVE_BEFORE, "bench/naive.py").naive_train_epoch
                loss = epoch(decoder, optimizer, store, data, batch_size, generator, cfg.clip, cfg.att_reg)
            else:
                make = image_batches if kind == "image-grouped" else length_buckets
                batches = make(data.rows if make is image_batches else data.lengths, batch_size, generator)
                loss = fast_epoch(decoder, optimizer, store, data, batches, cfg)
        seconds.append(t.seconds)
        if len(seconds) == epochs:
            val_loss = validation_loss(decoder, store, val, cfg, torch.device("cpu"))
            epoch_loss = loss
    if budget and len(seconds) > epochs:
        same_time = (len(seconds), validation_loss(decoder, store, val, cfg, torch.device("cpu")))
    return min(seconds[:epochs]), epoch_loss, val_loss, same_time


def optimizer_table(store, vocab, steps=30):
    """AdamW's step on the attention decoder's parameters: the default (foreach) vs fused=True."""
    rows = []
    for label, kw in (("AdamW (default, foreach)", {}), ("AdamW fused=True", {"fused": True})):
        torch.manual_seed(0)
        decoder = build_decoder(ModelConfig(decoder="attention", vocab_size=len(vocab), feat_dim=store.channels))
        for p in decoder.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        try:
            opt = torch.optim.AdamW(decoder.parameters(), lr=4e-4, weight_decay=1e-4, **kw)
        except (RuntimeError, TypeError) as e:
            rows.append([label, f"unavailable: {e}"])
            continue
        opt.step()
        with Timer() as t:
            for _ in range(steps):
                opt.step()
        rows.append([label, f"{t.seconds / steps * 1000:.1f}"])
    n = sum(p.numel() for p in decoder.parameters())
    table(f"Optimizer step, attention decoder ({n / 1e6:.1f}M parameters), ms per step", ["optimizer", "ms"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, help="train images (5 captions each; default 600, quick 200)")
    ap.add_argument("--epochs", type=int, help="default 2, quick 1")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--decoders", nargs="+", default=["lstm", "attention"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header("train_speed")
    n_images = args.images or (200 if args.quick else 600)
    epochs = args.epochs or (1 if args.quick else 2)
    store, vocab, data, val = setup(n_images, 100 if args.quick else 300)
    stats = {g: feature_stats(store, data.rows, g) for g in (False, True)}
    tokens = int((data.lengths - 1).sum())
    scale = FULL_EPOCH / len(data.lengths)
    before = f"naive, {NAIVE_BEFORE}'s code"
    plans = {"lstm": [("naive", 32), (before, 32), ("length-bucket", 32)],
             "attention": [("naive", 64), (before, 64), ("length-bucket", 64), ("image-grouped", 64)]}
    rows = []
    for name in args.decoders:
        base = budget = None
        for kind, batch in plans[name]:
            seconds, loss, val_loss, same_time = run_variant(kind, name, store, vocab, data, val, epochs, batch,
                                                             stats, None if kind == before else budget)
            base = base or seconds
            budget = budget or seconds * epochs
            later = f"{same_time[1]:.3f} ({same_time[0]} epochs)" if same_time else "-"
            rows.append([name, kind, batch, f"{seconds * scale:.0f}", f"{tokens / seconds:,.0f}",
                         f"{base / seconds:.2f}x", f"{loss:.3f}", f"{val_loss:.3f}", later])
            print(f"  {name} {kind}: {seconds:.1f}s", flush=True)
    table(f"Decoder training on {len(data.lengths):,} captions of {n_images} images, {epochs} epoch(s) each "
          f"(s/epoch scaled to {FULL_EPOCH:,} captions), {torch.get_num_threads()} threads",
          ["decoder", "batching", "batch", "s/epoch", "tokens/s", "vs naive", f"train loss, epoch {epochs}",
           f"dev loss, epoch {epochs}", "dev loss in naive's time"], rows)
    optimizer_table(store, vocab)


if __name__ == "__main__":
    main()

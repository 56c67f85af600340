"""Decoder training on cached features: teacher forcing, dev scores every epoch, best/last checkpoints.

Batches are bucketed by caption length, so almost no step is spent on padding. After each epoch the dev
split is captioned greedily and scored (BLEU-4, CIDEr-D); `best.pt` is the epoch with the best dev
CIDEr-D, the learning rate halves when it stalls, and training stops early when it stops improving.
`last.pt` holds everything needed to resume exactly: weights, optimiser, scheduler, RNG, history.

Under torchrun (captioning/distributed.py) every rank trains on its part of each global batch with
DistributedDataParallel; rank 0 alone scores the dev split, shares the scores and writes the files.
"""
import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from . import distributed
from .checkpoint import load_checkpoint, models_dir, save_checkpoint
from .datasets import load_dataset
from .encoders import EncoderSpec, concrete_spec
from .evaluate import score_captions
from .features import ExtractConfig, extract_features, pick_device
from .models import AttentionDecoder, ModelConfig, build_decoder, caption_loss
from .search import greedy_search
from .store import feature_stats, load_features, load_unique
from .utils import CaptioningError, add_task, advance_task, console, make_progress
from .vocab import PAD, Vocabulary, tokenize


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 4e-4
    weight_decay: float = 1e-4
    clip: float = 5.0              # gradient-norm clipping: LSTMs occasionally spike
    label_smoothing: float = 0.0
    att_reg: float = 1.0           # weight of the doubly stochastic attention penalty
    min_count: int = 5             # words seen fewer times in train become <unk>
    max_words: int = 30            # longer captions are truncated (a few outliers in COCO)
    patience: int = 4              # epochs without a better dev CIDEr-D before stopping early
    lr_patience: int = 1           # epochs without improvement before halving the learning rate
    dev_images: int = 1000         # dev images decoded each epoch (scored against all their references)
    seed: int = 0
    amp: bool | None = None        # mixed precision on CUDA (None: on); ignored elsewhere
    compile: bool = False          # torch.compile the decoder (worth it on GPUs for long runs)
    model: ModelConfig = field(default_factory=ModelConfig)


RUNTIME = ("epochs", "amp", "compile")   # how to run, not what to learn: --resume takes them from the command


@dataclass
class CaptionData:
    """Every caption of a split as token ids, with the feature row of its image."""
    tokens: torch.Tensor    # [N, max_words + 2] int64: <start> words <end> <pad>...
    lengths: torch.Tensor   # [N] tokens including <start> and <end>
    rows: torch.Tensor      # [N] feature rows


def encode_split(records, vocab, row_of, max_words):
    seqs, rows = [], []
    for r in records:
        for c in r.captions:
            ids = vocab.encode(tokenize(c))[:max_words]
            if ids:
                seqs.append([1] + ids + [2])
                rows.append(row_of[str(r.image)])
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    return CaptionData(tokens, torch.tensor([len(s) for s in seqs]), torch.tensor(rows))


def length_buckets(lengths, batch_size, generator):
    """Batches of captions of (nearly) equal length, in random order: the fused nn.LSTM then runs few,
    full time steps. Shuffle, stable-sort by length, cut into batches, shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=generator)
    order = perm[torch.sort(lengths[perm], stable=True).indices]
    batches = list(torch.split(order, batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def make_batches(decoder, data, batch_size, generator):
    """Per decoder, the batching measured fastest on a CPU (bench/train_speed.py): the attention decoder's
    cost is mostly per image, Show-and-Tell's mostly per time step."""
    if decoder.uses_grid:
        return image_batches(data.rows, batch_size, generator)
    return length_buckets(data.lengths, batch_size, generator)


def image_batches(rows, batch_size, generator):
    """Batches of about `batch_size` captions made of whole images: all captions of a few random images.

    The image-side work (feature projection, attention keys) then runs once per image instead of once per
    caption — 5x less of the costliest part on Flickr8k and COCO. Padding costs nothing either way: the
    decoders skip padded positions (packed sequences, shrinking batches)."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    per_batch = max(1, round(batch_size * len(uniq) / len(rows)))
    by_image = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=len(uniq))
    groups = torch.split(by_image, counts.tolist())
    order = torch.randperm(len(uniq), generator=generator).tolist()
    return [torch.cat([groups[i] for i in order[j:j + per_batch]]) for j in range(0, len(order), per_batch)]


def make_optimizer(params, cfg):
    """AdamW, fused where this torch has it for the device: one kernel over all parameters instead of
    several per tensor (attention decoder on 2 CPU cores: 3.9 against 8.7 ms a step, bench/train_speed.py).
    Its state is the same as the plain optimizer's, so checkpoints resume under either."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):   # torch < 2.4 on CPU, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def decoder_loss(decoder, feats, batch_tokens, batch_lengths, cfg: TrainConfig, image_index=None, weights=(1.0, 1.0)):
    """Mean cross-entropy per token (+ the attention penalty, a mean per caption), times `weights`:
    (token, caption) weights that make a rank's loss its share of the whole global batch's."""
    logits, targets, alphas = decoder(feats, batch_tokens, batch_lengths, image_index)
    loss = caption_loss(logits, targets, cfg.label_smoothing) * weights[0]
    if alphas is not None and cfg.att_reg:
        loss = loss + cfg.att_reg * AttentionDecoder.attention_penalty(alphas) * weights[1]
    return loss, len(targets)


def amp_dtype(device, amp):
    """The autocast type for training: None (float32) off CUDA or with --no-amp; else bf16 where the GPU
    has it (no loss scaling needed), fp16 with a GradScaler where not."""
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def validation_loss(decoder, store, data, cfg, device):
    decoder.eval()
    total, count = 0.0, 0
    # 160 captions (32 images) a batch: 320 made validation the peak of a training run's memory
    # (attention, Flickr8k: 925 against 804 MB anonymous; bench/memory.py), at no cost in speed.
    for idx in image_batches(data.rows, 160, torch.Generator().manual_seed(0)):
        feats, index = load_unique(store, data.rows[idx], decoder.uses_grid, device)
        width = int(data.lengths[idx].max())
        logits, targets, _ = decoder(feats, data.tokens[idx, :width].to(device), data.lengths[idx].to(device), index)
        total += float(caption_loss(logits, targets)) * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.inference_mode()
def caption_rows(decoder, store, rows, vocab, device, batch=100):
    """Greedy captions for feature rows, as text. Batches of 100 images search as fast as larger ones
    (bench/beam_speed.py) with less memory than 256 did."""
    decoder.eval()
    out = []
    for i in range(0, len(rows), batch):
        feats = load_features(store, torch.as_tensor(rows[i:i + batch]), decoder.uses_grid, device)
        out += [vocab.decode(h.tokens) for h in greedy_search(decoder, feats)]
    return out


def dev_scores(decoder, store, records, vocab, row_of, device, limit):
    records = records[:limit]
    captions = caption_rows(decoder, store, [row_of[str(r.image)] for r in records], vocab, device)
    cands = {i: c for i, c in enumerate(captions)}
    refs = {i: r.captions for i, r in enumerate(records)}
    s = score_captions(cands, refs, metrics=("BLEU", "CIDEr"), use_java=False)
    return {"BLEU-4": s["BLEU-4"], "CIDEr-D": s["CIDEr-D"]}


def prepare(data_dir, workdir, spec: EncoderSpec, extract_cfg: ExtractConfig):
    """Dataset records (with a readable image) and their feature store, extracting when needed."""
    dataset = load_dataset(data_dir)
    if dataset.missing:
        console.print(f"[yellow]{dataset.missing:,} image(s) listed in the dataset are missing and were skipped.[/]")
    if dataset.skipped:
        what = "photo(s) without a .txt caption" if dataset.layout == "sidecars" else "broken annotation row(s)"
        console.print(f"[yellow]{dataset.skipped:,} {what} skipped.[/]")
    paths = sorted({str(r.image) for r in dataset.records})
    store = extract_features(paths, spec, workdir, extract_cfg)
    records = [r for r in dataset.records if str(r.image) not in store.bad]
    return dataset, records, store


def train(data_dir, workdir=".", cfg: TrainConfig = TrainConfig(), spec: EncoderSpec = EncoderSpec(),
          extract_cfg: ExtractConfig = ExtractConfig(), resume=False):
    """Train a decoder; returns the path of the best checkpoint."""
    device = pick_device(extract_cfg.device)
    out_dir = models_dir(workdir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    ckpt = None
    if resume:
        if not last_path.exists():
            raise CaptioningError(f"Nothing to resume: {last_path} does not exist; train without --resume first.")
        ckpt = load_checkpoint(last_path)              # every rank reads the same file
        spec = EncoderSpec(**ckpt["encoder"])           # the features must be the ones it was trained on
        runtime = {k: getattr(cfg, k) for k in RUNTIME}
        cfg = TrainConfig(**{**ckpt["train_config"], "model": ModelConfig(**ckpt["model_config"]), **runtime})
    spec = concrete_spec(spec)
    _, records, store = prepare(data_dir, workdir, spec, extract_cfg)
    splits = {s: [r for r in records if r.split == s] for s in ("train", "val")}
    if not splits["train"] or not splits["val"]:
        raise CaptioningError("The dataset needs images in both its train and validation splits to train.")
    vocab = Vocabulary(ckpt["vocab"]) if ckpt else Vocabulary.build(
        (c for r in splits["train"] for c in r.captions), min_count=cfg.min_count)
    row_of = store.row_of()
    train_data = encode_split(splits["train"], vocab, row_of, cfg.max_words)
    val_data = encode_split(splits["val"], vocab, row_of, cfg.max_words)
    distributed.check_same(int(train_data.tokens.sum() + train_data.rows.sum()) + len(vocab), "The processes of "
                           "this job see different training data: on several machines, give each the same dataset.")

    torch.manual_seed(cfg.seed)
    cfg.model = ModelConfig(**{**asdict(cfg.model), "vocab_size": len(vocab), "feat_dim": store.channels})
    decoder = build_decoder(cfg.model).to(device)
    model = distributed.wrap(decoder, device)       # what trains; `decoder` is what is saved and scored
    if cfg.compile:
        model = torch.compile(model, dynamic=True)  # caption lengths vary: one graph for all shapes
    amp = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    optimizer = make_optimizer(decoder.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                           patience=cfg.lr_patience)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, start_epoch, best = [], 1, float("-inf")
    if ckpt:
        decoder.load_state_dict(ckpt["decoder_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        generator.set_state(ckpt["generator_state"])
        torch.set_rng_state(ckpt["torch_rng_state"])
        history, start_epoch, best = ckpt["history"], ckpt["epoch"] + 1, ckpt["best_score"]
        console.print(f"Resuming after epoch {ckpt['epoch']} (best dev CIDEr-D {best:.3f}).")
    else:
        mean, std = feature_stats(store, train_data.rows, decoder.uses_grid)
        decoder.norm.set_stats(mean, std)

    console.print(f"Training the {cfg.model.decoder} decoder on {spec.name} features: {len(vocab):,} words, "
                  f"{len(train_data.lengths):,} train captions, {len(splits['val']):,} dev images, device {device}"
                  f"{f', mixed precision ({amp})' if amp else ''}.")
    world = distributed.world_size()
    if world > 1:
        console.print(f"{world} processes ({distributed.backend()}): global batch = {cfg.batch_size} per process × "
                      f"{world} = {cfg.batch_size * world} captions a step; learning rate {cfg.lr:g} as given "
                      "(not scaled with the number of processes).")
    saved = start_epoch - 1   # the last epoch in last.pt
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.time()
            train_loss = train_epoch(decoder, optimizer, store, train_data, cfg, generator, device, epoch, model, scaler)

            def evaluate():  # rank 0 only; the others get its figures, so every rank decides alike below
                return {"val_loss": validation_loss(decoder, store, val_data, cfg, device),
                        **dev_scores(decoder, store, splits["val"], vocab, row_of, device, cfg.dev_images)}
            scores = distributed.from_main(("val_loss", "BLEU-4", "CIDEr-D"), evaluate)
            val_loss = scores.pop("val_loss")
            scheduler.step(scores["CIDEr-D"])
            improved = scores["CIDEr-D"] > best
            best = max(best, scores["CIDEr-D"])
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, **scores,
                            "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0, "best": improved})
            ckpt = {"decoder_state": decoder.state_dict(), "vocab": vocab.words, "model_config": cfg.model.to_dict(),
                    "encoder": spec.to_dict(), "grid_hw": list(store.grid_hw), "history": history,
                    "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
                    "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
                    "generator_state": generator.get_state(), "torch_rng_state": torch.get_rng_state(),
                    "epoch": epoch, "best_score": best, "best_metric": "CIDEr-D"}
            if distributed.is_main():  # the one writer of the job
                if improved:  # best first: a kill between the two saves must not leave best.pt behind last.pt
                    save_checkpoint(best_path, ckpt)
                save_checkpoint(last_path, ckpt)
            saved = epoch
            console.print(f"epoch {epoch}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                          f"dev BLEU-4 {scores['BLEU-4']:.3f}, CIDEr-D {scores['CIDEr-D']:.3f}"
                          f"{' (best)' if improved else ''}, {time.time() - t0:.0f}s")
            if distributed.is_main():
                save_curves(history, out_dir / "curves.png")
            since_best = epoch - max(h["epoch"] for h in history if h["best"])
            if since_best >= cfg.patience:
                console.print(f"Stopping early: no better dev CIDEr-D for {cfg.patience} epochs.")
                break
    except KeyboardInterrupt:
        done = f"epoch {saved} is saved in {last_path}" if saved else "no epoch had finished"
        console.print(f"[yellow]Training interrupted; {done}. Continue with --resume.[/]")
        if not best_path.exists():
            return None
    return best_path


def save_curves(history, path):
    from .render import save_training_curves
    try:
        save_training_curves(history, path)
    except Exception as e:  # a plot must never cost a training run
        console.print(f"[yellow]Could not draw the training curves: {e}[/]")


def train_epoch(decoder, optimizer, store, data, cfg, generator, device, epoch, model=None, scaler=None):
    """One pass over the training captions; returns the mean loss per token. `model` is what runs the
    steps (the decoder wrapped for DDP or compiled). Under torchrun every rank builds the same global
    batches of batch_size × world size captions (same generator, same seed) and trains on its own part."""
    model = model or decoder
    model.train()
    world = distributed.world_size()
    batches = make_batches(decoder, data, cfg.batch_size * world, generator)
    if world > 1:  # each rank needs a part of every step, or the others would wait for its gradients
        batches = [b for b in batches if len(b) >= world]
    amp = amp_dtype(device, cfg.amp)
    total, count = 0.0, 0.0
    with make_progress(transient=True) as bar:
        task = add_task(bar, f"Epoch {epoch}/{cfg.epochs}", len(batches), unit="batch")
        for idx in batches:
            part = distributed.batch_part(idx)
            # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the batch's
            # tokens (captions, for the attention penalty) × world size gives the whole batch's gradient.
            tokens = int((data.lengths[idx] - 1).sum())
            weights = (world * int((data.lengths[part] - 1).sum()) / tokens, world * len(part) / len(idx))
            feats, index = load_unique(store, data.rows[part], decoder.uses_grid, device)
            width = int(data.lengths[part].max())
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                loss, _ = decoder_loss(model, feats, data.tokens[part, :width].to(device),
                                       data.lengths[part].to(device), cfg, index, weights)
            norm = optimizer_step(loss, optimizer, decoder.parameters(), cfg.clip, scaler)
            value = loss.item()
            # The gradient norm is the same on every rank: a NaN anywhere stops all ranks at the same step.
            # (With fp16's GradScaler an infinite gradient only skips the step.)
            if not math.isfinite(value) or (scaler is None and not math.isfinite(norm)):
                raise CaptioningError("Training diverged (the loss became NaN); try a lower --lr.")
            total, count = total + value * tokens / world, count + tokens / world
            advance_task(bar, task, info=f"loss {total / count:.3f}")
    total, count = distributed.all_sum(total, count)
    return total / max(count, 1)


def optimizer_step(loss, optimizer, params, clip, scaler=None):
    """Backward pass, gradient clipping, update; through fp16's GradScaler when there is one (it skips the
    update when a gradient overflowed). Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return norm
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    return norm

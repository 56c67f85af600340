"""Decoder training on cached features: any objective (objectives.py), dev scores every epoch, best/last
checkpoints, exact resume.

After each epoch the dev split is captioned and scored (BLEU-4, CIDEr-D; validation.py) with the
objective's dev beam; `best.pt` is the epoch with the best dev CIDEr-D, the learning rate follows
--lr-schedule (cosine by default: from the full rate down towards 0 over the planned epochs; plateau:
halved when dev CIDEr-D stalls; optim.py), and training stops early when it stops improving. `last.pt`
holds everything needed to resume exactly: weights, optimiser, scheduler, RNG, history.

Everything that differs between objectives is the objective's to say (objectives.py): its learning rate,
the checkpoint it starts from (self-critical training: `--init-from`, default the workdir's
models/best.pt, first kept as models/xe_best.pt), and whether the starting model's dev score is
"epoch 0" (so best.pt is never worse than the model it started from).

Under torchrun (captioning/distributed.py) every rank trains on its part of each global batch with
DistributedDataParallel; rank 0 alone scores the dev split, shares the scores and writes the files.
"""
import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from captioning import distributed
from captioning.config import ExtractConfig, ModelConfig, TrainConfig
from captioning.data.vocab import Vocabulary
from captioning.features.encoders import EncoderSpec, concrete_spec
from captioning.features.extract import extract_features, pick_device
from captioning.features.prepare import CaptionData, encode_split, prepare
from captioning.features.store import feature_stats, mixed_store
from captioning.models.decoders import build_decoder
from captioning.search.consensus import training_memory
from captioning.training.checkpoint import load_checkpoint, memory_tensors, models_dir, save_checkpoint, training_checkpoint
from captioning.training.objectives import build_objective, objective_class
from captioning.training.optim import amp_dtype, make_optimizer, make_scheduler, optimizer_step, step_scheduler
from captioning.training.validation import dev_scores, validation_loss
from captioning.utils import CaptioningError, add_task, advance_task, console, make_progress


RUNTIME = ("epochs", "amp", "compile")   # how to run, not what to learn: --resume takes them from the command


@dataclass
class Run:
    """One training run's pieces, as setup() makes them and every epoch uses them."""
    cfg: TrainConfig
    spec: EncoderSpec
    device: torch.device
    out_dir: Path
    store: object
    splits: dict                   # {"train": records, "val": records}
    vocab: Vocabulary
    train_data: CaptionData
    val_data: CaptionData
    decoder: torch.nn.Module       # what is saved and scored
    objective: object
    model: torch.nn.Module         # what runs the steps: the objective's module, wrapped for DDP or compiled
    optimizer: object
    scheduler: object
    scaler: object
    generator: torch.Generator
    mirror: object = None          # the mirror images' features (--flip), or None
    memory: dict = field(default_factory=dict)   # the consensus memory every checkpoint carries (consensus.py)
    history: list = field(default_factory=list)
    start_epoch: int = 1
    best: float = float("-inf")


def train(data_dir, workdir=".", cfg: TrainConfig = TrainConfig(), spec: EncoderSpec = EncoderSpec(),
          extract_cfg: ExtractConfig = ExtractConfig(), resume=False):
    """Train a decoder; returns the path of the best checkpoint."""
    run = setup(data_dir, workdir, cfg, spec, extract_cfg, resume)
    return run_epochs(run)


def starting_point(workdir, cfg, spec, resume):
    """(checkpoint to continue or start from or None, whether it is a resume, cfg, spec)."""
    last_path = models_dir(workdir) / "last.pt"
    if resume:
        if not last_path.exists():
            raise CaptioningError(f"Nothing to resume: {last_path} does not exist; train without --resume first.")
        ckpt = load_checkpoint(last_path)              # every rank reads the same file
        runtime = {k: getattr(cfg, k) for k in RUNTIME}
        # A run saved before --lr-schedule and --flip existed goes on as it started: plateau, no mirror images.
        saved = {"lr_schedule": "plateau", "flip": False, **ckpt["train_config"]}
        cfg = TrainConfig(**{**saved, "model": ModelConfig(**ckpt["model_config"]), **runtime})
        return ckpt, True, cfg, EncoderSpec(**ckpt["encoder"])   # the features it was trained on
    start = objective_class(cfg.objective).start_from(workdir, cfg)
    if start is None:
        return None, False, cfg, spec
    ckpt = load_checkpoint(start)
    cfg.init_from = str(start)
    cfg.model = ModelConfig(**ckpt["model_config"])
    return ckpt, False, cfg, EncoderSpec(**ckpt["encoder"])


def setup(data_dir, workdir, cfg, spec, extract_cfg, resume):
    cfg = copy.deepcopy(cfg)   # filled in below (model sizes, the SCST start): never the caller's object
    device = pick_device(extract_cfg.device)
    ckpt, resuming, cfg, spec = starting_point(workdir, cfg, spec, resume)
    spec = concrete_spec(spec)
    _, records, store = prepare(data_dir, workdir, spec, extract_cfg)
    mirror = extract_features(store.paths, spec, workdir, replace(extract_cfg, mirror=True)) if cfg.flip else None
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
    if ckpt:
        decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder_state"].items()})
    else:
        decoder.norm.set_stats(*feature_stats(store, train_data.rows, decoder.uses_grid))
    objective = build_objective(cfg, decoder, train_data)
    model = distributed.wrap(objective.module, device)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)  # caption lengths vary: one graph for all shapes
    optimizer = make_optimizer(decoder.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    amp = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    run = Run(cfg, spec, device, models_dir(workdir), store, splits, vocab, train_data, val_data, decoder,
              objective, model, optimizer, scheduler, scaler, torch.Generator().manual_seed(cfg.seed), mirror)
    run.memory = memory_tensors(training_memory(splits["train"], store, vocab))
    if resuming:
        restore(run, ckpt)
    announce(run, amp)
    if run.objective.scores_start and not resuming:
        score_start(run)
    return run


def restore(run, ckpt):
    run.optimizer.load_state_dict(ckpt["optimizer_state"])
    run.scheduler.load_state_dict(ckpt["scheduler_state"])
    run.generator.set_state(ckpt["generator_state"])
    torch.set_rng_state(ckpt["torch_rng_state"])
    run.history, run.start_epoch, run.best = ckpt["history"], ckpt["epoch"] + 1, ckpt["best_score"]
    console.print(f"Resuming after epoch {ckpt['epoch']} (best dev CIDEr-D {run.best:.3f}).")


def announce(run, amp):
    cfg = run.cfg
    console.print(f"Training the {cfg.model.decoder} decoder ({cfg.objective}) on {run.spec.name} features: "
                  f"{len(run.vocab):,} words, {len(run.train_data.lengths):,} train captions, "
                  f"{len(run.splits['val']):,} dev images, device {run.device}"
                  f"{f', mixed precision ({amp})' if amp else ''}.")
    world = distributed.world_size()
    if world > 1:
        console.print(f"{world} processes ({distributed.backend()}): global batch = {cfg.batch_size} per process × "
                      f"{world} = {cfg.batch_size * world} captions a step; learning rate as given "
                      "(not scaled with the number of processes).")


def evaluate_epoch(run):
    """Validation loss and dev scores, computed by rank 0 and shared, so every rank decides alike."""
    def compute():
        return {"val_loss": validation_loss(run.decoder, run.store, run.val_data, run.cfg, run.device),
                **dev_scores(run.decoder, run.store, run.splits["val"], run.vocab, run.store.row_of(), run.device,
                             run.cfg.dev_images, run.objective.dev_beam)}
    return distributed.from_main(("val_loss", "BLEU-4", "CIDEr-D"), compute)


def score_start(run):
    """Epoch 0 (objectives whose `scores_start` says so): the starting model's dev score, saved as the
    first best.pt and last.pt (so a resume right away works, and best.pt is never worse than the start)."""
    scores = evaluate_epoch(run)
    run.best = scores["CIDEr-D"]
    run.history.append({"epoch": 0, run.objective.stat: None, **scores, "lr": run.optimizer.param_groups[0]["lr"],
                        "seconds": 0.0, "best": True})
    save_epoch(run, 0, improved=True)
    console.print(f"start: dev BLEU-4 {scores['BLEU-4']:.3f}, CIDEr-D {scores['CIDEr-D']:.3f} "
                  f"(beam {run.objective.dev_beam})")
    run.start_epoch = 1


def save_epoch(run, epoch, improved):
    ckpt = training_checkpoint(run, epoch)
    if distributed.is_main():  # the one writer of the job
        if improved:  # best first: a kill between the two saves must not leave best.pt behind last.pt
            save_checkpoint(run.out_dir / "best.pt", ckpt)
        save_checkpoint(run.out_dir / "last.pt", ckpt)
        save_curves(run.history, run.out_dir / "curves.png")


def run_epochs(run):
    cfg, saved = run.cfg, run.start_epoch - 1   # the last epoch in last.pt
    best_path, last_path = run.out_dir / "best.pt", run.out_dir / "last.pt"
    try:
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            t0 = time.time()
            stat = train_epoch(run, epoch)
            scores = evaluate_epoch(run)
            val_loss = scores.pop("val_loss")
            step_scheduler(run.scheduler, scores["CIDEr-D"])
            improved = scores["CIDEr-D"] > run.best
            run.best = max(run.best, scores["CIDEr-D"])
            run.history.append({"epoch": epoch, run.objective.stat: stat, "val_loss": val_loss, **scores,
                                "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.time() - t0,
                                "best": improved})
            save_epoch(run, epoch, improved)
            saved = epoch
            console.print(f"epoch {epoch}: {run.objective.stat.replace('_', ' ')} {stat:.3f}, val loss {val_loss:.3f}, "
                          f"dev BLEU-4 {scores['BLEU-4']:.3f}, CIDEr-D {scores['CIDEr-D']:.3f}"
                          f"{' (best)' if improved else ''}, {time.time() - t0:.0f}s")
            since_best = epoch - max(h["epoch"] for h in run.history if h["best"])
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
    from captioning.results.render import save_training_curves
    try:
        save_training_curves(history, path)
    except Exception as e:  # a plot must never cost a training run
        console.print(f"[yellow]Could not draw the training curves: {e}[/]")


def train_epoch(run, epoch):
    """One pass of the objective over the training data; returns its statistic's mean (loss per token,
    or reward per sample). Under torchrun every rank builds the same global batches (same generator, same
    seed) and trains on its own part."""
    run.model.train()
    store = epoch_features(run, epoch)
    world = distributed.world_size()
    batches = run.objective.batches(run.generator, world)
    amp = amp_dtype(run.device, run.cfg.amp)
    total, count, t0 = 0.0, 0.0, time.time()
    with make_progress(transient=True) as bar:
        task = add_task(bar, f"Epoch {epoch}/{run.cfg.epochs}", len(batches), unit="batch")
        for i, idx in enumerate(batches):
            if epoch == run.start_epoch and i == ESTIMATE_AFTER < len(batches):
                announce_epoch_time((time.time() - t0) / i * len(batches))
            with torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext():
                loss, value, n = run.objective.loss(run.model, store, idx, run.device)
            norm = optimizer_step(loss, run.optimizer, run.decoder.parameters(), run.cfg.clip, run.scaler)
            # The gradient norm is the same on every rank: a NaN anywhere stops all ranks at the same step.
            # (With fp16's GradScaler an infinite gradient only skips the step.)
            if not math.isfinite(float(loss.detach())) or (run.scaler is None and not math.isfinite(norm)):
                raise CaptioningError("Training diverged (the loss became NaN); try a lower --lr.")
            total, count = total + value, count + n
            advance_task(bar, task, info=f"{run.objective.stat.split('_')[1]} {total / max(count, 1e-9):.3f}")
    total, count = distributed.all_sum(total, count)
    return total / max(count, 1)


def epoch_features(run, epoch):
    """The features an epoch trains on: with --flip each image's own or its mirror image's, drawn from the
    seed and the epoch (a resumed run draws the same; every rank the same)."""
    if run.mirror is None:
        return run.store
    g = torch.Generator().manual_seed(run.cfg.seed * 100_003 + epoch)
    return mixed_store(run.store, run.mirror, (torch.rand(len(run.store.paths), generator=g) < 0.5).numpy())


ESTIMATE_AFTER = 20   # batches timed before saying how long an epoch takes


def announce_epoch_time(seconds):
    minutes = f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"
    console.print(f"An epoch takes about {minutes} here (from its first {ESTIMATE_AFTER} batches), plus dev scoring.")

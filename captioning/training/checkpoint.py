"""One-file checkpoints: everything needed to caption, plus what training needs to resume.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`: a file from elsewhere can never run code on the user's machine.
It is written to a temporary file and renamed, so a crash or a full disk leaves the previous one intact.
Beside each checkpoint a small JSON summary lets the menu show the model without importing torch.
"""
import json
import os
import pickle
from pathlib import Path

from captioning.utils import CaptioningError, atomic_write_json, temp_path_for

FORMAT = "image-captioning"
VERSION = 1
BUILTIN = Path(__file__).parents[1] / "assets" / "default_model.pt"
# torch.save stores its records uncompressed, but torch.load inflates compressed ones too: a 200 KB file
# can unpack to gigabytes. A checkpoint may unpack to at most twice its size on disk, plus this much.
EXPANSION_SLACK = 16 << 20


def save_checkpoint(path, ckpt):
    """Atomic torch.save, then the summary beside it."""
    import torch
    ckpt = {"format": FORMAT, "version": VERSION, **ckpt}
    tmp = temp_path_for(path)
    try:
        torch.save(ckpt, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(Path(path).with_suffix(".json"), summarize(ckpt))
    return Path(path)


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every way a file can be wrong becomes one clear sentence."""
    import torch
    path = Path(path)
    if not path.exists():
        raise CaptioningError(f"Model file not found: {path}")
    if path.is_dir():
        raise CaptioningError(f"Expected a model file (.pt) but got a folder: {path}")
    check_expansion(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    # Each failure is one sentence for the user; `from e` keeps torch's own error for --debug.
    except PermissionError as e:
        raise CaptioningError(f"No permission to read model file: {path}") from e
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            # weights_only refused an object that is not a tensor or plain value: a pickle with code in it.
            raise CaptioningError(f"Refusing to load {path}: it holds more than plain tensors and values "
                                  "(it may contain code).") from e
        raise CaptioningError(f"Model file {path} is corrupt or not a checkpoint.") from e
    except Exception as e:  # torch.load fails on damaged files in many ways (EOFError, IndexError, zip errors)
        raise CaptioningError(f"Model file {path} is corrupt or truncated ({type(e).__name__}).") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CaptioningError(f"{path} is not an image-captioning checkpoint.")
    if ckpt.get("version") != VERSION:
        raise CaptioningError(f"{path} was written by another version of this tool (format {ckpt.get('version')},"
                              f" this tool reads {VERSION}); retrain it with this version.")
    for key in ("decoder_state", "vocab", "model_config", "encoder"):
        if key not in ckpt:
            raise CaptioningError(f"{path} is incomplete: it has no '{key}'.")
    return ckpt


def check_expansion(path):
    """Refuse a zip-format checkpoint whose records would unpack to far more than the file holds (a zip
    bomb), from the sizes its directory declares (torch's reader never inflates a record past them)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return   # not a zip (or unreadable): torch.load says what is wrong with it
    on_disk = Path(path).stat().st_size
    if unpacked > 2 * on_disk + EXPANSION_SLACK:
        raise CaptioningError(f"Refusing to load {path}: its {on_disk / 1e6:.1f} MB would unpack to "
                              f"{unpacked / 1e9:.1f} GB in memory (compressed records torch.save never writes).")


def training_checkpoint(run, epoch):
    """The checkpoint of a training run (train.Run) after `epoch`: what captioning needs, plus the optimizer,
    scheduler and RNG states that make --resume continue exactly."""
    import torch
    from dataclasses import asdict
    cfg = run.cfg
    return {"decoder_state": run.decoder.state_dict(), "vocab": run.vocab.words, "model_config": cfg.model.to_dict(),
            "encoder": run.spec.to_dict(), "grid_hw": list(run.store.grid_hw), "history": run.history,
            "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
            "optimizer_state": run.optimizer.state_dict(), "scheduler_state": run.scheduler.state_dict(),
            "generator_state": run.generator.get_state(), "torch_rng_state": torch.get_rng_state(),
            "epoch": epoch, "best_score": run.best, "best_metric": "CIDEr-D", "memory": run.memory}


# What captioning needs; the rest of a training checkpoint (optimizer, RNG states) only serves --resume.
EXPORT_KEYS = ("vocab", "model_config", "encoder", "grid_hw", "history", "train_config", "epoch",
               "best_score", "best_metric", "memory")


def export_model(source, output, reports=None, memory=None):
    """A small caption-only copy of a checkpoint: fp16 decoder weights (half the size; captions are the
    same to within rounding), no optimizer state, plus the evaluation reports given as {split: path}
    (the scores a model card shows), and `memory` (memory_tensors) in place of the checkpoint's own when
    given. It loads like any checkpoint but cannot be resumed."""
    ckpt = load_checkpoint(source)
    small = {k: ckpt[k] for k in EXPORT_KEYS if k in ckpt}
    small["decoder_state"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["decoder_state"].items()}
    if memory is not None:
        small["memory"] = memory
    small["evaluation"] = dict(ckpt.get("evaluation") or {})
    for split, path in (reports or {}).items():
        try:
            report = json.loads(Path(path).read_text())
            small["evaluation"][split] = {k: v for k, v in report.items() if k != "captions"}
        except (OSError, ValueError, AttributeError) as e:
            raise CaptioningError(f"Cannot read the evaluation report {path}; run 'evaluate' again.") from e
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(output, small)
    return Path(output)


def memory_tensors(memory):
    """A consensus.Memory as the checkpoint stores it: a dict of tensors."""
    import torch
    return {k: torch.from_numpy(v) for k, v in memory.to_arrays().items()}


def checkpoint_memory(ckpt, channels):
    """The consensus memory a checkpoint carries (consensus.py), or None: checkpoints written before it
    existed have none and caption with plain beam search."""
    from captioning.search.consensus import memory_from_arrays
    try:
        return memory_from_arrays({k: v.numpy() for k, v in (ckpt.get("memory") or {}).items()}, channels)
    except (AttributeError, TypeError, ValueError) as e:
        raise CaptioningError("The model file's consensus memory is damaged; export the model again.") from e


def models_dir(workdir):
    return Path(workdir) / "models"


def report_path(models_folder, split):
    """Where `evaluate` writes a split's report by default, and where export and the dashboard look:
    beside the models it scored."""
    return Path(models_folder) / f"eval_{split}.json"


def split_scores(ckpt, path, split):
    """A split's scores: stored in the checkpoint (an exported model carries them), else the report that
    `evaluate` wrote beside it. Returns (scores or None, where they came from)."""
    stored = (ckpt.get("evaluation") or {}).get(split) or {}
    if isinstance(stored.get("scores"), dict):
        return stored["scores"], "stored in the checkpoint"
    report = report_path(Path(path).parent, split)
    try:
        scores = json.loads(report.read_text())["scores"]
        return (scores, f"from {report.name}") if isinstance(scores, dict) else (None, "")
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""


def find_model(workdir=".", model=None):
    """Which checkpoint to use: an explicit path, 'default' for the built-in one, else the workdir's best,
    else its last, else the built-in model when the package ships one."""
    if model == "default":
        if not BUILTIN.exists():
            raise CaptioningError("This installation has no built-in model; train one with "
                                  "'python image_captioning.py train --data DIR'.")
        return BUILTIN
    if model:
        return Path(os.path.expanduser(str(model)))
    for name in ("best.pt", "last.pt"):
        candidate = models_dir(workdir) / name
        if candidate.exists():
            return candidate
    if BUILTIN.exists():
        return BUILTIN
    raise CaptioningError(f"No trained model in {models_dir(workdir)}; train one first with "
                          "'python image_captioning.py train --data DIR' (or try 'demo').")


def summarize(ckpt):
    """The few facts a person wants to see about a model."""
    cfg, enc = ckpt["model_config"], ckpt["encoder"]
    last = (ckpt.get("history") or [{}])[-1]
    from captioning.models.decoders import DECODERS
    return {"decoder": cfg["decoder"], "attention": getattr(DECODERS.get(cfg["decoder"]), "has_attention", False),
            "encoder": enc["name"], "vocab_size": len(ckpt["vocab"]),
            "epoch": ckpt.get("epoch", 0), "best_metric": ckpt.get("best_metric", "CIDEr-D"),
            "best_score": ckpt.get("best_score"), "val_loss": last.get("val_loss"),
            "evaluation": {split: r.get("scores") for split, r in (ckpt.get("evaluation") or {}).items()}}


def read_summary(path):
    """The JSON summary beside a checkpoint, or None (no torch import: the menu calls this)."""
    try:
        return json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def describe(summary):
    """One line on what a model is, for the menu and messages."""
    best = summary.get("best_score")
    score = f", best dev {summary.get('best_metric')} {best:.3f}" if isinstance(best, (int, float)) else ""
    return (f"{summary['decoder']} decoder on {summary['encoder']}, vocabulary {summary['vocab_size']:,} words, "
            f"{summary.get('epoch', 0)} epoch(s){score}")

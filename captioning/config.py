"""Every setting of the pipeline, declared once: its field, its default and its help text.

The command line (cli.py) and the menu derive their options, defaults and prompts from these dataclasses,
so a new setting is one field here. A field with help text is a command-line option `--field-name`
(`flag` overrides the name); a field without is internal (filled in by the code, e.g. the vocabulary
size). No torch here: `--help` and the menu read this module at once.
"""
import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields


def setting(default, help, kind=None, **argparse_kw):
    """A config field that is also a command-line option. kind: "positive" (int or float above 0),
    "fraction" (0 <= x < 1) or None (the field's own type); other keywords go to argparse."""
    return field(default=default, metadata={"help": help, "kind": kind, **argparse_kw})


# --- validators (argparse `type=`) ----------------------------------------------------------------------

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    if value > 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} is too large")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 up to (not including) 1, got '{text}'")
    return value


# --- the settings ---------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    decoder: str = setting("attention", "the decoder (models.DECODERS)",
                           choices=["lstm", "attention", "updown"])
    vocab_size: int = 0          # set from the vocabulary
    feat_dim: int = 0            # set from the encoder's features (channels)
    embed_dim: int = setting(256, "word embedding size", "positive")
    hidden_dim: int = setting(512, "LSTM state size", "positive")
    attention_dim: int = setting(512, "attention decoders: size of the attention layer", "positive")
    context_dim: int = setting(512, "attention decoders: project the features to this size first (0: keep them)",
                               type=int)
    dropout: float = setting(0.5, "dropout", "fraction")

    def to_dict(self):
        return asdict(self)


@dataclass
class SearchConfig:
    beam_size: int = setting(5, "beam width (1 = greedy); with re-ranking on, the search is max(--beam-size, "
                                "--rerank-pool) wide", "positive")
    max_len: int = setting(20, "longest caption in words", "positive")
    length_alpha: float = setting(0.7, "beam ranking: log-probability / length**alpha (0 favours short "
                                       "captions, 1 is the mean per word)")
    block_trigrams: bool = True    # "a man in a red shirt in a red shirt" is never what anyone wants
    num_captions: int = setting(1, "the N best distinct captions", "positive")
    diversity: str = setting("sample", "how captions 2..N are found: sample (seeded nucleus samples that differ "
                                       "from the others in at least half their words) or beam (the next-best "
                                       "beams, often the same sentence)", choices=["sample", "beam"])
    top_p: float = setting(0.5, "diversity sample: draw from the likeliest words making up this much "
                                "probability", "positive")
    mirror: bool = setting(True, "also read each photo mirrored left to right (better captions; --mirror-mode says how "
                                 "the two readings are combined)",
                           action=argparse.BooleanOptionalAction)
    mirror_mode: str = setting("fused", "with --mirror, how the two are read: fused (one reading of the mean of the photo's "
                                        "features and its mirror image's, cells aligned: half the search's work) or "
                                        "pair (each read apart, their word probabilities averaged)",
                               choices=["fused", "pair"])
    stop_early: bool = setting(True, "an image's search ends as soon as it has its beam width (or --rerank-pool) of "
                                     "finished captions; --no-stop-early: only once no live beam is likely to beat "
                                     "them either", action=argparse.BooleanOptionalAction)
    rerank: bool = setting(True, "choose the first caption among the model's --rerank-pool best by agreement (CIDEr-D) "
                                 "with the captions of the --neighbours most similar training photos (models that "
                                 "carry them; docs/results.md)", action=argparse.BooleanOptionalAction)
    rerank_pool: int = setting(10, "re-ranking: the number of candidates, and the beam width when wider than "
                                   "--beam-size (the search is max(--beam-size, --rerank-pool) wide)", "positive")
    neighbours: int = setting(30, "re-ranking: training photos whose captions vote", "positive")
    seed: int = 0                  # diversity "sample": the same photo gets the same captions (--seed)
    guidance: bool = setting(True, "ground the caption in what the encoder's ImageNet classifier and the word detectors "
                                   "see: name a confidently seen object, no people where nobody is seen; a plain "
                                   "caption when nothing is sure (--no-guidance: the search alone; README)",
                             action=argparse.BooleanOptionalAction)
    tag_threshold: float = setting(0.5, "tags (keywords) and guidance: the lowest score at which a word counts as "
                                        "seen in the photo", "fraction")


@dataclass
class TrainConfig:
    # The defaults are the built-in model's recipe: the best decoder a 2-core machine trains in about 45 minutes
    # (each choice measured on the dev split: docs/results.md).
    epochs: int = setting(15, "epochs to train", "positive")
    batch_size: int = setting(64, "captions a step: reference captions (xe) or sampled ones (scst)", "positive")
    lr: float = setting(5e-4, "learning rate of cross-entropy training", "positive")
    weight_decay: float = setting(1e-4, "AdamW weight decay", type=float)
    clip: float = setting(5.0, "gradient-norm clipping (LSTMs occasionally spike)", "positive")
    label_smoothing: float = setting(0.1, "cross-entropy label smoothing", "fraction")
    att_reg: float = setting(1.0, "weight of the decoder's own loss term (the attention penalty)", type=float)
    min_count: int = setting(5, "words seen fewer times in train become <unk>", "positive")
    max_words: int = setting(30, "longer training captions are truncated", "positive")
    patience: int = setting(4, "stop after this many epochs without a better dev CIDEr-D", "positive")
    lr_schedule: str = setting("cosine", "plateau: halve the learning rate when dev CIDEr-D stalls; cosine: "
                                          "decay it towards 0 over --epochs", choices=["plateau", "cosine"])
    lr_patience: int = setting(1, "plateau: halve the learning rate after this many epochs without a better dev CIDEr-D",
                               "positive")
    dev_images: int = setting(1000, "dev images captioned and scored after each epoch", "positive")
    flip: bool = setting(True, "each epoch, train on each image's features or on its mirror image's, at random "
                                "(extracts the mirror images' features once)", action=argparse.BooleanOptionalAction)
    seed: int = 0                  # the common --seed
    objective: str = setting("xe", "xe: cross-entropy; scst: self-critical CIDEr-D training, continuing from a "
                                   "trained model", choices=["xe", "scst"])
    scst_lr: float = setting(2e-5, "scst learning rate", "positive")
    scst_samples: int = setting(5, "scst: captions sampled per image", "positive")
    # greedy: the only baseline that raised dev CIDEr-D on Flickr8k here (docs/results.md, Self-critical training).
    scst_baseline: str = setting("greedy", "scst: what a sample's reward is compared with: its image's greedy "
                                           "caption's, or the mean of the image's other samples",
                                 choices=["greedy", "mean"])
    scst_dropout: bool = setting(True, "scst: sample with dropout on, as in training (--no-scst-dropout: the "
                                       "policy that captions at test time)", action=argparse.BooleanOptionalAction)
    init_from: str = setting("", "scst: the model to start from (default: models/best.pt, kept as "
                                 "models/xe_best.pt)", metavar="PATH")
    amp: bool | None = setting(None, "mixed precision (bf16, or fp16 with loss scaling) on CUDA GPUs (default: "
                                     "on there; no effect elsewhere)", action=argparse.BooleanOptionalAction)
    compile: bool = setting(False, "torch.compile the decoder (GPUs, long runs)", action="store_true")
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class ExtractConfig:
    batch_size: int | None = setting(None, "images per encoder batch (default: calibrated)", "positive",
                                     flag="--extract-batch-size")
    num_workers: int | None = setting(None, "image-decoding worker processes (default: auto)", type=int,
                                      flag="--workers")
    channels_last: bool | None = None  # None: as calibrated (on CPUs it is up to 2x faster for these CNNs)
    threads: int | None = None         # torch compute threads while extracting; None: torch's own setting
    decode_threads: int | None = None  # background decoding threads (no workers); None: cores torch leaves free
    calibrate: bool | None = None      # None: when at least tuning.CALIBRATE_MIN_IMAGES images are to be done
    device: str = "auto"               # the common --device
    flush_every_s: float = 10.0        # how much work a kill can cost at most
    mirror: bool = False               # encode each photo's mirror image (the training augmentation --flip)


@dataclass
class ExportConfig:
    format: str = setting("pt", "pt: a small caption-only checkpoint (fp16); onnx: a folder that captions without "
                                "PyTorch (numpy, Pillow and onnxruntime; see README)", choices=["pt", "onnx"])


# --- deriving the command line --------------------------------------------------------------------------

def options(cls):
    """The fields of `cls` that are command-line options, as (field, --flag, argparse dest)."""
    out = []
    for f in fields(cls):
        if "help" in f.metadata:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            out.append((f, flag, flag[2:].replace("-", "_")))
    return out


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def add_options(parser, cls, skip=()):
    """One argparse option per setting of `cls` (see `setting`), its default the field's."""
    for f, flag, dest in options(cls):
        if f.name in skip:
            continue
        meta = {k: v for k, v in f.metadata.items() if k not in ("help", "kind", "flag")}
        default = default_of(f)
        shown = "" if default in (None, "") or meta.get("action") == "store_true" else f" (default {default})"
        kw = {"default": default, "help": f.metadata["help"] + shown, "dest": dest, **meta}
        if "action" not in meta and "type" not in meta and "choices" not in meta:
            kw["type"] = _type_of(f)
        parser.add_argument(flag, **kw)


def _type_of(f):
    kind = f.metadata.get("kind")
    number = float if isinstance(default_of(f), float) else int
    if kind == "positive":
        return positive_float if number is float else positive_int
    if kind == "fraction":
        return fraction
    return str if isinstance(default_of(f), str) else number


def from_args(cls, args, **given):
    """An instance of `cls` from parsed arguments (its options' values), plus fields given here."""
    values = {f.name: getattr(args, dest) for f, _, dest in options(cls) if hasattr(args, dest)}
    return cls(**{**values, **given})

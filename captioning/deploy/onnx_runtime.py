"""Captioning from an ONNX export folder with numpy, Pillow and onnxruntime only: no torch, no torchvision.

An export (`python image_captioning.py export --format onnx --output DIR`, see onnx_export.py) holds

    encoder.onnx   images [B, 3, H, W] (normalised) → grid [B, P, C]; the CNN with BatchNorm folded
    init.onnx      grid [B, P, C] → the decoder's state before <start> (one output per state entry)
    step.onnx      tokens [B] + every state entry → log-probabilities [B, V], the entries that change
                   (named new_<entry>), attention [B, P] for attention decoders: one word
    vocab.json     the words, position = id
    memory.npz     the consensus memory (consensus.py), when the model carries one
    head.onnx      pooled features [B, C] → the encoder's ImageNet logits [B, 1000], when it has that head
    imagenet_words.json   the classes' caption words beside it: the keywords (tags.py)
    config.json    format and version, preprocessing, state layout, what the model is

Beam search stays in code (npsearch.py), written once over numpy. This module must never import torch,
not even indirectly: tests run it where importing torch fails.
"""
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from captioning.config import SearchConfig
from captioning.search.consensus import memory_from_arrays
from captioning.features.images import PIL_FILTERS, load_image, normalise, resize_crop, to_rgb
from captioning.search.numpy_search import SEARCH_BATCH, search
from captioning.results.outputs import OutputConfig, Pending, caption_photos, make_results
from captioning.grounding.tags import TagMap, tags_from_logits
from captioning.utils import CaptioningError, add_task, advance_task, make_progress
from captioning.data.vocab import Vocabulary

FORMAT = "image-captioning-onnx"
VERSION = 1
CONFIG = "config.json"
VOCAB = "vocab.json"
MEMORY = "memory.npz"
GRAPHS = {"encoder": "encoder.onnx", "init": "init.onnx", "step": "step.onnx"}
HEAD = "head.onnx"         # optional: exports of encoders without an ImageNet head (or older ones) have no tags
ENCODE_BATCH = 8           # images per encoder run
MAX_MEMORY_BYTES = 1 << 30 # memory.npz unpacked (Flickr8k's is a few MB, COCO's under 100 MB)
MAX_SIDE = 2048            # preprocess resize and crop (encoders take 224-600 px)
INSTALL = "pip install -r requirements-onnx.txt"


def read_config(folder):
    """config.json of an export folder, checked; every way it can be wrong is one sentence."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.exists():
        raise CaptioningError(f"Expected a model file (.pt) or an ONNX export but got a folder without {CONFIG}: "
                              f"{folder} (a folder written by 'export --format onnx' has one).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CaptioningError(f"{path} is damaged or unreadable; export the model again.") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CaptioningError(f"{folder} is not an image-captioning ONNX export ({CONFIG} is someone else's).")
    if config.get("version") != VERSION:
        raise CaptioningError(f"{folder} was exported by another version of this tool (format {config.get('version')}, "
                              f"this tool reads {VERSION}); export the model again with this version.")
    tags = config.get("tags")
    # File names in the folder itself: a config.json never points the runtime elsewhere.
    named = isinstance(tags, dict) and all(isinstance(tags.get(k), str) and Path(tags[k]).name == tags[k]
                                           for k in ("graph", "mapping"))
    if tags is not None and not named:
        raise CaptioningError(f"{path} is damaged (its \"tags\" entry); export the model again.")
    for name in [*GRAPHS.values(), VOCAB, *((tags["graph"], tags["mapping"]) if tags else ())]:
        if not (folder / name).is_file():
            raise CaptioningError(f"{folder} is incomplete: {name} is missing; export the model again.")
    if not _config_in_bounds(config):
        raise CaptioningError(f"{path} holds sizes out of bounds (preprocess, grid or features); export the model "
                              "again.")
    return config


def _config_in_bounds(config):
    """Whether config.json's numbers are ones an export writes: checked before any of them sizes an array."""
    def ints(values, top, low=1):
        return all(type(v) is int and low <= v <= top for v in values)

    def floats(values):
        return len(values) == 3 and all(type(v) in (int, float) and -1e3 < v < 1e3 for v in values)
    try:
        prep, grid = config["preprocess"], config["grid_hw"]
        return (ints([prep["resize"], prep["crop"]], MAX_SIDE) and prep["interpolation"] in PIL_FILTERS
                and floats(prep["mean"]) and floats(prep["std"]) and all(v > 0 for v in prep["std"])
                and len(grid) == 2 and ints(grid, 256, 0) and ints([config["feat_dim"]], 1 << 16))
    except (KeyError, TypeError):
        return False


def _npz_bytes(path):
    """The bytes memory.npz's arrays take once loaded, from their .npy headers (nothing inflated beyond them)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    raise ValueError(f"unknown .npy version {version}")
                shape, _, dtype = read[version](f)
                total += int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
    return total


def read_memory(path, channels):
    """The export's consensus memory, or None when it has none (plain beam search)."""
    if not path.exists():
        return None
    try:
        size = _npz_bytes(path)
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise CaptioningError(f"{path} is damaged; export the model again.") from e
    if size > MAX_MEMORY_BYTES:
        raise CaptioningError(f"Refusing to load {path}: it would take {size / 1e9:.1f} GB in memory (at most "
                              f"{MAX_MEMORY_BYTES / 1e9:.1f} GB).")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            memory = memory_from_arrays(dict(arrays), channels)
        if memory is None:
            raise ValueError("the file holds no memory")
        return memory
    except (OSError, ValueError, TypeError) as e:
        raise CaptioningError(f"{path} is damaged; export the model again.") from e


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise CaptioningError(f"Captioning with an ONNX export needs onnxruntime: {INSTALL}") from e
    return onnxruntime


def open_session(path, expected_inputs):
    """An onnxruntime session on the CPU. Threads: OMP_NUM_THREADS when set (as torch reads it), else all cores."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    options.log_severity_level = 3                  # errors only: its warnings are not the user's business
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        raise CaptioningError(f"{path} is corrupt or not an ONNX graph ({type(e).__name__}); export the model "
                              "again.") from e
    names = [i.name for i in session.get_inputs()]
    if names != list(expected_inputs):
        raise CaptioningError(f"{path} does not match {CONFIG} beside it (inputs {names}); export the model again.")
    return session


class OnnxDecoder:
    """The decoder contract of npsearch (init_state, step, per_image) over the init and step graphs."""

    def __init__(self, init, step, state, uses_grid):
        self.init, self.step_graph = init, step
        self.keys, self.changing, self.per_image = state["keys"], state["changing"], tuple(state["per_image"])
        self.has_alpha = bool(state["alpha"])
        self.uses_grid = uses_grid
        self.has_attention = self.has_alpha   # the step graph returns attention weights to draw

    def init_state(self, grid):
        return dict(zip(self.keys, self.init.run(self.keys, {"grid": grid})))

    def step(self, tokens, state):
        out = self.step_graph.run(None, {"tokens": tokens, **{k: state[k] for k in self.keys}})
        new = dict(zip(self.changing, out[1:1 + len(self.changing)]))
        return out[0], new, (out[-1] if self.has_alpha else None)


class MirrorPair:
    """models.MirrorPair over numpy: one decoder reading each photo as it is and mirrored, searched with
    the mean of the two readings' word probabilities. Features [B, P, 2C]: the two grids side by side."""

    def __init__(self, decoder):
        self.decoder, self.uses_grid = decoder, decoder.uses_grid
        self.per_image = tuple(f"{i}.{k}" for i in (0, 1) for k in decoder.per_image)

    def init_state(self, features):
        halves = np.split(features, 2, axis=-1)
        return {f"{i}.{k}": v for i, half in enumerate(halves)
                for k, v in self.decoder.init_state(np.ascontiguousarray(half)).items()}

    def step(self, tokens, state):
        outs = [self.decoder.step(tokens, {k[2:]: v for k, v in state.items() if k.startswith(f"{i}.")})
                for i in (0, 1)]
        logp = np.logaddexp(outs[0][0], outs[1][0]) - np.float32(np.log(2))   # log of the mean probability
        new = {f"{i}.{k}": v for i, out in enumerate(outs) for k, v in out[1].items()}
        return logp.astype(np.float32), new, outs[0][2]   # attention: the plain reading's


class FusedMirror:
    """models.FusedMirror over numpy: one reading of the mean of the photo's features and its mirror image's
    (the mirror's grid flipped back along the width so that cells line up): one decoder row per beam."""

    def __init__(self, decoder, grid_hw):
        self.decoder, self.grid_hw = decoder, tuple(grid_hw or (0, 0))
        self.uses_grid, self.per_image = decoder.uses_grid, decoder.per_image
        self.has_attention = getattr(decoder, "has_attention", decoder.uses_grid)

    def init_state(self, features):
        plain, mirror = np.split(np.asarray(features, dtype=np.float32), 2, axis=-1)
        if mirror.ndim == 3:
            b, p, c = mirror.shape
            h, w = self.grid_hw if self.grid_hw[0] * self.grid_hw[1] == p else (math.isqrt(p),) * 2
            if h * w != p:
                raise ValueError(f"a grid of {p} cells is not {h}x{w}: its width is unknown")
            mirror = mirror.reshape(b, h, w, c)[:, :, ::-1].reshape(b, p, c)
        return self.decoder.init_state(np.ascontiguousarray((plain + mirror) / np.float32(2)))

    def step(self, tokens, state):
        return self.decoder.step(tokens, state)


class TaggedHyps(list):
    """One photo's hypotheses, best first, and its keywords (as grounded.GroundedHyps carries its grounding)."""

    def __init__(self, hyps, tags):
        super().__init__(hyps)
        self.tags = tags


class OnnxCaptioner:
    """The Captioner API (load, caption, caption_pil, search, results) on an ONNX export folder."""

    def __init__(self, folder):
        folder = Path(folder)
        self.source = folder
        self.config = read_config(folder)
        try:
            self.vocab = Vocabulary(json.loads((folder / VOCAB).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise CaptioningError(f"{folder / VOCAB} is damaged; export the model again.") from e
        self.grid_hw = tuple(self.config["grid_hw"])
        self.prep = self.config["preprocess"]
        state = self.config["state"]
        self.encoder = open_session(folder / GRAPHS["encoder"], ["images"])
        self.decoder = OnnxDecoder(open_session(folder / GRAPHS["init"], ["grid"]),
                                   open_session(folder / GRAPHS["step"], ["tokens", *state["keys"]]),
                                   state, self.config["uses_grid"])
        self.memory = read_memory(folder / MEMORY, self.config["feat_dim"])
        tags = self.config.get("tags")
        self.head = open_session(folder / tags["graph"], ["pooled"]) if tags else None
        self.tag_map = TagMap.load(folder / tags["mapping"]) if tags else None

    @classmethod
    def load(cls, model, workdir=".", device="auto", ensemble=()):
        """As Captioner.load, for an export folder (always on the CPU: `device` is accepted and not used)."""
        if ensemble:
            raise CaptioningError("An ONNX export cannot join an ensemble at caption time; export the ensemble "
                                  "itself ('export --format onnx --model A --ensemble B ...').")
        return cls(model)

    def describe(self):
        c = self.config
        return (f"{c['decoder']} decoder on {c['encoder']['name']} (ONNX export), vocabulary "
                f"{len(self.vocab):,} words")

    def preprocess(self, image):
        """A PIL image → uint8 [H, W, 3], resized and cropped as the encoder's weights expect."""
        p = self.prep
        return resize_crop(to_rgb(image), p["resize"], p["crop"], p["interpolation"])

    def encode_batch(self, images, mirror=False):
        """uint8 [B, H, W, 3] → the grid [B, P, C]; with `mirror` the mirrored photos' beside it, [B, P, 2C]."""
        p, out = self.prep, []
        for i in range(0, len(images), ENCODE_BATCH):
            x = normalise(images[i:i + ENCODE_BATCH], p["mean"], p["std"])
            out.append(self.encoder.run(None, {"images": x})[0])
        grid = np.concatenate(out)
        return np.concatenate([grid, self.encode_batch(images[:, :, ::-1])], -1) if mirror else grid

    def encode(self, images, mirror=False):
        return self.encode_batch(np.stack([self.preprocess(im) for im in images]), mirror)

    def search(self, features, cfg: SearchConfig, keep_alphas=False):
        """`features` as encode(..., mirror=cfg.mirror) gives them. Each photo's hypotheses come as a
        TaggedHyps: its keywords travel with them to `results`."""
        found = search(self.search_decoder(cfg), features, cfg, keep_alphas, memory=self.memory)
        return [TaggedHyps(hyps, tags) for hyps, tags in zip(found, self.tags(features, cfg.tag_threshold))]

    def search_decoder(self, cfg: SearchConfig):
        """As Captioner.search_decoder: the decoder alone, or with cfg.mirror the reading of both photos."""
        if not cfg.mirror:
            return self.decoder
        return FusedMirror(self.decoder, self.grid_hw) if cfg.mirror_mode == "fused" else MirrorPair(self.decoder)

    def results(self, names, hyps):
        results = make_results(self.vocab, self.grid_hw, names, hyps)
        for result, hs in zip(results, hyps):
            result.tags = list(getattr(hs, "tags", []))
        return results

    def tags(self, features, threshold):
        """Each photo's keywords from the head on its pooled features; mirrored, from both readings."""
        if self.head is None:
            return [[] for _ in features]
        c = self.config["feat_dim"]
        pooled = features.mean(1) if features.ndim == 3 else features
        logits = [self.head.run(None, {"pooled": np.ascontiguousarray(pooled[:, i:i + c], dtype=np.float32)})[0]
                  for i in range(0, pooled.shape[1], c)]
        return tags_from_logits(np.stack(logits), self.tag_map, threshold)

    def caption_pil(self, images, cfg: SearchConfig = SearchConfig(), keep_alphas=False, names=None):
        names = names or [""] * len(images)
        return self.results(names, self.search(self.encode(images, cfg.mirror), cfg, keep_alphas))

    def caption(self, image, beam_size=SearchConfig.beam_size):
        """One image (a path or a PIL image) → its caption as text, with the default search."""
        pil = image if hasattr(image, "convert") else load_image(image, self.prep["resize"])
        return self.caption_pil([pil], SearchConfig(beam_size=beam_size))[0].captions[0]


def caption_files(captioner, inputs, cfg: SearchConfig, paths=None, outputs=None):
    """captioner.caption_files for an OnnxCaptioner: the same outputs, photos decoded and encoded in order."""
    opts = outputs or OutputConfig()

    def stream(photos, sink):
        return _caption_stream(captioner, photos, cfg, sink, opts.attention)
    return caption_photos(stream, inputs, opts, paths, captioner.decoder.has_attention)


def _caption_stream(captioner, photos, cfg, sink, keep_alphas):
    pending, failures = Pending(captioner, cfg, keep_alphas, sink, np.concatenate, SEARCH_BATCH), []
    with make_progress(transient=True) as bar:
        task = add_task(bar, "Captioning", len(photos), unit="img")
        for i in range(0, len(photos), ENCODE_BATCH):
            chunk, arrays, good = photos[i:i + ENCODE_BATCH], [], []
            for photo in chunk:
                try:   # the JPEG decoder may skip detail the resize drops anyway (as feature extraction does)
                    arrays.append(captioner.preprocess(load_image(photo.path, captioner.prep["resize"])))
                    good.append(photo)
                except CaptioningError as e:   # one bad file must not cost the others
                    failures.append(str(e))
            if arrays:
                pending.add(good, captioner.encode_batch(np.stack(arrays), cfg.mirror))
            advance_task(bar, task, len(chunk))
        pending.finish()
    return pending.results, failures

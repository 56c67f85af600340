"""Captioning photos with a trained checkpoint: the Python API and the `caption` command's work.

    from captioning import Captioner
    Captioner.load("models/best.pt").caption("photo.jpg")   # -> 'a dog runs through the grass'
"""
import os

import torch

from captioning.training.checkpoint import BUILTIN, checkpoint_memory, describe, find_model, load_checkpoint, summarize
from captioning.features.encoders import EncoderSpec, build_encoder
from captioning.features.images import load_image
from captioning.features.extract import pick_device
from captioning.models.decoders import build_decoder
from captioning.models.ensemble import Ensemble, FusedMirror, MirrorPair
from captioning.config import ModelConfig
from captioning.results.outputs import PNG_WORKERS, OutputConfig, Pending, caption_photos, make_results
from captioning.search.numpy_search import SEARCH_BATCH
from captioning.config import SearchConfig
from captioning.search.torch_search import search
from captioning.features.tuning import fold_batchnorm
from captioning.utils import CaptioningError, add_task, advance_task, console, make_progress
from captioning.data.vocab import Vocabulary

class Captioner:
    def __init__(self, ckpt, device="auto", source=None):
        self.device = pick_device(device)
        self.source = source
        self.ckpt = ckpt
        self.vocab = Vocabulary(ckpt["vocab"])
        self.config = ModelConfig(**ckpt["model_config"])
        self._check_sizes(ckpt["decoder_state"])
        self.decoder = build_decoder(self.config)
        try:
            self.decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder_state"].items()})
        except RuntimeError:
            raise CaptioningError(f"The model file {source} does not match its own configuration "
                                  "(another version or a damaged file).") from None
        self.decoder.to(self.device).eval()
        self.spec = EncoderSpec(**ckpt["encoder"])
        self.grid_hw = tuple(ckpt.get("grid_hw") or (0, 0))
        self.memory = checkpoint_memory(ckpt, self.config.feat_dim)   # None: plain beam search
        self._encoder = None
        self._grounder = False   # built on first use (grounded.Grounder, or None where the encoder has no head)

    def _check_sizes(self, state):
        """The decoder the configuration describes, built on the meta device (no memory), must have the
        stored weights' shapes: a checkpoint cannot make us allocate a decoder larger than the file."""
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_decoder(self.config).state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in state.items()}:
            raise CaptioningError(f"The model file {self.source} does not match its own configuration "
                                  "(another version or a damaged file).")

    @classmethod
    def load(cls, model=None, workdir=".", device="auto", ensemble=()):
        """`model`: a path, 'default' for the built-in model, or None for the workdir's best model.
        `ensemble`: more checkpoints on the same encoder and vocabulary, searched together with it.
        A folder is an ONNX export: the same API from onnx_runtime.OnnxCaptioner (numpy and onnxruntime)."""
        path = find_model(workdir, model)
        if path.is_dir():
            from captioning.deploy.onnx_runtime import OnnxCaptioner
            return OnnxCaptioner.load(path, ensemble=ensemble)
        if path == BUILTIN and model != "default":
            console.print("Using the built-in Flickr8k model; train your own with "
                          "'python image_captioning.py train --data DIR'.")
        captioner = cls(load_checkpoint(path), device, source=path)
        if ensemble:
            captioner.join([cls(load_checkpoint(find_model(workdir, p)), device, source=p) for p in ensemble])
        return captioner

    def join(self, others):
        """Search with the mean word probabilities of this model and `others` (see models.Ensemble)."""
        for other in others:
            if other.vocab.words != self.vocab.words or other.spec.name != self.spec.name \
                    or other.spec.weights != self.spec.weights:
                raise CaptioningError(f"{other.source} cannot join {self.source} in an ensemble: models must share "
                                      "the encoder and the vocabulary (trained on the same data).")
        self.decoder = Ensemble([self.decoder, *(o.decoder for o in others)]).to(self.device).eval()
        self.source = ", ".join(str(s) for s in [self.source, *(o.source for o in others)])

    def describe(self):
        return describe(summarize(self.ckpt))

    def encoder(self):
        """Built on first use: the CNN costs more to build than the decoder."""
        if self._encoder is None:
            # The built-in model's encoder is the tool's own choice; any other file's may not start a download.
            trunk, transform = build_encoder(self.spec, download=self.source == BUILTIN)
            # Folded as extraction folds it: the same arithmetic as the training features, and faster.
            trunk = fold_batchnorm(trunk).to(self.device)
            if self.device.type == "cpu":
                trunk = trunk.to(memory_format=torch.channels_last)
            self._encoder = (trunk, transform)
        return self._encoder

    @torch.inference_mode()
    def encode(self, images, mirror=False):
        """PIL images → decoder input: the grid [B, P, C] or its mean [B, C] (with `mirror`, the mirrored
        photos' beside them: [B, P, 2C] or [B, 2C], as search with SearchConfig.mirror takes them)."""
        trunk, transform = self.encoder()
        x = torch.stack([transform(im) for im in images]).to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encode_batch(x, mirror)

    @torch.inference_mode()
    def encode_batch(self, x, mirror=False):
        """A ready float batch [B, 3, H, W] → decoder input (see encode)."""
        grid = self.encoder()[0](x).flatten(2).transpose(1, 2).float()
        if grid.shape[-1] != self.config.feat_dim:
            raise CaptioningError(f"This model expects {self.config.feat_dim}-channel features but encoder "
                                  f"'{self.spec.name}' gives {grid.shape[-1]}; the checkpoint is inconsistent.")
        if mirror:
            grid = torch.cat([grid, self.encoder()[0](x.flip(-1)).flatten(2).transpose(1, 2).float()], -1)
        return grid if self.decoder.uses_grid else grid.mean(1)

    def grounder(self):
        if self._grounder is False:
            from captioning.search.guided import Grounder
            self._grounder = Grounder.for_model(self.spec, self.vocab, self.config.feat_dim)
        return self._grounder

    def search(self, features, cfg: SearchConfig, keep_alphas=False):
        """`features` as encode(..., mirror=cfg.mirror) gives them."""
        decoder = self.search_decoder(cfg)
        if cfg.guidance and self.grounder() is not None:
            from captioning.search.guided import guided_search
            return guided_search(self.grounder(), decoder, features, cfg, keep_alphas, self.memory)
        return search(decoder, features, cfg, keep_alphas=keep_alphas, memory=self.memory)

    def search_decoder(self, cfg: SearchConfig):
        """The decoder search runs for `cfg`: the model's own, or with cfg.mirror the reading of both photos."""
        if not cfg.mirror:
            return self.decoder
        return FusedMirror(self.decoder, self.grid_hw) if cfg.mirror_mode == "fused" else MirrorPair(self.decoder)

    def results(self, names, hyps):
        from captioning.grounding.guidance import result_extras
        results = make_results(self.vocab, self.grid_hw, names, hyps)
        for result, hs in zip(results, hyps):
            result.captions, result.tags, result.confidence = result_extras(result.captions, hs)
        return results

    def caption_pil(self, images, cfg: SearchConfig = SearchConfig(), keep_alphas=False, names=None):
        names = names or [""] * len(images)
        return self.results(names, self.search(self.encode(images, cfg.mirror), cfg, keep_alphas))

    def caption(self, image, beam_size=SearchConfig.beam_size):
        """One image (a path or a PIL image) → its caption as text, with the default search."""
        pil = image if hasattr(image, "convert") else load_image(image)
        return self.caption_pil([pil], SearchConfig(beam_size=beam_size))[0].captions[0]


def caption_files(captioner, inputs, cfg: SearchConfig, outputs=None, paths=None, batch_size=None, workdir="."):
    """Caption files/folders and write what `outputs` (an outputs.OutputConfig; default: one PNG each) asks
    for; returns the Results of the photos captioned now. `paths`: the photos (outputs.Photo or paths)
    when the caller listed them already. One image → `outputs.output` is the PNG path (default
    captioned_image.png); several → it is a folder (default captioned/)."""
    opts = outputs or OutputConfig()

    def stream(photos, sink):
        threads = torch.get_num_threads()
        if sink.pool and captioner.device.type == "cpu":
            # The drawing processes need the cores more than the encoder's extra threads do: on 2 cores, one
            # torch thread beside two drawers captions 1.2x faster than two (bench/caption_folder.py).
            torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - PNG_WORKERS)))
        try:
            return _caption_stream(captioner, photos, cfg, sink, opts.attention, batch_size, workdir)
        finally:
            torch.set_num_threads(threads)
    return caption_photos(stream, inputs, opts, paths, captioner.decoder.has_attention)


def _caption_stream(captioner, photos, cfg, sink, keep_alphas, batch_size, workdir):
    """Decode and encode as feature extraction does (its calibrated batch size and memory format, decoding
    threads where cores are free), search in large batches, hand each result to `sink` without waiting."""
    from captioning.config import ExtractConfig
    from captioning.features.decoding import Preprocess
    from captioning.features.tuning import _set_format, choose_settings
    if not photos:
        return [], []
    trunk, transform = captioner.encoder()
    prep = Preprocess(transform)
    settings = choose_settings(ExtractConfig(batch_size=batch_size, device=str(captioner.device)),
                               captioner.device, captioner.spec.name, trunk, prep.crop, workdir, len(photos))
    _set_format(trunk, settings.channels_last)
    # While PNGs are drawn torch has one thread: searching beside the encoder keeps the second core busy.
    # Without them, two torch threads on one search at a time are faster (bench/caption_folder.py).
    pending = Pending(captioner, cfg, keep_alphas, sink, torch.cat, SEARCH_BATCH, background=bool(sink.pool))
    try:
        failures = _encode_all(captioner, photos, cfg, prep, settings, pending)
    except BaseException:   # Ctrl-C or an error: the search under way ends and is written; no new one starts
        pending.finish(search_rest=False)
        raise
    pending.finish()
    return pending.results, failures


def _encode_all(captioner, photos, cfg, prep, settings, pending):
    """Decode and encode every photo in batches into `pending`; returns the unreadable ones' messages."""
    from captioning.features.decoding import image_batches
    failures = []
    with make_progress(transient=True) as bar:
        task = add_task(bar, "Captioning", len(photos), unit="img")
        for rows, images, ok in image_batches([str(p.path) for p in photos], 0, prep, settings, captioner.device):
            for r in (r for r, good in zip(rows, ok) if not good):
                failures.append(_why_unreadable(photos[r].path))   # one bad file must not cost the others
            keep = [i for i, good in enumerate(ok) if good]
            if keep:
                x = prep.batch(images[keep] if len(keep) < len(ok) else images, captioner.device,
                               settings.channels_last)
                pending.add([photos[rows[i]] for i in keep], captioner.encode_batch(x, cfg.mirror))
            advance_task(bar, task, len(rows))
    return failures


def _why_unreadable(path):
    try:
        load_image(path)
    except CaptioningError as e:
        return str(e)
    return f"Could not read image {path}"

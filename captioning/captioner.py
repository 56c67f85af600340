"""Captioning photos with a trained checkpoint: the Python API and the `caption` command's work.

    from captioning import Captioner
    Captioner.load("models/best.pt").caption("photo.jpg")   # -> 'a dog runs through the grass'
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import BUILTIN, describe, find_model, load_checkpoint, summarize
from .encoders import EncoderSpec, build_encoder, load_image
from .features import pick_device
from .models import Ensemble, ModelConfig, build_decoder
from .search import SearchConfig, search
from .tuning import fold_batchnorm
from .utils import CaptioningError, add_task, advance_task, collect_images, console, make_progress
from .vocab import Vocabulary

@dataclass
class Result:
    image: str
    captions: list                   # best first
    scores: list                     # length-normalised log-probabilities, same order
    words: list = field(default_factory=list)   # the best caption's words (for attention maps)
    alphas: object = None            # [words, h, w] attention of the best caption, when the decoder has it
    png: str | None = None           # the annotated picture written for it
    attention_png: str | None = None

    def to_json(self):
        out = {"image": self.image, "caption": self.captions[0], "captions": self.captions,
               "scores": [round(s, 4) for s in self.scores], "png": self.png}
        return out if self.attention_png is None else {**out, "attention_png": self.attention_png}


class Captioner:
    def __init__(self, ckpt, device="auto", source=None):
        self.device = pick_device(device)
        self.source = source
        self.ckpt = ckpt
        self.vocab = Vocabulary(ckpt["vocab"])
        self.config = ModelConfig(**ckpt["model_config"])
        self.decoder = build_decoder(self.config)
        try:
            self.decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder_state"].items()})
        except RuntimeError:
            raise CaptioningError(f"The model file {source} does not match its own configuration "
                                  "(another version or a damaged file).") from None
        self.decoder.to(self.device).eval()
        self.spec = EncoderSpec(**ckpt["encoder"])
        self.grid_hw = tuple(ckpt.get("grid_hw") or (0, 0))
        self._encoder = None

    @classmethod
    def load(cls, model=None, workdir=".", device="auto", ensemble=()):
        """`model`: a path, 'default' for the built-in model, or None for the workdir's best model.
        `ensemble`: more checkpoints on the same encoder and vocabulary, searched together with it."""
        path = find_model(workdir, model)
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
            trunk, transform = build_encoder(self.spec)
            # Folded as extraction folds it: the same arithmetic as the training features, and faster.
            trunk = fold_batchnorm(trunk).to(self.device)
            if self.device.type == "cpu":
                trunk = trunk.to(memory_format=torch.channels_last)
            self._encoder = (trunk, transform)
        return self._encoder

    @torch.inference_mode()
    def encode(self, images):
        """PIL images → decoder input: the grid [B, P, C] or its mean [B, C]."""
        trunk, transform = self.encoder()
        x = torch.stack([transform(im) for im in images]).to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        grid = trunk(x).flatten(2).transpose(1, 2).float()
        if grid.shape[-1] != self.config.feat_dim:
            raise CaptioningError(f"This model expects {self.config.feat_dim}-channel features but encoder "
                                  f"'{self.spec.name}' gives {grid.shape[-1]}; the checkpoint is inconsistent.")
        return grid if self.decoder.uses_grid else grid.mean(1)

    def search(self, features, cfg: SearchConfig, keep_alphas=False):
        return search(self.decoder, features, cfg, keep_alphas=keep_alphas)

    def caption_pil(self, images, cfg: SearchConfig = SearchConfig(), keep_alphas=False, names=None):
        names = names or [""] * len(images)
        hyps = self.search(self.encode(images), cfg, keep_alphas)
        results = []
        for name, hs in zip(names, hyps):
            best = hs[0]
            alphas = None
            if best.alphas is not None and self.grid_hw[0]:
                alphas = best.alphas[:len(best.tokens)].reshape(-1, *self.grid_hw).numpy()
            results.append(Result(name, [self.vocab.decode(h.tokens) for h in hs], [h.score for h in hs],
                                  [self.vocab.words[t] for t in best.tokens], alphas))
        return results

    def caption(self, image, beam_size=3):
        """One image (a path or a PIL image) → its caption as text."""
        pil = image if hasattr(image, "convert") else load_image(image)
        return self.caption_pil([pil], SearchConfig(beam_size=beam_size))[0].captions[0]


def caption_files(captioner, inputs, cfg: SearchConfig, output=None, attention=False, batch_size=8, paths=None):
    """Caption files/folders, write one annotated PNG each; returns the Results (with their PNG paths).

    One image → `output` is the PNG path (default captioned_image.png); several → `output` is a folder."""
    from .render import save_attention_map, save_captioned_image
    paths = paths or collect_images(inputs)
    single = len(paths) == 1 and not Path(inputs[0]).is_dir()
    out = Path(output) if output else Path("captioned_image.png" if single else "captioned")
    if single and out.is_dir():
        out = out / "captioned_image.png"
    results, failures = [], []
    with make_progress(transient=True) as bar:
        task = add_task(bar, "Captioning", len(paths), unit="img")
        for i in range(0, len(paths), batch_size):
            chunk, images = [], []
            for p in paths[i:i + batch_size]:
                try:
                    images.append(load_image(p))
                    chunk.append(p)
                except CaptioningError as e:
                    failures.append(str(e))   # one bad file in a folder must not cost the others
            for p, im, res in zip(chunk, images, captioner.caption_pil(images, cfg, attention, [str(c) for c in chunk])
                                  if images else []):
                png = out if single else out / f"{p.stem}_captioned.png"
                save_captioned_image(im, res.captions, png)
                res.png = str(png)
                if attention and res.alphas is not None:
                    res.attention_png = str(save_attention_map(im, res.words, res.alphas,
                                                               png.with_name(png.stem + "_attention.png")))
                results.append(res)
            advance_task(bar, task, len(paths[i:i + batch_size]))
    if failures and single:
        raise CaptioningError(failures[0])
    for f in failures:
        console.print(f"[yellow]Skipped: {f}[/]")
    if attention and not captioner.decoder.uses_grid:
        console.print("[yellow]This model has no attention (lstm decoder); no attention map was drawn.[/]")
    return results

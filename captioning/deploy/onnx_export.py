"""ONNX export: a self-contained folder that captions without PyTorch (read by onnx_runtime.py).

Three graphs with a dynamic batch: the encoder (BatchNorm folded, as captioning uses it), the decoder's
init (grid → state) and its one-word step (tokens + state → log-probabilities, changed state, attention),
the decoder state as explicit inputs and outputs; and, for an encoder with pretrained weights, its ImageNet
classifier on the pooled features (head.onnx) with the class → word mapping beside it: the keywords
(tags.py), the same in both runtimes. Beam search is not in a graph: it stays in code
(npsearch.py), so its rules (length normalisation, trigram block, N-best) are written once. Any object with
the decoder contract exports, an ensemble (models.Ensemble) included. Each graph is run once with
onnxruntime against torch before the folder is written: an export that disagrees is refused.
"""
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captioning.deploy.onnx_runtime import CONFIG, FORMAT, GRAPHS, HEAD, MEMORY, VERSION, VOCAB, open_session, read_config
from captioning.grounding.tags import MAPPING, MAPPING_FILE, TagMap
from captioning.utils import CaptioningError, atomic_write, atomic_write_json

OPSET = 17
TOLERANCE = 1e-3     # largest difference from torch the check allows, relative to the outputs' scale


class _Encoder(nn.Module):
    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, images):
        return self.trunk(images).flatten(2).transpose(1, 2)             # [B, P, C], as Captioner.encode_batch


class _Init(nn.Module):
    def __init__(self, decoder, keys):
        super().__init__()
        self.decoder, self.keys = decoder, keys

    def forward(self, grid):
        state = self.decoder.init_state(grid if self.decoder.uses_grid else grid.mean(1))
        return tuple(state[k] for k in self.keys)


class _Step(nn.Module):
    def __init__(self, decoder, keys, changing):
        super().__init__()
        self.decoder, self.keys, self.changing = decoder, keys, changing

    def forward(self, tokens, *values):
        logits, new, alpha = self.decoder.step(tokens, dict(zip(self.keys, values)))
        out = (logits.float().log_softmax(-1), *(new[k] for k in self.changing))
        return out if alpha is None else (*out, alpha)


class _Head(nn.Module):
    """The encoder's ImageNet classifier on the pooled features [B, C] (what its own forward pools)."""

    def __init__(self, classifier, four_d):
        super().__init__()
        self.classifier, self.four_d = classifier, four_d

    def forward(self, pooled):
        return self.classifier(pooled[:, :, None, None] if self.four_d else pooled).flatten(1)


def classifier_head(spec, channels, classes):
    """The encoder's pretrained classifier as a _Head giving `classes` logits, or None (random weights, or a
    network whose classifier does not sit on the pooled features)."""
    import torchvision
    from captioning.features.encoders import concrete_spec, resolve_weights
    spec = concrete_spec(spec)
    if spec.weights is None:
        return None
    weights = None if spec.weights_path else resolve_weights(spec.name, spec.weights)
    model = torchvision.models.get_model(spec.name, weights=weights)
    if spec.weights_path:
        model.load_state_dict(torch.load(spec.weights_path, map_location="cpu", weights_only=True))
    classifier = getattr(model, "fc", None) or getattr(model, "classifier", None)
    if classifier is None:
        return None
    for four_d in (False, True):    # convnext's classifier starts with a LayerNorm2d over [B, C, 1, 1]
        head = _Head(classifier, four_d).eval()
        try:
            with torch.no_grad():
                if head(torch.zeros(2, channels)).shape == (2, classes):
                    return head
        except RuntimeError:
            continue
    return None


def _graph(module, args, inputs, outputs):
    """The ONNX bytes of `module` on `args`, every input and output batch-first with a dynamic batch."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the legacy exporter announces its deprecation
        torch.onnx.export(module.eval(), args, f, input_names=inputs, output_names=outputs, opset_version=OPSET,
                          dynamic_axes={n: {0: "batch"} for n in inputs + outputs}, dynamo=False)
    return f.getvalue()


def _preprocess(transform):
    """The weights' transform as numbers the runtime reproduces (images.resize_crop, images.normalise)."""
    needed = ("resize_size", "crop_size", "mean", "std", "interpolation")
    if not all(hasattr(transform, a) for a in needed):
        raise CaptioningError(f"This encoder's preprocessing ({type(transform).__name__}) is not resize, crop and "
                              "normalise; it cannot be exported to ONNX.")
    size = transform.resize_size
    return {"resize": int(size[0] if isinstance(size, (list, tuple)) else size), "crop": int(transform.crop_size[0]),
            "interpolation": transform.interpolation.value, "mean": [float(v) for v in transform.mean],
            "std": [float(v) for v in transform.std]}


def _probe(encoder, decoder, crop, vocab_size, batch, gen):
    """Inputs for each graph at `batch`: images, a grid with the encoder's statistics, state, words."""
    with torch.no_grad():
        images = torch.randn(batch, 3, crop, crop, generator=gen)
        grid = encoder(images)
        probe = torch.randn(grid.shape, generator=gen) * grid.std() + grid.mean()
        state = decoder.init_state(probe if decoder.uses_grid else probe.mean(1))
    tokens = torch.randint(4, vocab_size, (batch,), generator=gen)     # words, not the special tokens
    return images, grid, probe, state, tokens


def build_graphs(captioner):
    """(graph bytes by name, state layout, torch's outputs on another batch size, preprocessing, grid shape)."""
    decoder = captioner.decoder.cpu().eval()
    trunk, transform = captioner.encoder()
    prep = _preprocess(transform)
    encoder = _Encoder(trunk.cpu().to(memory_format=torch.contiguous_format)).eval()
    gen = torch.Generator().manual_seed(0)
    images, grid, probe, state, tokens = _probe(encoder, decoder, prep["crop"], len(captioner.vocab), 2, gen)
    keys = list(state)
    per_image = [k for k in keys if k in getattr(decoder, "per_image", ())]
    changing = [k for k in keys if k not in per_image]
    init, step = _Init(decoder, keys).eval(), _Step(decoder, keys, changing).eval()
    with torch.no_grad():
        alpha = len(step(tokens, *state.values())) > 1 + len(changing)
    step_outputs = ["logprobs", *[f"new_{k}" for k in changing]] + (["alpha"] if alpha else [])
    graphs = {"encoder": _graph(encoder, (images,), ["images"], ["grid"]),
              "init": _graph(init, (probe,), ["grid"], keys),
              "step": _graph(step, (tokens, *state.values()), ["tokens", *keys], step_outputs)}
    # The check runs another batch size than the one traced: a batch size baked into a graph shows there.
    images, grid, probe, state, tokens = _probe(encoder, decoder, prep["crop"], len(captioner.vocab), 3, gen)
    with torch.no_grad():
        reference = {"encoder": (["images"], [images], [grid]), "init": (["grid"], [probe], list(init(probe))),
                     "step": (["tokens", *keys], [tokens, *state.values()], list(step(tokens, *state.values())))}
    layout = {"keys": keys, "per_image": per_image, "changing": changing, "alpha": alpha}
    _add_head(captioner, graphs, reference, grid, gen)
    return graphs, layout, reference, prep, grid.shape


def _add_head(captioner, graphs, reference, grid, gen):
    """The classifier head's graph (pooled features → logits), when the encoder has one the mapping fits."""
    head = classifier_head(captioner.spec, grid.shape[-1], len(TagMap.load(MAPPING))) if MAPPING.exists() else None
    if head is None:
        return
    graphs["head"] = _graph(head, (grid.mean(1),), ["pooled"], ["logits"])
    pooled = torch.randn(3, grid.shape[-1], generator=gen).abs()      # post-ReLU features are not negative
    with torch.no_grad():
        reference["head"] = (["pooled"], [pooled], [head(pooled)])


def _check(folder, reference):
    """Each written graph, run by onnxruntime, must give torch's outputs."""
    for name, (names, inputs, expected) in reference.items():
        session = open_session(folder / {**GRAPHS, "head": HEAD}[name], names)
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        if [g.shape for g in got] != [tuple(e.shape) for e in expected]:
            raise CaptioningError(f"The exported {name} graph gives other shapes than the model (a batch size "
                                  "fixed in the graph?); this decoder cannot be exported to ONNX.")
        # Relative to the outputs' scale: CNN features run to tens, log-probabilities to about -20.
        worst = max(float(np.abs(g - e.numpy()).max() / max(1.0, np.abs(e.numpy()).max()))
                    for g, e in zip(got, expected))
        if not worst <= TOLERANCE:
            raise CaptioningError(f"The exported {name} graph disagrees with the model (by {worst:.2g}); this "
                                  "decoder cannot be exported to ONNX.")


def export_onnx(captioner, folder):
    """Write the export folder for a (torch) Captioner: graphs, vocab.json, config.json (last: a folder
    without it is not an export). Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CaptioningError(f"--output {folder} is a file; an ONNX export is a folder.")
    name = getattr(captioner.decoder, "name", "") or type(captioner.decoder).__name__
    try:
        graphs, layout, reference, prep, grid_shape = build_graphs(captioner)
    except CaptioningError:
        raise
    except Exception as e:   # the tracer meets what it cannot express (data-dependent control flow, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CaptioningError(f"The {name} decoder cannot be exported to ONNX: {first}") from e
    (folder / CONFIG).unlink(missing_ok=True)      # no half-new folder passes for an export meanwhile
    for key, data in graphs.items():
        atomic_write(folder / {**GRAPHS, "head": HEAD}[key], lambda f, data=data: f.write(data))
    _check(folder, reference)
    atomic_write_json(folder / VOCAB, captioner.vocab.words)
    (folder / MEMORY).unlink(missing_ok=True)
    if "head" in graphs:    # the export carries its own copy: it tags as it was exported, wherever it goes
        atomic_write(folder / MAPPING_FILE, lambda f: f.write(MAPPING.read_bytes()))
    else:                   # an earlier export's head in this folder must not tag this model
        for stale in (HEAD, MAPPING_FILE):
            (folder / stale).unlink(missing_ok=True)
    if captioner.memory is not None:
        atomic_write(folder / MEMORY, lambda f: np.savez(f, **captioner.memory.to_arrays()))
    members = [captioner.decoder] if not hasattr(captioner.decoder, "members") else list(captioner.decoder.members)
    config = {"format": FORMAT, "version": VERSION, "decoder": "+".join(m.name for m in members),
              "uses_grid": bool(captioner.decoder.uses_grid), "grid_hw": list(captioner.grid_hw),
              "feat_dim": int(grid_shape[-1]), "encoder": captioner.spec.to_dict(), "preprocess": prep,
              "state": layout, "source": str(captioner.source), "opset": OPSET,
              "evaluation": (captioner.ckpt.get("evaluation") or {}),
              "tags": {"graph": HEAD, "mapping": MAPPING_FILE} if "head" in graphs else None}
    atomic_write_json(folder / CONFIG, config)
    read_config(folder)                             # what the runtime will check, checked now
    return folder

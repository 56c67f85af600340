"""Frozen torchvision CNNs as image encoders: by name, with their weights' own preprocessing.

An encoder maps a batch of images to a spatial grid of features [B, C, h, w] (7x7 for 224x224 inputs).
The Show-and-Tell decoder uses the grid's mean (what the classifier's global pool computes); the
attention decoder looks at every cell.
"""
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from captioning.utils import CaptioningError

SUGGESTED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2",
             "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf"]


@dataclass
class EncoderSpec:
    """What a checkpoint records so the same encoder can be rebuilt at caption time."""
    name: str = "resnet50"
    weights: str | None = "DEFAULT"  # a torchvision weights tag, or None for random init (demo, tests)
    seed: int = 0                    # random init is made reproducible by this seed
    weights_path: str | None = None  # a local state-dict file instead of torchvision's download

    def to_dict(self):
        return asdict(self)


def resolve_weights(name, tag):
    """The torchvision weights enum member for `name`; `tag` 'DEFAULT' picks the recommended one."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        known = ", ".join(SUGGESTED)
        raise CaptioningError(f"Unknown encoder '{name}'; try one of: {known}.") from e
    return enum.DEFAULT if tag in (None, "DEFAULT") else enum[tag]


def _cached(weights):
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)).exists()


def concrete_spec(spec: EncoderSpec):
    """Pin 'DEFAULT' to an actual weights tag, preferring one already in the local cache: offline, a
    user with e.g. MobileNetV2's V1 file must not be sent to download V2. Checkpoints record the result."""
    if spec.weights != "DEFAULT" or spec.weights_path:
        return spec
    default = resolve_weights(spec.name, "DEFAULT")
    if not _cached(default):
        cached = [w for w in torchvision.models.get_model_weights(spec.name) if _cached(w)]
        if cached:
            default = cached[0]
    return EncoderSpec(spec.name, default.name, spec.seed, spec.weights_path)


def _trunk(model, name):
    """The convolutional part of a classifier: everything before global pooling."""
    if hasattr(model, "fc") and hasattr(model, "avgpool"):            # resnet, resnext, wide_resnet, regnet
        layers = [m for n, m in model.named_children() if n not in ("avgpool", "fc", "dropout")]
        return nn.Sequential(*layers)
    if hasattr(model, "features"):                                     # mobilenet, efficientnet, convnext, vgg
        if name.startswith("densenet"):                               # densenet applies its last ReLU in forward
            return nn.Sequential(model.features, nn.ReLU())
        return model.features
    raise CaptioningError(f"Encoder '{name}' is not supported: it has no convolutional trunk to take features from.")


def _download_hint(name):
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"Could not fetch the pretrained weights for '{name}' (no internet?). Put the weights file in "
            f"{cache} (or set TORCH_HOME to a folder with hub/checkpoints/ holding it), "
            f"or pass --encoder-weights PATH.")


def build_encoder(spec: EncoderSpec, download=True):
    """Build the frozen trunk and its preprocessing transform. Returns (module in eval mode, transform).
    `download=False`: weights that are not in the local cache are one sentence, not a download (a model
    file from elsewhere names the encoder: it must not make the machine fetch gigabytes)."""
    spec = concrete_spec(spec)
    weights = resolve_weights(spec.name, spec.weights)
    transform = weights.transforms()  # the right resize/crop/normalisation even for random init
    load_pretrained = spec.weights is not None and spec.weights_path is None
    if load_pretrained and not download and not _cached(weights):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise CaptioningError(f"This model's encoder '{spec.name}' needs pretrained weights that are not on this "
                              f"machine; nothing was downloaded. Put {weights.url} in {cache} (or set TORCH_HOME "
                              "to a folder whose hub/checkpoints/ holds it).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # random-init encoders come out identical at train and caption time
        try:
            model = torchvision.models.get_model(spec.name, weights=weights if load_pretrained else None)
        except Exception as e:  # URLError (an OSError) offline; RuntimeError/EOFError for a damaged cached file
            if not load_pretrained:
                raise
            if isinstance(e, OSError):
                raise CaptioningError(_download_hint(spec.name)) from e
            raise CaptioningError(f"The cached weights file for '{spec.name}' in {Path(torch.hub.get_dir())} "
                                  "is damaged; delete it and run again (or pass --encoder-weights PATH).") from e
    if spec.weights_path:
        try:
            state = torch.load(os.path.expanduser(spec.weights_path), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError as e:
            raise CaptioningError(f"Encoder weights file not found: {spec.weights_path}") from e
        except Exception as e:
            raise CaptioningError(f"Could not load encoder weights from {spec.weights_path}: "
                                  f"{str(e).splitlines()[0]}") from e
    trunk = _trunk(model, spec.name).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk, transform

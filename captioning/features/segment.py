"""Semantic segmentation for the dashboard: which pixels are a person, a dog, a car... drawn over the photo.

torchvision's DeepLabV3 with a MobileNetV3-Large backbone (about 11M parameters, well under a second per
photo on a CPU), trained on the COCO images of the 20 PASCAL VOC classes. Its weights come through
torchvision's weights API, like the encoders', into $TORCH_HOME/hub/checkpoints/. When they cannot be
fetched, `load_segmenter` raises one sentence saying so, and the caller shows it and carries on captioning.

No streamlit here: the dashboard draws what these functions return, and the tests call them directly.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights

from captioning.utils import CaptioningError

MODEL_NAME = "deeplabv3_mobilenet_v3_large"
WEIGHTS = DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
# torchvision's category names, written the way a person reads them.
_READABLE = {"__background__": "background", "diningtable": "dining table", "pottedplant": "potted plant",
             "tvmonitor": "tv monitor"}
LABELS = [_READABLE.get(name, name) for name in WEIGHTS.meta["categories"]]


def voc_palette(n):
    """The PASCAL VOC colour map (label i's bits spread over r, g, b from the high bit down): the colours
    people who work with these 21 classes already know (person is pink, dog purple, background black)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        palette[i] = (r, g, b)
    return palette


PALETTE = voc_palette(len(LABELS))


@dataclass
class LegendEntry:
    label: int        # class index
    name: str         # e.g. "person"
    colour: str       # "#c08080", the colour drawn over its pixels
    share: float      # fraction of the image's pixels, 0..1


def weights_file():
    """Where torchvision keeps (or would download) the weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(WEIGHTS.url).name


class Segmenter:
    """A DeepLabV3 model in eval mode and its preprocessing (resize the short side to 520, normalise)."""

    def __init__(self, model, device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.transform = WEIGHTS.transforms()

    @torch.inference_mode()
    def labels(self, image):
        """A PIL image → its class per pixel: uint8 [height, width] at the image's own size."""
        image = image.convert("RGB")
        x = self.transform(image).unsqueeze(0).to(self.device)
        scores = self.model(x)["out"]                     # [1, classes, h, w] at the resized size
        small = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        # Nearest neighbour: a class index must stay an index, never a blend of two.
        return np.asarray(Image.fromarray(small).resize(image.size, Image.NEAREST))


def load_segmenter(pretrained=True, device="cpu"):
    """The segmentation model, with its pretrained weights (downloaded once), or randomly initialised when
    `pretrained` is False (tests). A failure to get the weights is one sentence (CaptioningError)."""
    try:
        model = torchvision.models.get_model(MODEL_NAME, weights=WEIGHTS if pretrained else None,
                                             weights_backbone=None, num_classes=len(LABELS))
    except OSError:  # URLError offline, a proxy refusing, a full disk while downloading
        raise CaptioningError(f"Segmentation is unavailable because its weights could not be downloaded "
                              f"(no internet?); put {weights_file().name} in {weights_file().parent} "
                              "to turn it on.") from None
    except Exception:  # RuntimeError, EOFError...: a half-downloaded or damaged file in the cache
        raise CaptioningError(f"Segmentation is unavailable because the cached weights file "
                              f"{weights_file()} is damaged; delete it to download it again.") from None
    return Segmenter(model, device)


def _check(image, labels):
    labels = np.asarray(labels)
    if labels.shape != (image.height, image.width):
        raise ValueError(f"labels of shape {labels.shape} do not match the image ({image.height}, {image.width})")
    if labels.size and int(labels.max()) >= len(LABELS):
        raise ValueError(f"label {int(labels.max())} is not one of the {len(LABELS)} classes")
    return labels


def overlay(image, labels, alpha=0.5):
    """The photo with each found object tinted in its class colour; background pixels stay as they were,
    so the photo remains readable around the objects."""
    image = image.convert("RGB")
    labels = _check(image, labels)
    photo = np.asarray(image, dtype=np.float32)
    tint = PALETTE[labels].astype(np.float32)
    found = (labels > 0)[..., None]
    mixed = np.where(found, (1 - alpha) * photo + alpha * tint, photo)
    return Image.fromarray(np.clip(mixed.round(), 0, 255).astype(np.uint8), "RGB")


def legend(labels):
    """The classes found (background left out), largest area first, with their colours and shares."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel(), minlength=len(LABELS)) if labels.size else np.zeros(len(LABELS))
    total = max(int(labels.size), 1)
    entries = [LegendEntry(int(i), LABELS[i], "#{:02x}{:02x}{:02x}".format(*PALETTE[i]), counts[i] / total)
               for i in range(1, len(LABELS)) if counts[i] > 0]
    return sorted(entries, key=lambda e: (-e.share, e.label))

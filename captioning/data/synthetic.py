"""A synthetic shapes dataset in the Mini COCO layout, for tests and the offline demo.

Each image is a plain light background with one coloured shape in one position, captioned in 3–5
phrasings ("a red circle on the left", "A red circle at the left."...). It is small and easy enough that
a decoder learns it in about a minute on a CPU, yet it goes through exactly the same loader, vocabulary,
feature and training code as real Mini COCO, including its messy case, punctuation and trailing spaces.

Uses only Pillow and numpy so that generating 600 images takes a second or two.
"""
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning.utils import CaptioningError, atomic_write_json

COLOURS = {"red": (215, 35, 35), "green": (35, 155, 50), "blue": (35, 70, 215), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
# Shape centres as fractions of the side. With a half-extent of at most 0.14 and jitter of 0.03 the shape stays
# within [0.11, 0.89]: inside the central 80%, so a center crop (which may cut ~6% of each border) never clips it.
CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}

# Phrasings. {where} is "on the left" / "at the top" so that every caption reads naturally.
TEMPLATES = [
    "a {colour} {shape} {where}",
    "a {colour} {shape} {where} of the picture",
    "there is a {colour} {shape} {where}",
    "a {colour} {shape} {where} of the image",
    "a {colour} {shape} {where} on a plain background",
    "a single {colour} {shape} {where}",
    "the picture shows a {colour} {shape} {where}",
]


def _where(position):
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def _messy(text, rng):
    """Real Mini COCO captions vary in case, final punctuation and trailing spaces; so do these."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    text += rng.choice(["", ".", " .", "."])
    if rng.random() < 0.25:
        text += " "
    return text


def _draw(size, colour, shape, position, rng):
    """One RGB image: light background, one filled shape."""
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = CENTRES[position]
    cx, cy = (cx + rng.uniform(-0.03, 0.03)) * size, (cy + rng.uniform(-0.03, 0.03)) * size
    r = rng.uniform(0.11, 0.14) * size  # half-extent: the shape spans about a quarter of the side
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def make_shapes_dataset(root, n_images=600, size=224, seed=0):
    """Write a shapes dataset to `root` (captions.json, truth.json, Images/) and return `root`.

    The same arguments give byte-identical files. Every (colour, shape, position) combination appears
    about equally often, so a hash split's small val and test sets still cover most of them."""
    if n_images < 1 or size < 32:
        raise CaptioningError("A shapes dataset needs at least 1 image of at least 32×32 pixels.")
    root = Path(root)
    images = root / "Images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    # Balanced: shuffled passes over all 48 combinations.
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    order = []
    while len(order) < n_images:
        order += [combos[i] for i in rng.permutation(len(combos))]
    # Sparse, unordered ids like real COCO, so nothing downstream can rely on ids being 0..n-1.
    ids = sorted(int(i) for i in rng.choice(np.arange(1, 600_000), size=n_images, replace=False))

    captions, truth = [], {}
    for image_id, (colour, shape, position) in zip(ids, order):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        image = _draw(size, colour, shape, position, rng)
        # Temp name + os.replace so that a crash never leaves a truncated JPEG under the real name. No fsync per
        # image (600 fsyncs would be slow); captions.json, written last and atomically, marks the set complete.
        tmp = images / f".{name}.tmp"
        image.save(tmp, format="JPEG", quality=92)
        os.replace(tmp, images / name)
        k = int(rng.integers(3, 6))
        for template in rng.choice(TEMPLATES, size=k, replace=False):
            text = template.format(colour=colour, shape=shape, where=_where(position))
            captions.append({"image_id": image_id, "caption": _messy(text, rng)})
        truth[str(image_id)] = {"file": name, "colour": colour, "shape": shape, "position": position}

    # Mini COCO's captions.json is not grouped by image; shuffle so the loader's grouping is exercised.
    captions = [captions[i] for i in rng.permutation(len(captions))]
    atomic_write_json(root / "truth.json", truth)
    atomic_write_json(root / "captions.json", captions)
    return root


def shapes_truth(root):
    """{image_id: {"file", "colour", "shape", "position"}} for a dataset written by make_shapes_dataset."""
    path = Path(root) / "truth.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CaptioningError(f"Could not read the shapes ground truth {path}: {e}.") from None
    return {int(k): v for k, v in data.items()}


def describe(truth_entry):
    """The canonical caption of one image's truth entry, e.g. "a red circle on the left"."""
    return f"a {truth_entry['colour']} {truth_entry['shape']} {_where(truth_entry['position'])}"


def truth_for_image(truth, image_path):
    """The truth entry of an image file (e.g. a Record's image), looked up by the id in its name."""
    return truth[int(Path(image_path).stem.rsplit("_", 1)[-1])]

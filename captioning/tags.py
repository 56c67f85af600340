"""Keywords from an ImageNet classifier head: its 1,000 classes' probabilities summed into caption words.

numpy only: the torch Captioner and the ONNX runtime both call `tags_from_logits`, so the two runtimes
give the same tags from the same logits. The mapping file (captioning/assets/imagenet_words.json) names,
for each class in the head's order, the caption word(s) it counts for ("Egyptian cat" and "tabby" → cat),
or null for a class no caption word fits. A class with several words counts fully for each ("moped" →
scooter and motorcycle): a word's score is the probability that the photo shows one of its classes.
"""
import json
from pathlib import Path

import numpy as np

from captioning.utils import CaptioningError

MAPPING_FILE = "imagenet_words.json"
MAPPING = Path(__file__).resolve().parent / "assets" / MAPPING_FILE


def class_words(mapping):
    """The mapping as one tuple of words per class. Accepted shapes: a list in class order, or a dict of
    class index (as text) → entry, or {"classes": that list}; an entry is a word, a list of words, null, or
    {"index": i, "words": [...], ...} as tools/imagenet_words.py writes them."""
    if isinstance(mapping, dict) and "classes" in mapping:
        mapping = mapping["classes"]
    if isinstance(mapping, list) and mapping and all(isinstance(e, dict) for e in mapping):
        try:
            mapping = {str(e.get("index", i)): e.get("words") for i, e in enumerate(mapping)}
        except AttributeError:
            raise CaptioningError("The tag mapping's classes must each be an object with its words.") from None
    if isinstance(mapping, dict):
        try:
            by_index = {int(k): v for k, v in mapping.items()}
        except ValueError:
            raise CaptioningError("The tag mapping's keys must be class numbers (0, 1, ...).") from None
        mapping = [by_index.get(i) for i in range(max(by_index, default=-1) + 1)]
    if not isinstance(mapping, list):
        raise CaptioningError("The tag mapping must list a word (or null) for each class.")
    out = []
    for entry in mapping:
        words = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise CaptioningError(f"The tag mapping's entry {entry!r} is not a word, a list of words or null.")
        out.append(tuple(dict.fromkeys(" ".join(w.split()) for w in words)))
    return out


class TagMap:
    """The words (sorted) and the 0/1 matrix [classes, words] that sums class probabilities into them."""

    def __init__(self, mapping):
        classes = class_words(mapping)
        self.words = sorted({w for ws in classes for w in ws})
        column = {w: i for i, w in enumerate(self.words)}
        self.matrix = np.zeros((len(classes), len(self.words)), np.float32)
        for c, ws in enumerate(classes):
            for w in ws:
                self.matrix[c, column[w]] = 1.0
        self.mapping = mapping

    @classmethod
    def load(cls, path=MAPPING):
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise CaptioningError(f"The tag mapping {path} is missing or damaged ({type(e).__name__}).") from e

    def __len__(self):
        return self.matrix.shape[0]


def tags_from_logits(logits, tag_map: TagMap, threshold):
    """Classifier logits [B, classes] → per image, [{"word", "score"}] of the words whose summed class
    probability (softmax) is above `threshold`, highest first (ties by word, so both runtimes agree)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(tag_map):
        raise CaptioningError(f"The classifier gives {logits.shape[-1]} classes but the tag mapping has "
                              f"{len(tag_map)}; they do not belong together.")
    z = np.exp(logits - logits.max(1, keepdims=True))
    scores = (z / z.sum(1, keepdims=True)) @ tag_map.matrix.astype(np.float64)
    out = []
    for row in scores:
        keep = [i for i in np.flatnonzero(row > threshold)]
        keep.sort(key=lambda i: (-row[i], tag_map.words[i]))
        out.append([{"word": tag_map.words[i], "score": float(min(1.0, row[i]))} for i in keep])
    return out

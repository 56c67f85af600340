"""Keywords from an ImageNet classifier head: its 1,000 classes' probabilities summed into caption words.

numpy only, so that the torch Captioner and the ONNX runtime give the same tags from the same logits. The
mapping file (captioning/assets/imagenet_words.json, tools/imagenet_words.py) names, for each class in the
head's order, its caption words, most specific first, then the hypernyms ("tabby" → cat, animal). A class
counts for every word of its chain: a word's score is the probability that the photo shows one of the
classes under it ("dog" collects every breed, "animal" every animal). The same rule as grounding.Head.tags.
"""
import json
from pathlib import Path

import numpy as np

from captioning.utils import CaptioningError

MAPPING_FILE = "imagenet_words.json"
MAPPING = Path(__file__).resolve().parents[1] / "assets" / MAPPING_FILE
LIMIT = 6     # keywords a photo gets at most (as grounding.Head.tags): the object and its hypernyms


def class_words(mapping):
    """The mapping as one tuple of words per class. Accepted shapes: a list in class order, or a dict of
    class index (as text) → entry, or {"classes": that list}; an entry is a word, a list of words, null, or
    {"index": i, "words": [...], ...} as tools/imagenet_words.py writes them."""
    if isinstance(mapping, dict) and "classes" in mapping:
        mapping = mapping["classes"]
    if isinstance(mapping, list) and mapping and all(isinstance(e, dict) for e in mapping):
        mapping = {str(e.get("index", i)): e.get("words") for i, e in enumerate(mapping)}
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
    """The words (sorted), the 0/1 matrix [classes, words] that sums class probabilities into them, and
    how many classes each word covers (fewer is more specific)."""

    def __init__(self, mapping):
        classes = class_words(mapping)
        self.words = sorted({w for ws in classes for w in ws})
        column = {w: i for i, w in enumerate(self.words)}
        self.matrix = np.zeros((len(classes), len(self.words)), np.float32)
        for c, ws in enumerate(classes):
            self.matrix[c, [column[w] for w in ws]] = 1.0
        self.size = self.matrix.sum(0)

    @classmethod
    def load(cls, path=MAPPING):
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise CaptioningError(f"The tag mapping {path} is missing or damaged ({type(e).__name__}).") from e

    def __len__(self):
        return self.matrix.shape[0]


def class_probs(logits):
    """Logits [B, K], or [R, B, K] for R readings of each photo (it and its mirror image) → class
    probabilities [B, K]: the mean of the readings' softmax."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return p.mean(0) if p.ndim == 3 else p


def tags_from_logits(logits, tag_map: TagMap, threshold, limit=LIMIT):
    """Classifier logits (see class_probs) → per photo, [{"word", "score"}] of the `limit` best words
    scoring at least `threshold`, best first (the more specific first among equal scores)."""
    probs = class_probs(logits)
    if probs.shape[-1] != len(tag_map):
        raise CaptioningError(f"The classifier gives {probs.shape[-1]} classes but the tag mapping has "
                              f"{len(tag_map)}; they do not belong together.")
    return words_above(probs @ tag_map.matrix, tag_map.words, tag_map.size, threshold, limit)


def words_above(scores, words, size, threshold, limit=LIMIT):
    """[N, W] word scores -> per photo, [{"word", "score"}] of the `limit` best scoring at least `threshold`,
    best first; among equal scores the more specific word (smaller `size`: fewer classes) first. The one rule
    for tags, in both runtimes (grounding.head.Head.tags too)."""
    out = []
    for row in scores:
        hits = sorted(np.flatnonzero(row >= threshold), key=lambda i: (-round(float(row[i]), 4), size[i]))
        out.append([{"word": words[i], "score": round(float(row[i]), 4)} for i in hits[:limit]])
    return out

"""What the encoder itself knows about a photo: its ImageNet classifier head, turned into plain tags.

The encoder is an ImageNet classifier without its last layer; that layer (one linear map of the pooled
features to 1,000 class scores) ships in the same weights file, so it costs next to nothing to run it on the
features the caption model reads anyway. Each class is mapped to plain caption words (most specific first,
assets/imagenet_words.json, written from WordNet by tools/imagenet_words.py): a word's score is the summed
probability of the classes named so ("dog" collects every breed), so a photo whose classes split between
Pekinese and Shih-Tzu still reads as a confident dog.

numpy only (the head's weights come in as arrays): the ONNX runtime can use the same code.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.grounding.tags import words_above

WORDS_FILE = Path(__file__).resolve().parents[1] / "assets" / "imagenet_words.json"
# ImageNet's classes of people (ballplayer, groom, scuba diver): evidence that someone is in the photo.
PERSON_KIND = "person"
# Hypernyms too broad to be what a photo shows ("a close-up of an animal"): keywords, never the main object.
GENERIC = {"animal", "vehicle", "food", "drink", "tool", "aircraft", "plant", "building", "structure"}


def load_classes(path=WORDS_FILE):
    """The mapping: per class index, {"name", "words" (most specific first), "kind"}."""
    return json.loads(Path(path).read_text())["classes"]


def softmax(x):
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@dataclass
class Head:
    """The classifier: weight [K, C], bias [K], and the mapping of its K classes to words."""
    weight: np.ndarray
    bias: np.ndarray
    classes: list

    def __post_init__(self):
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        # word -> class indices, for each class's specific word (its first) and for every word of its chain
        self.names = sorted({c["words"][0] for c in self.classes})
        index = {w: i for i, w in enumerate(self.names)}
        self.first = np.zeros((len(self.classes), len(self.names)), np.float32)
        for c in self.classes:
            self.first[c["index"], index[c["words"][0]]] = 1.0
        self.person = np.array([c["kind"] == PERSON_KIND for c in self.classes], np.float32)
        # every word of every chain: a hypernym's score is the summed probability of all its classes
        self.words = sorted({w for c in self.classes for w in c["words"]})
        at = {w: i for i, w in enumerate(self.words)}
        self.member = np.zeros((len(self.classes), len(self.words)), np.float32)
        for c in self.classes:
            self.member[c["index"], [at[w] for w in c["words"]]] = 1.0
        self.size = self.member.sum(0)     # classes under each word: fewer is more specific

    def probs(self, pooled):
        """pooled [B, C] (or [B, 2C]: a photo and its mirror image side by side) -> class probabilities [B, K],
        the mean of both readings' when mirrored."""
        pooled = np.asarray(pooled, dtype=np.float32)
        c = self.weight.shape[1]
        readings = [pooled[:, i:i + c] for i in range(0, pooled.shape[1], c)]
        return np.mean([softmax(r @ self.weight.T + self.bias) for r in readings], 0)

    def word_scores(self, probs):
        """[B, K] class probabilities -> [B, W] scores of the specific words in self.names."""
        return probs @ self.first

    def tags(self, probs, threshold, limit=6):
        """Per photo, [{"word", "score"}] of the words (specific names and their hypernyms: cat, animal)
        scoring at least `threshold`, best first (the more specific first among equal scores)."""
        return words_above(probs @ self.member, self.words, self.size, threshold, limit)

    def main_object(self, probs, threshold):
        """Per photo, (the most specific word scoring at least `threshold`, its score, its class's kind) or
        (None, best score, None): "dog" for a photo split between two breeds, "fruit" between three fruits."""
        scores = probs @ self.member
        out = []
        for p, row in zip(probs, scores):
            hits = [i for i in np.flatnonzero(row >= threshold) if self.words[i] not in GENERIC]
            if not hits:
                out.append((None, float(row.max()), None))
                continue
            i = min(hits, key=lambda i: (self.size[i], -row[i]))
            k = int(np.argmax(p * self.member[:, i]))
            out.append((self.words[i], float(row[i]), self.classes[k]["kind"]))
        return out

    def chain(self, word):
        """`word` and its hypernyms, most specific first (from the first class whose chain holds it)."""
        words = next((c["words"] for c in self.classes if word in c["words"]), [word])
        return words[words.index(word):]


def head_arrays(state, channels):
    """The classifier (weight, bias) in an encoder's state dict: its last 2-D weight mapping `channels`
    features to 1,000 classes (classifier.1 in MobileNetV2, fc in ResNets)."""
    keys = [k for k, v in state.items() if k.endswith("weight") and tuple(v.shape) == (1000, channels)]
    if not keys:
        return None
    key = keys[-1]
    return np.asarray(state[key], dtype=np.float32), np.asarray(state[key[:-len("weight")] + "bias"], np.float32)

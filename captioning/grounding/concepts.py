"""Word detectors learned from the captions: what ImageNet's classes lack, people above all.

A detector is a logistic probe over a photo's pooled features, trained on the train split's photos to
predict whether their captions use the word (tools/train_concepts.py; Fang et al. 2015 learn such word
detectors from captions too). Flickr8k's photos without people are mostly dogs, so a probe alone learns "not
a dog means someone is there" and fires on fruit, insects and buildings. The people score therefore also
needs evidence the probe cannot fake: the ImageNet head's classes, each with how often the train photos it
fires on show people (smoothed towards a prior by kind: clothing and person classes high, animals, food,
plants and landscapes low), so a photo whose classes Flickr8k never pairs with people scores low.
The two are combined as a geometric mean; thresholds come from the dev split.

numpy only (the ONNX runtime can use it). The detectors live in assets/concepts.npz (plain arrays).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONCEPTS_FILE = Path(__file__).resolve().parents[1] / "assets" / "concepts.npz"
PEOPLE = "people"


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


@dataclass
class Concepts:
    words: list              # the concepts, "people" first
    weight: np.ndarray       # [W, C] probes over standardised pooled features
    bias: np.ndarray         # [W]
    mean: np.ndarray         # [C] the standardisation
    scale: np.ndarray        # [C]
    thresholds: np.ndarray   # [W] a concept is present at or above its threshold
    class_people: np.ndarray  # [K] P(people | ImageNet class k), smoothed
    people_words: list       # vocabulary words that say someone is there (barred when nobody is seen)

    @classmethod
    def load(cls, path=CONCEPTS_FILE):
        if not Path(path).exists():
            return None
        z = np.load(path, allow_pickle=False)
        return cls([str(w) for w in z["words"]], z["weight"], z["bias"], z["mean"], z["scale"], z["thresholds"],
                   z["class_people"], [str(w) for w in z["people_words"]])

    def save(self, path):
        tmp = Path(str(path) + ".tmp.npz")
        np.savez(tmp, words=np.array(self.words), weight=self.weight.astype(np.float32),
                 bias=self.bias.astype(np.float32), mean=self.mean.astype(np.float32),
                 scale=self.scale.astype(np.float32), thresholds=self.thresholds.astype(np.float32),
                 class_people=self.class_people.astype(np.float32), people_words=np.array(self.people_words))
        tmp.replace(path)

    def probe(self, pooled):
        """[B, C] plain pooled features -> [B, W] probe probabilities."""
        x = (np.asarray(pooled, np.float32) - self.mean) / self.scale
        return _sigmoid(x @ self.weight.T + self.bias)

    def scores(self, pooled, class_probs):
        """[B, W]: each concept's probability; people's combines the probe with the head's class evidence."""
        out = self.probe(pooled)
        i = self.words.index(PEOPLE)
        out[:, i] = np.sqrt(out[:, i] * (np.asarray(class_probs, np.float32) @ self.class_people))
        return out

    def tags(self, scores):
        """Per photo, [{"word", "score"}] of the concepts at or above their thresholds (people included)."""
        out = []
        for row in scores:
            out.append([{"word": w, "score": round(float(s), 4)}
                        for w, s, t in zip(self.words, row, self.thresholds) if s >= t])
        return out

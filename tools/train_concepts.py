"""Trains the word detectors (captioning/grounding/concepts.py) and writes captioning/assets/concepts.npz.

    python tools/train_concepts.py --data /path/to/flickr8k --cache WORKDIR/cache/mobilenet_v2-... \
        [--model captioning/assets/default_model.pt] [--wordnet /usr/share/wordnet]

Labels come from the train split's captions: a photo has a concept as much as its captions use the
concept's words (the fraction of its captions). Probes are logistic regressions over the standardised pooled
features (L-BFGS, L2); thresholds maximise F1 on the val split (people's: the val accuracy of "someone is
there"). The people words the search bars are the vocabulary's words whose main WordNet sense is a person
(or people), plus pronouns.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from imagenet_words import ancestors, read_nouns  # noqa: E402

# concept -> the caption words that count as saying it
CONCEPTS = {"people": None, "grass": ["grass", "grassy", "lawn"], "water": ["water", "lake", "river", "pool", "ocean"],
            "snow": ["snow", "snowy"], "street": ["street", "road", "sidewalk"], "beach": ["beach", "sand", "sandy"],
            "field": ["field", "meadow"], "tree": ["tree", "trees", "woods", "forest"], "mountain": ["mountain", "mountains", "hill"],
            "building": ["building", "buildings"], "city": ["city", "town"], "rock": ["rock", "rocks", "rocky"],
            "night": ["night", "dark"], "crowd": ["crowd"], "sky": ["sky"]}
PERSON, CLOTHING, FOOTWEAR = "00007846", "03051540", "03381126"
# Words that only a person in the photo makes true.
WORN = ["wearing", "wears", "wear", "dressed", "shirtless", "costume", "costumes", "outfit", "outfits"]
PRONOUNS = ["he", "she", "his", "her", "him", "hers", "himself", "herself", "someone", "somebody", "people", "crowd",
            "team", "family", "couple", "audience"]
# Words whose first WordNet sense is a person but which captions use for other things.
NOT_PEOPLE = {"white", "grey", "gray", "dry", "have", "same", "waters", "stroller", "strollers", "coaster", "chased",
              "tutu", "tutus", "pacifier", "domino", "polo", "jackson", "mickey", "fields", "begins", "grinds",
              "wades", "wade", "lasso", "hood", "monitor", "pop", "pops", "squirts", "tackle", "tackles", "carrier",
              "wheeler", "mohawk", "lush", "maroon", "sooners", "forward", "straight", "natural", "silly", "great",
              "more", "heavy", "religious", "martial", "colored", "miami", "crane", "tiger", "shepherd", "dalmatian",
              "bunny", "german", "american", "indian", "japanese", "african", "asian", "native", "oriental",
              "european", "african-american", "blonde", "blond", "brunette", "professional", "homeless", "official",
              "dive", "bleachers", "hose", "cords", "tails", "weeds", "mini", "boa"}


def wordnet_index(wordnet):
    first, exc = {}, {}
    for line in open(Path(wordnet) / "index.noun", encoding="utf-8"):
        if not line.startswith(" "):
            p = line.split()
            first[p[0]] = p[-int(p[2]):]
    for line in open(Path(wordnet) / "noun.exc", encoding="utf-8"):
        a, b = line.split()[:2]
        exc[a] = b
    return first, exc


def base_forms(word, first, exc):
    """The noun lemmas `word` may be: itself, its irregular singular, its regular singulars."""
    forms = [word, exc.get(word)]
    for suffix, repl in (("ies", "y"), ("ses", "s"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("s", "")):
        if word.endswith(suffix):
            forms.append(word[:-len(suffix)] + repl)
    return [f for f in forms if f in first]


def people_words(vocab, wordnet):
    """The vocabulary's words whose main WordNet noun sense (of any of their forms) is a person or clothing
    (a shirt is worn by someone), plus pronouns, words for groups of people and for wearing."""
    nouns, (first, exc) = read_nouns(wordnet), wordnet_index(wordnet)
    marks = {PERSON, CLOTHING, FOOTWEAR}
    out = [w for w in vocab if w not in NOT_PEOPLE
           and any(marks.intersection(ancestors(nouns, first[b][0])) for b in base_forms(w, first, exc))]
    return sorted(set(out) | {w for w in PRONOUNS + WORN if w in vocab})


def labels(captions, words):
    """[N] the fraction of each photo's captions (token lists) using any of `words`."""
    words = set(words)
    return np.array([np.mean([bool(words.intersection(c)) for c in caps]) for caps in captions], np.float32)


def fit_probe(x, y, l2=1e-2):
    """Logistic regression on standardised x (full batch L-BFGS): (weight [C], bias)."""
    x, y = torch.tensor(x), torch.tensor(y)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def class_people(class_probs, y, kinds, alpha=2.0):
    """P(people | class) from the train photos' class probabilities, smoothed towards a prior by kind."""
    prior = np.where(np.isin(kinds, ["person", "clothing"]), 0.9, 0.05)
    return ((class_probs * y[:, None]).sum(0) + alpha * prior) / (class_probs.sum(0) + alpha)


def best_threshold(p, y, f1=True):
    grid = np.linspace(0.05, 0.95, 91)
    pos = y > 0.5

    def value(t):
        hit = p >= t
        if not f1:
            return (hit == pos).mean()
        tp = (hit & pos).sum()
        return 2 * tp / max(1, hit.sum() + pos.sum())
    return float(max(grid, key=value))


def split_data(data, cache):
    """Per split: (pooled features [N, C], each photo's captions as token lists)."""
    from captioning.data.datasets import load_dataset
    from captioning.features.store import open_store
    from captioning.data.vocab import tokenize
    dataset, store = load_dataset(data), open_store(cache)
    row = store.row_of()
    out = {}
    for split in ("train", "val"):
        recs = [r for r in dataset.records if r.split == split and str(r.image) in row]
        idx = np.array([row[str(r.image)] for r in recs])
        order = np.argsort(idx)
        pooled = np.empty((len(idx), store.pooled.shape[1]), np.float32)
        pooled[order] = store.pooled[idx[order]]
        out[split] = pooled, [[tokenize(c) for c in r.captions] for r in recs]
    return out


def train(data, cache, model, wordnet):
    from captioning.training.checkpoint import load_checkpoint
    from captioning.grounding.concepts import Concepts
    from captioning.features.encoders import EncoderSpec, resolve_weights
    from captioning.grounding.head import Head, head_arrays, load_classes
    ckpt = load_checkpoint(model)
    spec = EncoderSpec(**ckpt["encoder"])
    sets = split_data(data, cache)
    (xt, ct), (xv, cv) = sets["train"], sets["val"]
    head = Head(*head_arrays(resolve_weights(spec.name, spec.weights).get_state_dict(progress=False), xt.shape[1]),
                load_classes())
    pw = people_words(ckpt["vocab"], wordnet)
    mean, scale = xt.mean(0), xt.std(0) + 1e-4
    zt, zv = (xt - mean) / scale, (xv - mean) / scale
    words, weights, biases, thresholds = [], [], [], []
    for concept, cwords in CONCEPTS.items():
        yt, yv = labels(ct, cwords or pw), labels(cv, cwords or pw)
        w, b = fit_probe(zt, yt)
        words.append(concept)
        weights.append(w)
        biases.append(b)
        thresholds.append(best_threshold(1 / (1 + np.exp(-(zv @ w + b))), yv))
    kinds = np.array([c["kind"] for c in head.classes])
    c = Concepts(words, np.stack(weights), np.array(biases), mean, scale, np.array(thresholds),
                 class_people(head.probs(xt), labels(ct, pw), kinds), pw)
    people = c.scores(xv, head.probs(xv))[:, 0]
    c.thresholds[0] = best_threshold(people, labels(cv, pw), f1=False)
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--cache", required=True, help="the dataset's feature cache folder (pooled.npy)")
    p.add_argument("--model", default=str(ROOT / "captioning/assets/default_model.pt"))
    p.add_argument("--wordnet", default="/usr/share/wordnet")
    p.add_argument("--output", default=str(ROOT / "captioning/assets/concepts.npz"))
    args = p.parse_args()
    torch.manual_seed(0)
    c = train(args.data, args.cache, args.model, args.wordnet)
    c.save(args.output)
    print(json.dumps({"wrote": args.output, "thresholds": dict(zip(c.words, np.round(c.thresholds, 2).tolist())),
                      "people_words": len(c.people_words)}))


if __name__ == "__main__":
    main()

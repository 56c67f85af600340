"""How different the N best captions are: the mean pairwise word-set Jaccard distance of each photo's 3
captions, for each way of finding captions 2..N, next to the same figure for three human captions, and
the first caption's CIDEr-D (it is plain beam search's either way).

    python -m bench.diversity                        # dev split, 1,000 photos, the built-in model
    python -m bench.diversity --split test --images 100 --model path/best.pt
"""
import argparse
import itertools

from bench.common import FLICKR8K, flickr_cache, header, table

import torch

from captioning.inference.captioner import Captioner
from captioning.data.datasets import load_dataset
from captioning.metrics.scores import ptb_tokenize, score_captions
from captioning.config import SearchConfig
from captioning.search.numpy_search import word_distance
from captioning.features.store import load_features, open_store


def mean_distance(groups):
    """groups: per photo, a list of captions (text) → mean over photos of the mean pairwise distance."""
    per_photo = []
    for captions in groups:
        sets = [set(ptb_tokenize(c).split()) for c in captions]
        pairs = list(itertools.combinations(sets, 2))
        per_photo.append(sum(word_distance(a, b) for a, b in pairs) / len(pairs))
    return sum(per_photo) / len(per_photo)


def cider_of(records, groups, refs, j):
    """CIDEr-D of every photo's j-th caption (its last one where it has fewer)."""
    cands = {str(r.image): g[min(j, len(g) - 1)] for r, g in zip(records, groups)}
    return score_captions(cands, refs, metrics=("CIDEr",), use_java=False)["CIDEr-D"]


def run(model, split, n_images, n, top_ps):
    captioner = Captioner.load(model, device="cpu")
    records = load_dataset(FLICKR8K).split(split)[:n_images]
    store = open_store(flickr_cache(captioner.spec.name))
    mirror = open_store(flickr_cache(captioner.spec.name, mirror=True))   # the default search reads both
    row_of = store.row_of()
    rows = torch.tensor([row_of[str(r.image)] for r in records])
    refs = {str(r.image): r.captions for r in records}
    out = []
    for diversity, top_p in [("beam", 1.0)] + [("sample", p) for p in top_ps]:
        cfg = SearchConfig(num_captions=n, diversity=diversity, top_p=top_p)
        groups = []
        for i in range(0, len(rows), 100):
            feats = torch.cat([load_features(s, rows[i:i + 100], captioner.decoder.uses_grid, "cpu")
                               for s in (store, mirror)], -1)
            groups += [[captioner.vocab.decode(h.tokens) for h in hs] for hs in captioner.search(feats, cfg)]
        ciders = [cider_of(records, groups, refs, j) for j in range(n)]
        out.append([diversity if diversity == "beam" else f"sample, top-p {top_p}", f"{mean_distance(groups):.3f}", f"{ciders[0]:.3f}",
                    f"{sum(ciders[1:]) / (n - 1):.3f}", f"{sum(len(g) == n for g in groups)}/{len(groups)}"])
    out.append(["three human captions", f"{mean_distance([r.captions[:n] for r in records]):.3f}", "", "", ""])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--num-captions", type=int, default=3)
    ap.add_argument("--top-p", type=float, nargs="+", default=[SearchConfig.top_p])
    args = ap.parse_args()
    header("diversity")
    table(f"The {args.num_captions} best captions, Flickr8k {args.split}, {args.images} photos, model {args.model}",
          ["captions 2..N", "mean pairwise word-set distance", "CIDEr-D, first caption", "CIDEr-D, captions 2..N",
           f"photos with {args.num_captions} captions"], run(args.model, args.split, args.images, args.num_captions, args.top_p))


if __name__ == "__main__":
    main()

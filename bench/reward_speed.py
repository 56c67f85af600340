"""The self-critical reward's cost: captioning/rewards.py's CIDEr-D (document frequencies and reference
vectors prepared once) against pycocoevalcap's Cider on the same batch (it rebuilds both on every call),
for one training batch of sampled captions on Flickr8k's training references.

    python -m bench.reward_speed            # a few seconds
"""
import random
import time

from bench.common import FLICKR8K, header, table

from captioning.data.datasets import load_dataset
from captioning.metrics.cider import CiderD
from captioning.data.vocab import tokenize


def main(batch=80, repeats=10):
    header("reward_speed")
    train = load_dataset(FLICKR8K).split("train")
    refs = {i: [tokenize(c) + ["<end>"] for c in r.captions] for i, r in enumerate(train)}
    t0 = time.perf_counter()
    cider = CiderD(list(refs.values()))
    prepare_s = time.perf_counter() - t0
    rng = random.Random(0)
    keys = [rng.randrange(len(train)) for _ in range(batch)]
    cands = [tokenize(rng.choice(train[k].captions))[:-1] + ["<end>"] for k in keys]   # realistic, not exact
    cider.scores(cands, keys, refs)                      # the first batch builds those images' vectors
    t0 = time.perf_counter()
    for _ in range(repeats):
        ours = cider.scores(cands, keys, refs)
    ours_ms = (time.perf_counter() - t0) / repeats * 1000
    from pycocoevalcap.cider.cider import Cider
    gts = {i: [" ".join(r) for r in refs[k]] for i, k in enumerate(keys)}
    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    t0 = time.perf_counter()
    for _ in range(repeats):
        Cider().compute_score(gts, res)
    theirs_ms = (time.perf_counter() - t0) / repeats * 1000
    table(f"CIDEr-D of {batch} sampled captions against {len(train):,} training images' references",
          ["scorer", "ms per batch", "note"],
          [["captioning/rewards.py", f"{ours_ms:.1f}", f"document frequencies of all training references "
            f"prepared once in {prepare_s:.1f} s"],
           ["pycocoevalcap Cider", f"{theirs_ms:.1f}", "document frequencies from this batch's references only "
            "(not the training set's): not the reward SCST needs"],
           ["ratio", f"{theirs_ms / ours_ms:.1f}x", f"mean reward here {sum(ours) / len(ours):.3f}"]])


if __name__ == "__main__":
    main()

"""CIDEr-D as a reward: the same numbers as pycocoevalcap's scorer, and `<end>` counted."""
import random

import pytest

from captioning.metrics.cider import CiderD

WORDS = "a dog man runs in the grass red shirt ball plays with water boy girl jumps".split()


def random_set(seed, images=40):
    rng = random.Random(seed)
    gts = {str(i): [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(5)] for i in range(images)}
    res = {k: [" ".join(rng.choices(WORDS, k=rng.randint(2, 12)))] for k in gts}
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_equals_pycocoevalcap(seed):
    from pycocoevalcap.cider.cider import Cider
    gts, res = random_set(seed)
    gts["0"] = ["a dog runs in the grass"] * 5          # an exact match and a partly shared one
    res["0"], res["1"] = ["a dog runs in the grass"], ["a dog runs"]
    mean, per_image = Cider().compute_score(gts, res)
    # pycocoevalcap takes document frequencies from the references it scores against: so does this one here.
    cider = CiderD([[r.split() for r in gts[k]] for k in gts])
    refs = {k: [r.split() for r in v] for k, v in gts.items()}
    mine = cider.scores([res[k][0].split() for k in gts], list(gts), refs)
    assert mine == pytest.approx(list(per_image), abs=1e-6)
    assert sum(mine) / len(mine) == pytest.approx(mean, abs=1e-6)
    assert mine[0] > 5.0        # an exact match of a distinctive caption scores high


def test_a_fragment_loses_once_end_is_counted():
    refs = [["a", "dog", "runs", "<end>"], ["a", "brown", "dog", "runs", "<end>"], ["the", "dog", "runs", "<end>"]]
    others = [[["a", "man", "sits", "<end>"]], [["two", "girls", "play", "<end>"]]]
    cider = CiderD([refs, *others])
    prepared = cider.reference("dog", refs)
    ended = cider.score(["a", "dog", "runs", "<end>"], prepared)
    fragment = cider.score(["a", "dog", "runs", "a"], prepared)   # cut off: no <end>, a dangling word
    assert ended > fragment
    assert cider.reference("dog", refs) is prepared             # built once per image


@pytest.mark.parametrize("seed", [0, 1])
def test_score_all_equals_score_for_every_candidate(seed):
    """The numpy batch (consensus re-ranking's) gives `score`'s numbers: repeats, no overlap, empty, no refs."""
    gts, res = random_set(seed)
    cider = CiderD([[r.split() for r in v] for v in gts.values()])
    refs = [v for k in list(gts)[:30] for v in cider.reference(k, [r.split() for r in gts[k]])]   # 150 refs
    cands = [c[0].split() for c in res.values()] + [["dog", "dog", "dog"], ["zebra"], [], gts["0"][0].split()]
    assert cider.score_all(cands, refs).tolist() == pytest.approx([cider.score(c, refs) for c in cands], abs=1e-12)
    assert cider.score_all(cands, refs)[-1] > 0 and cider.score_all(cands, refs)[-3] == 0
    assert cider.score_all(cands[:2], []).tolist() == [0.0, 0.0] and len(cider.score_all([], refs)) == 0

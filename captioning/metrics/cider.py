"""CIDEr-D as a training reward: the metric of pycocoevalcap's `Cider`, fast enough to score every sampled
caption of every batch.

pycocoevalcap recomputes document frequencies from the references it is given and rebuilds every
reference's tf-idf vector on each call. For a reward both are fixed: document frequencies come once from
the training references (as in Rennie et al. 2017), and each training image's reference vectors are
built once, on first use, and kept. A candidate then costs one n-gram count and a few dictionary
look-ups per reference.

Sequences are lists of word ids (or words: anything hashable). The definition follows pycocoevalcap's
cider_scorer exactly: n = 1..4, tf-idf with idf = log(N) − log(max(1, df)), the candidate's weights clipped
at the reference's, cosine per n, a Gaussian length penalty (σ = 6) on the bigram-count difference, the
mean over n and references, ×10.
"""
import math
from collections import Counter

import numpy as np

N_MAX = 4
SIGMA = 6.0


def ngram_counts(seq, n_max=N_MAX):
    seq = tuple(seq)
    return Counter(seq[i:i + n] for n in range(1, n_max + 1) for i in range(len(seq) - n + 1))


class CiderD:
    """CIDEr-D with document frequencies from `corpus`: a list (one entry per image) of reference lists."""

    def __init__(self, corpus, sigma=SIGMA, df=None):
        """`df`: the corpus's document frequencies when the caller has them ({n-gram: count}, 0 when missing);
        then only len(corpus) is read."""
        self.sigma = sigma
        self.df = df
        if df is None:
            self.df = Counter()
            for refs in corpus:
                self.df.update(set().union(*(ngram_counts(r) for r in refs)) if refs else ())
        self.log_n = math.log(float(max(len(corpus), 1)))
        self._refs = {}

    def vector(self, seq):
        """(tf-idf per n as {ngram: weight}, norm per n, bigram count) of one sequence."""
        vec, norm, length = [{} for _ in range(N_MAX)], [0.0] * N_MAX, 0
        for gram, tf in ngram_counts(seq).items():
            n = len(gram) - 1
            w = float(tf) * (self.log_n - math.log(max(1.0, self.df[gram])))
            vec[n][gram] = w
            norm[n] += w * w
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def reference(self, key, refs):
        """The reference vectors of image `key`, built once."""
        if key not in self._refs:
            self._refs[key] = [self.vector(r) for r in refs]
        return self._refs[key]

    def _sim(self, cand, ref):
        (cv, cn, cl), (rv, rn, rl) = cand, ref
        penalty = math.exp(-((cl - rl) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for n in range(N_MAX):
            ref_n = rv[n]
            val = sum(min(w, ref_n[g]) * ref_n[g] for g, w in cv[n].items() if g in ref_n)
            if cn[n] != 0 and rn[n] != 0:
                val /= cn[n] * rn[n]
            total += val * penalty
        return total / N_MAX

    def score(self, candidate, refs_vectors):
        """CIDEr-D of one candidate against prepared reference vectors (see `reference`)."""
        cand = self.vector(candidate)
        return 10.0 * sum(self._sim(cand, r) for r in refs_vectors) / max(len(refs_vectors), 1)

    def score_all(self, candidates, refs_vectors):
        """CIDEr-D of each candidate against the same prepared references, as `score` gives them (to float
        rounding), with the sums in numpy: consensus re-ranking scores 10 candidates against 150 references a
        photo, where `score`'s dictionary look-ups took most of the default search's time."""
        cands = [self.vector(c) for c in candidates]
        if not cands or not refs_vectors:
            return np.zeros(len(cands))
        lengths = np.array([c[2] for c in cands], float)[:, None] - np.array([r[2] for r in refs_vectors], float)
        penalty = np.exp(-lengths ** 2 / (2 * self.sigma ** 2))                    # [C, R]
        total = np.zeros_like(penalty)
        for n in range(N_MAX):
            index = {}                                       # the candidates' n-grams: only they count
            entries = [(i, index.setdefault(g, len(index)), w) for i, c in enumerate(cands) for g, w in c[0][n].items()]
            cand, ref = np.zeros((len(cands), len(index))), np.zeros((len(refs_vectors), len(index)))
            for i, j, w in entries:
                cand[i, j] = w
            for j, r in enumerate(refs_vectors):
                for g, w in r[0][n].items():
                    if g in index:
                        ref[j, index[g]] = w
            val = (np.minimum(cand[:, None, :], ref[None]) * ref[None]).sum(-1)    # [C, R], clipped at the ref
            norms = np.array([c[1][n] for c in cands])[:, None] * np.array([r[1][n] for r in refs_vectors])
            total += val / np.where(norms != 0, norms, 1) * penalty                # as _sim: no division by 0
        return 10.0 * (total / N_MAX).sum(1) / len(refs_vectors)

    def scores(self, candidates, keys, references):
        """One score per candidate; candidate i is scored against references[keys[i]]."""
        return [self.score(c, self.reference(k, references[k])) for c, k in zip(candidates, keys)]

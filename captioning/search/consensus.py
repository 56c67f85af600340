"""Consensus re-ranking: of the model's N best captions, the one that agrees best with what people wrote
about the training photos that look most like this one (Devlin et al. 2015, "Exploring nearest neighbor
approaches for image captioning").

Beam search ranks by the model's own probability, which favours safe, generic sentences; CIDEr-D, like a
reader, rewards the specific words people use for that kind of scene. So the model proposes (beam search,
SearchConfig.rerank_pool wide, as many best kept) and the memory decides: each candidate is scored by
CIDEr-D against the human captions of the SearchConfig.neighbours training photos nearest to this one, and
the best comes first. The memory is what a model carries for this: every training photo's pooled features,
reduced to DIM dimensions by PCA (a fifth of the size; it votes as well as all 1,280 here), and their
captions as word ids. Each choice (pool, neighbours, DIM, a plain mean instead of similarity weights) was
measured on the dev split: docs/results.md.

numpy and pure Python only: the ONNX runtime re-ranks with this same code.
"""
from dataclasses import dataclass, replace

import numpy as np

from captioning.metrics.cider import N_MAX, CiderD
from captioning.data.vocab import END

DIM = 256           # PCA dimensions of the stored features
KEYS = ("mean", "basis", "features", "captions", "owner")


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Memory:
    mean: np.ndarray        # [C] mean of the unit-length pooled training features
    basis: np.ndarray       # [C, D] their principal directions (fp16)
    features: np.ndarray    # [N, D] each training photo, projected and unit length (fp16)
    captions: np.ndarray    # [T] every training caption's word ids, each followed by <end> (int16 unless
                            # the vocabulary needs more)
    owner: np.ndarray       # [M] int32 the training photo (row of `features`) each caption describes

    def __post_init__(self):
        self._cider = None
        self._features = self.features.astype(np.float32)

    @property
    def channels(self):
        return self.mean.shape[0]

    def check(self, channels):
        """Raises ValueError unless the arrays fit each other and features of `channels` channels."""
        n, d = self.features.shape
        ends = int((self.captions == END).sum()) if self.captions.ndim == 1 else -1
        if self.mean.shape != (channels,) or self.basis.shape != (channels, d) or self.owner.shape != (ends,) \
                or not n or (ends and (self.owner.min() < 0 or self.owner.max() >= n or self.captions[-1] != END)):
            raise ValueError("inconsistent consensus memory")

    def to_arrays(self):
        return {k: getattr(self, k) for k in KEYS}

    def cider(self):
        """CIDEr-D with the training captions' document frequencies (each photo's captions one document),
        built on first use."""
        if self._cider is None:
            ends = np.flatnonzero(self.captions == END)
            self._spans = np.stack([ends - np.diff(ends, prepend=-1) + 1, ends], 1)   # [M, 2] each caption's words
            order = np.argsort(self.owner, kind="stable")
            self._by_photo = order, np.searchsorted(self.owner[order], np.arange(len(self.features) + 1))
            df, photos = document_frequencies(self.captions, self.owner), range(len(self.features))
            self._cider = CiderD(photos if df is not None else [self.references(r) for r in photos], df=df)
        return self._cider

    def references(self, row):
        """The captions (word-id lists) of training photo `row`."""
        order, bounds = self._by_photo
        return [self.captions[a:b].tolist() for a, b in self._spans[order[bounds[row]:bounds[row + 1]]]]

    def neighbours(self, pooled, k):
        """pooled [B, C] (a photo's mean feature) → [B, k] rows of the most similar training photos."""
        query = (_unit(pooled.astype(np.float32)) - self.mean) @ self.basis.astype(np.float32)
        sims = _unit(query) @ self._features.T                              # [B, N] cosine
        k = min(k, sims.shape[1])
        return np.argpartition(-sims, k - 1, axis=1)[:, :k]

    def rerank(self, beams, pooled, k):
        """Each image's hypotheses (a list, best first) reordered by CIDEr-D against the captions of its `k`
        nearest training photos; equal scores keep the model's order."""
        cider, neighbours = self.cider(), self.neighbours(pooled, k)
        scores = self._batch_scores(cider, beams, neighbours) if beams and any(beams) else None
        if scores is None:   # a word or a vocabulary the integer keys cannot hold: one image at a time
            scores = []
            for hyps, rows in zip(beams, neighbours):
                refs = [v for r in rows.tolist() for v in cider.reference(r, self.references(r))]
                scores.append(cider.score_all([h.tokens for h in hyps], refs))
        return [[hyps[i] for i in sorted(range(len(hyps)), key=lambda i: -s[i])] for hyps, s in zip(beams, scores)]

    def _batch_scores(self, cider, beams, neighbours):
        """rerank_scores for the whole batch: every image's candidates against its neighbours' captions,
        the reference n-grams counted in numpy instead of one Python dictionary per caption."""
        order, bounds = self._by_photo
        caps = [order[bounds[r]:bounds[r + 1]] for r in neighbours.reshape(-1).tolist()]
        per_image = np.array([sum(len(c) for c in caps[i * neighbours.shape[1]:(i + 1) * neighbours.shape[1]])
                              for i in range(len(beams))])
        spans = self._spans[np.concatenate(caps)]
        ref_len = spans[:, 1] - spans[:, 0]
        refs = (self.captions[_flatten(spans[:, 0], ref_len)], ref_len)
        tokens = [h.tokens for hyps in beams for h in hyps]
        cand_len = np.array([len(t) for t in tokens], np.int64)
        cands = (np.fromiter((w for t in tokens for w in t), np.int64, int(cand_len.sum())), cand_len)
        c_end, r_end = np.cumsum([len(h) for h in beams]), np.cumsum(per_image)
        groups = [(np.arange(c_end[i] - len(h), c_end[i]), np.arange(r_end[i] - per_image[i], r_end[i]))
                  for i, h in enumerate(beams)]
        if any(len(c) == 0 for c, _ in groups):
            return None
        return rerank_scores(cider, cands, refs, groups)


class _Frequencies:
    """Document frequencies of word-id n-grams as CiderD reads them (df[gram], 0 when unseen), kept under
    integer keys: (w1 + 1) * base**(n-1) + ... + (wn + 1), so that n-grams of any length never collide."""

    def __init__(self, table, base, keys=None, counts=None):
        self.table, self.base = table, base
        # The same as sorted arrays, for the re-ranking's lookups in numpy (rerank_scores).
        self.keys = np.array(sorted(table), np.int64) if keys is None else keys
        self.counts = np.array([table[k] for k in self.keys.tolist()], np.int64) if counts is None else counts

    def __getitem__(self, gram):
        key = 0
        for w in gram:
            if not 0 <= w < self.base - 1:
                return 0                # a word no caption of the memory holds: no n-gram with it either
            key = key * self.base + w + 1
        return self.table.get(key, 0)


def document_frequencies(captions, owner, n_max=N_MAX):
    """For every 1..n_max-gram of the memory's captions ([T] ids, <end> after each), the number of photos
    with a caption holding it: numpy over all positions at once, a quarter of the time a Counter of tuples
    takes (what a cold `caption` would wait for). None when the keys would overflow int64 (CiderD counts)."""
    flat = captions.astype(np.int64)
    base = int(flat.max(initial=0)) + 2
    if base ** n_max >= 2 ** 63:
        return None
    if not len(flat):
        return _Frequencies({}, base)
    is_end = flat == END
    photo = owner.astype(np.int64)[np.concatenate([[0], np.cumsum(is_end)[:-1]])]    # the photo of each position
    table, keys, counts = {}, [], []
    for n in range(1, n_max + 1):
        width = len(flat) - n + 1
        if width <= 0:
            break
        key, crosses = np.zeros(width, np.int64), np.zeros(width, bool)
        for k in range(n):
            key, crosses = key * base + flat[k:k + width] + 1, crosses | is_end[k:k + width]
        key, ph = key[~crosses], photo[:width][~crosses]
        order = np.lexsort((ph, key))
        key, ph = key[order], ph[order]
        first = np.ones(len(key), bool)                       # each (n-gram, photo) pair once
        first[1:] = (key[1:] != key[:-1]) | (ph[1:] != ph[:-1])
        grams, count = np.unique(key[first], return_counts=True)
        table.update(zip(grams.tolist(), count.tolist()))
        keys.append(grams)
        counts.append(count)
    # Longer n-grams have larger keys (one more digit, none 0), so keys in order of n are sorted.
    return _Frequencies(table, base, np.concatenate(keys or [np.zeros(0, np.int64)]),
                        np.concatenate(counts or [np.zeros(0, np.int64)]))


def _grams(flat, lengths, base):
    """CiderD's n-grams of sequences (their word ids one after another in `flat`, `lengths` [S]), all at
    once: (sequence [E], n - 1 [E], key [E] as _Frequencies keys them, count in its sequence [E]), one entry per
    distinct n-gram of each sequence, ordered by sequence then n. None when a word lies outside the keys'
    range (the caller scores those the slow way)."""
    flat = flat.astype(np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= base - 1):
        return None
    owner = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)   # position in its sequence
    parts, key = [], np.zeros(len(flat), np.int64)
    for n in range(N_MAX):
        inside = pos[:len(flat) - n] + n < lengths[owner[:len(flat) - n]]           # the n-gram fits
        key = key[:len(flat) - n] * base + flat[n:] + 1
        parts.append((owner[:len(flat) - n][inside], np.full(int(inside.sum()), n), key[inside]))
    seq, n, key = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((key, n, seq))
    seq, n, key = seq[order], n[order], key[order]
    first = np.ones(len(key), bool)
    first[1:] = (key[1:] != key[:-1]) | (seq[1:] != seq[:-1])        # keys never collide across n
    starts = np.flatnonzero(first)
    return seq[starts], n[starts], key[starts], np.diff(np.append(starts, len(key)))


def _weights(grams, count, df, log_n):
    """tf-idf weights [E] and norms [S, N_MAX] of `grams` (from _grams) of `count` sequences."""
    seq, n, key, tf = grams
    at = np.minimum(np.searchsorted(df.keys, key), max(len(df.keys) - 1, 0))
    freq = np.where(df.keys[at] == key, df.counts[at], 0) if len(df.keys) else np.zeros(len(key))
    w = tf * (log_n - np.log(np.maximum(1.0, freq)))
    norms = np.zeros((count, N_MAX))
    np.add.at(norms, (seq, n), w * w)
    return w, np.sqrt(norms)


def _flatten(starts, lengths):
    """Indices of the spans [starts, starts + lengths) one after another."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)


def rerank_scores(cider, cands, refs, groups):
    """CIDEr-D of every image's candidates against its references, as CiderD.score_all gives them (to float
    rounding), in numpy for the whole batch: cands and refs are (flat word ids, lengths [C] / [R]); groups
    [(candidate rows, reference rows)] per image, each row in one group. None where the keys cannot hold
    the words or the batch, or CiderD keeps its own frequencies (then score_all's turn)."""
    df = cider.df
    if not isinstance(df, _Frequencies) or df.base ** N_MAX * len(groups) >= 2 ** 62:
        return None
    base, cl, rl = df.base, cands[1], refs[1]
    cg, rg = _grams(*cands, base), _grams(*refs, base)
    if cg is None or rg is None:
        return None
    (cw, cnorm), (rw, rnorm) = _weights(cg, len(cl), df, cider.log_n), _weights(rg, len(rl), df, cider.log_n)
    c_img, r_img = np.zeros(len(cl), np.int64), np.zeros(len(rl), np.int64)
    for i, (c_rows, r_rows) in enumerate(groups):
        c_img[c_rows], r_img[r_rows] = i, i
    # Each image's distinct candidate n-grams, and the weight each of its candidates gives them (0: absent).
    ckey = c_img[cg[0]] * base ** N_MAX + cg[2]
    uniq, u = np.unique(ckey, return_inverse=True)
    slot = np.zeros(len(cl), np.int64)
    for c_rows, _ in groups:
        slot[c_rows] = np.arange(len(c_rows))
    width = max(len(c) for c, _ in groups)
    table = np.zeros((len(uniq), width))
    table[u, slot[cg[0]]] = cw
    # Every reference n-gram that one of its image's candidates holds: min(candidate, reference) * reference.
    rkey = r_img[rg[0]] * base ** N_MAX + rg[2]
    at = np.minimum(np.searchsorted(uniq, rkey), len(uniq) - 1)
    hit = uniq[at] == rkey
    contrib = np.minimum(table[at[hit]], rw[hit, None]) * rw[hit, None]              # [hits, width]
    val = np.zeros((len(rl) * N_MAX, width))
    np.add.at(val, rg[0][hit] * N_MAX + rg[1][hit], contrib)
    val = val.reshape(len(rl), N_MAX, width)
    scores = []
    for c_rows, r_rows in groups:
        v = val[r_rows][:, :, :len(c_rows)].transpose(2, 0, 1)                         # [C, R, N]
        norms = cnorm[c_rows][:, None, :] * rnorm[r_rows][None]
        lengths = np.maximum(cl[c_rows] - 1, 0)[:, None] - np.maximum(rl[r_rows] - 1, 0)[None]   # bigrams
        penalty = np.exp(-lengths ** 2 / (2 * cider.sigma ** 2))
        total = (v / np.where(norms != 0, norms, 1)).sum(-1) * penalty
        scores.append(10.0 * (total / N_MAX).sum(1) / max(len(r_rows), 1))
    return scores


def build_memory(pooled, captions, dim=DIM):
    """pooled [N, C] features of the training photos; captions: per photo, a list of word-id lists."""
    x = _unit(np.asarray(pooled, dtype=np.float32))
    mean = x.mean(0)
    centred = x - mean
    dim = max(1, min(dim, *centred.shape))
    _, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))   # ascending: the principal ones last
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :dim])
    rows = [(i, ids) for i, caps in enumerate(captions) for ids in caps if ids]
    largest = max((max(ids) for _, ids in rows), default=0)
    flat = np.array([w for _, ids in rows for w in [*ids, END]], dtype=np.int16 if largest < 2 ** 15 else np.int32)
    return Memory(mean.astype(np.float32), basis.astype(np.float16), _unit(centred @ basis).astype(np.float16),
                  flat, np.array([i for i, _ in rows], dtype=np.int32))


def training_memory(records, store, vocab):
    """The memory of the training photos `records` (their captions as `vocab`'s word ids), their pooled
    features from the feature `store` (store.py), for a checkpoint to carry."""
    row_of = store.row_of()
    pooled = np.asarray(store.pooled[np.array([row_of[str(r.image)] for r in records])], dtype=np.float32)
    return build_memory(pooled, [[vocab.encode(c) for c in r.captions] for r in records])


def memory_from_arrays(arrays, channels):
    """A Memory from its stored arrays (a checkpoint's or an export's), checked against features of `channels`
    channels (ValueError when they do not fit), or None when there are none."""
    if not arrays or any(k not in arrays for k in KEYS):
        return None
    memory = Memory(*(np.asarray(arrays[k]) for k in KEYS))
    memory.check(channels)
    return memory


def pool_config(cfg):
    """The search whose candidates are re-ranked: rerank_pool wide, as many best kept, the next beams as
    captions 2..N."""
    return replace(cfg, beam_size=max(cfg.beam_size, cfg.rerank_pool),
                   num_captions=max(cfg.num_captions, cfg.rerank_pool), diversity="beam")


def beam_width(cfg, memory):
    """The beam width `candidates` searches with: the re-ranking's (pool_config) when it re-ranks, else cfg's."""
    return pool_config(cfg).beam_size if memory is not None and cfg.rerank else cfg.beam_size


def plain_pooled(features, channels):
    """The photo's own mean feature [B, C] from a search's input: the grid [B, P, C] or pooled [B, C], with the
    mirror reading's beside it ([..., 2C]) when the search reads photos mirrored too."""
    plain = np.asarray(features)[..., :channels]
    return plain.mean(1) if plain.ndim == 3 else plain


def candidates(run_beam, features, cfg, memory):
    """Each image's hypotheses, best first: run_beam(cfg) (beam search with that configuration), re-ranked
    by the memory when there is one and cfg.rerank is on. `features` is a function giving the search's
    input as a numpy array, called only then."""
    if memory is None or not cfg.rerank:
        return run_beam(cfg)
    return memory.rerank(run_beam(pool_config(cfg)), plain_pooled(features(), memory.channels), cfg.neighbours)

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
measured on the dev split: README, Results.

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
        cider, out = self.cider(), []
        for hyps, rows in zip(beams, self.neighbours(pooled, k)):
            refs = [v for r in rows.tolist() for v in cider.reference(r, self.references(r))]
            scores = cider.score_all([h.tokens for h in hyps], refs).tolist()
            out.append([hyps[i] for i in sorted(range(len(hyps)), key=lambda i: -scores[i])])
        return out


class _Frequencies:
    """Document frequencies of word-id n-grams as CiderD reads them (df[gram], 0 when unseen), kept under
    integer keys: (w1 + 1) * base**(n-1) + ... + (wn + 1), so that n-grams of any length never collide."""

    def __init__(self, table, base):
        self.table, self.base = table, base

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
    table = {}
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
        grams, counts = np.unique(key[first], return_counts=True)
        table.update(zip(grams.tolist(), counts.tolist()))
    return _Frequencies(table, base)


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

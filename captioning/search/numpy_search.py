"""Beam search and diverse sampling over numpy, for decoders that run without torch (the ONNX runtime).

The same algorithm as search.py, step for step, so that both give the same captions: K beams per image
in one [B*K] batch, finished images leave the batch, never <unk>/<pad>/<start>, never <end> first, an
optional trigram block, ranking by log-probability / length**alpha. The decoder here is any object with
`init_state(features) → dict of arrays`, `step(tokens, state) → (log-probabilities [N, V], changed state
entries, attention [N, P] or None)` and `per_image` (state entries that depend on the image only). The
pure-Python pieces (when an image is done, distinct N-best, picking diverse samples) are shared with
search.py, so they exist once.
"""
from dataclasses import dataclass

import numpy as np

from captioning.config import SearchConfig
from captioning.search.consensus import candidates
from captioning.data.vocab import END, PAD, START, UNK

NEG_INF = np.float32(-np.inf)
# Images per batched search: large batches are several times faster per image (bench/beam_speed.py).
SEARCH_BATCH = 128


@dataclass
class Hypothesis:
    tokens: list                   # word ids, without <start>/<end>
    logprob: float                 # sum of log-probabilities, <end> included when it ended
    score: float                   # the length-normalised score used for ranking
    alphas: object = None          # [len, cells] attention per emitted word (tensor or array), attention decoders


def trigram_repeats(seqs):
    """(rows, words): each word that would repeat a trigram already in its row of `seqs` [N, T]."""
    match = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])   # earlier (a, b) == last two
    return np.nonzero(match)[0], seqs[:, 2:][match]


def banned_trigrams(seqs, vocab_size):
    """Mask [N, V] of words that would repeat a trigram already in each sequence."""
    banned = np.zeros((seqs.shape[0], vocab_size), dtype=bool)
    if seqs.shape[1] >= 3:
        banned[trigram_repeats(seqs)] = True
    return banned


def constrained(logp, seqs, t, cfg):
    """What search never emits set to -inf (see search._constrained)."""
    logp = np.array(logp, dtype=np.float32)
    logp[:, [PAD, START, UNK]] = NEG_INF
    if t == 0:
        logp[:, END] = NEG_INF
    if t == cfg.max_len - 1:
        logp[:, :] = NEG_INF
        logp[:, END] = 0.0
    if cfg.block_trigrams and seqs.shape[1] >= 3:
        logp[trigram_repeats(seqs)] = NEG_INF            # by index: no [N, V] mask built at every step
    return logp


def topk(x, k):
    """(values, indices) of the k largest per row, largest first (as torch.topk)."""
    k = min(k, x.shape[1])
    idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(x, idx, 1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(idx, order, 1)


def beam_search(decoder, features, cfg: SearchConfig = SearchConfig(), keep_alphas=False):
    """Per image, up to `cfg.num_captions` Hypothesis, best first, distinct in words."""
    b, k = features.shape[0], max(1, cfg.beam_size)
    k_kept = max(k, cfg.num_captions)
    state = dict(decoder.init_state(features))
    fixed = {key: state.pop(key) for key in decoder.per_image if key in state}   # never reordered
    tokens = np.full(b, START, dtype=np.int64)   # the first step: one row per image (all K beams start alike)
    scores = np.zeros((b, 1), dtype=np.float32)
    seqs = np.zeros((b, 0), dtype=np.int64)
    width, alphas = 1, None
    finished = [[] for _ in range(b)]
    active = list(range(b))
    for t in range(cfg.max_len):
        n = len(active)
        logp, new, alpha = decoder.step(tokens, {**state, **fixed})
        state.update({key: v for key, v in new.items() if key not in fixed})
        logp = constrained(logp, seqs, t, cfg)
        vocab = logp.shape[1]
        if keep_alphas and alpha is not None:
            alphas = alpha[:, None] if alphas is None else np.concatenate([alphas, alpha[:, None]], 1)
        total = (scores.reshape(-1, 1) + logp).reshape(n, width * vocab)
        if total.shape[1] < 2 * k:              # a vocabulary smaller than 2K on the first step
            total = np.concatenate([total, np.full((n, 2 * k - total.shape[1]), NEG_INF, np.float32)], 1)
        top_scores, top_idx = topk(total, 2 * k)
        beam, word = np.minimum(top_idx // vocab, width - 1), top_idx % vocab
        is_end = (word == END) & np.isfinite(top_scores)
        for i, j in np.argwhere(is_end[:, :k]):
            row, s = i * width + int(beam[i, j]), float(top_scores[i, j])
            finished[active[i]].append(Hypothesis(seqs[row].tolist(), s, s / (t + 1) ** cfg.length_alpha,
                                                  alphas[row] if alphas is not None else None))
        sel_beam, sel_word, sel_scores = going_on(is_end, beam, word, top_scores, k)
        best_live = sel_scores.max(1).tolist()
        going = [i for i in range(n) if not done(finished[active[i]], best_live[i], k_kept, t, cfg)]
        if not going:
            break
        order, fixed = keep(going, n, width, k, fixed)
        pick = np.array(order)
        if len(going) < n:
            sel_beam, sel_word, sel_scores = sel_beam[pick], sel_word[pick], sel_scores[pick]
            active = [active[i] for i in order]
        rows = (pick[:, None] * width + sel_beam).reshape(-1)
        state = {key: v[rows] for key, v in state.items()}
        seqs = np.concatenate([seqs[rows], sel_word.reshape(-1, 1)], 1)
        if alphas is not None:
            alphas = alphas[rows]
        tokens, scores, width = sel_word.reshape(-1), sel_scores, k
    return [best_distinct(f, cfg.num_captions) for f in finished]


def keep_order(going, n):
    """The batch positions of the `going` images (of `n`) in their new order: those in the first len(going)
    places stay, and the rest move into the places of the finished ones there."""
    m, kept = len(going), set(going)
    movers = iter(p for p in going if p >= m)
    return [p if p in kept else next(movers) for p in range(m)]


def keep(going, n, width, k, fixed):
    """(new order, image-only state for it, K rows an image), as search._keep: one row repeated K times after
    the first step; later a finished image's place taken by a going one from the tail, and the tail cut."""
    if width < k:
        return going, {key: np.repeat(v[going], k, 0) for key, v in fixed.items()}
    order = keep_order(going, n)
    if len(order) == n:
        return order, fixed
    moves = [(i, p) for i, p in enumerate(order) if i != p]
    if moves:
        dst, src = ((np.array(ends)[:, None] * k + np.arange(k)).reshape(-1) for ends in zip(*moves))
        for v in fixed.values():
            v[dst] = v[src]
    return order, {key: v[:len(order) * k] for key, v in fixed.items()}


def going_on(is_end, beam, word, top_scores, k):
    """The K best candidates per image that are not <end>, in topk's order; score -inf where fewer are left."""
    go_on = ~is_end & np.isfinite(top_scores)
    keep = go_on & (np.cumsum(go_on, 1) <= k)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]             # kept columns first, in order
    sel_scores = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(top_scores, order, 1), NEG_INF)
    return np.take_along_axis(beam, order, 1), np.take_along_axis(word, order, 1), sel_scores.astype(np.float32)


def done(hyps, best_live, k_kept, t, cfg):
    """Enough finished captions and, unless cfg.stop_early, no live beam likely to beat the worst of them (see
    search.beam_search)."""
    if len(hyps) < k_kept:
        return False
    if cfg.stop_early:
        return True
    worst_kept = sorted(h.score for h in hyps)[-k_kept]
    return best_live == float("-inf") or worst_kept >= best_live / (t + 2) ** cfg.length_alpha


def best_distinct(hyps, n):
    out, seen = [], set()
    for h in sorted(hyps, key=lambda h: h.score, reverse=True):
        key = tuple(h.tokens)
        if key not in seen:
            seen.add(key)
            out.append(h)
        if len(out) == n:
            break
    return out


# --- N-best that differ: nucleus samples ------------------------------------------------------------------

# Diversity "sample": captions drawn per image, and how unlike each kept caption must be (word-set Jaccard
# distance) from those already kept. Three human captions of a Flickr8k photo are 0.74 apart on average.
DIVERSE_SAMPLES = 12
MIN_DISTANCE = 0.5


def sample(decoder, features, n, max_len=20, seed=0, top_p=1.0):
    """`n` captions per image drawn word by word (nucleus sampling when top_p < 1), as search.sample but with
    numpy's generator: (tokens [B*n, T], summed log-probabilities [B*n], lengths [B*n]), image-major rows."""
    rng = np.random.default_rng(seed)
    state = {key: np.repeat(v, n, 0) for key, v in decoder.init_state(features).items()}
    rows = features.shape[0] * n
    tokens = np.full(rows, START, dtype=np.int64)
    alive = np.ones(rows, dtype=bool)
    out, total = [], np.zeros(rows, dtype=np.float64)
    for t in range(max_len):
        logp, new, _ = decoder.step(tokens, state)
        state.update(new)
        logp = np.array(logp, dtype=np.float64)
        logp[:, [PAD, START, UNK] + ([END] if t == 0 else [])] = -np.inf
        if t == max_len - 1:
            logp[:, :] = -np.inf
            logp[:, END] = 0.0
        logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)        # renormalised over what is allowed
        probs = nucleus(np.exp(logp), top_p)
        cdf = np.cumsum(probs, 1)
        drawn = (cdf < rng.random((rows, 1)) * cdf[:, -1:]).sum(1).clip(max=probs.shape[1] - 1)
        tokens = np.where(alive, drawn, PAD)
        total += np.where(alive, logp[np.arange(rows), tokens], 0.0)
        out.append(tokens)
        alive &= tokens != END
        if not alive.any():
            break
    tokens = np.stack(out, 1)
    return tokens, total, (tokens != PAD).sum(1)


def nucleus(probs, top_p):
    """Keep the smallest set of most likely words whose probabilities reach top_p (Holtzman et al. 2020)."""
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, 1)
    drop = np.cumsum(sorted_p, 1) - sorted_p > top_p
    out = np.empty_like(probs)
    np.put_along_axis(out, order, np.where(drop, 0.0, sorted_p), 1)
    return out


def word_distance(a, b):
    """Jaccard distance of two word sets: 0 the same words, 1 none shared."""
    return 1.0 - len(a & b) / max(len(a | b), 1)


def pick_diverse(tokens, totals, lengths, chosen, n, cfg):
    """Per image, up to num_captions − 1 sampled Hypothesis (from plain lists of `n` samples per image, rows
    image-major) that differ from `chosen` and from each other in at least MIN_DISTANCE of their words."""
    out = []
    for i, kept in enumerate(chosen):
        pool = [Hypothesis([w for w in tokens[r][:lengths[r]] if w != END], totals[r],
                           totals[r] / lengths[r] ** cfg.length_alpha) for r in range(i * n, (i + 1) * n)]
        pool.sort(key=lambda h: h.score, reverse=True)
        picked, sets = [], [set(h.tokens) for h in kept]
        for h in pool:
            if len(picked) == cfg.num_captions - len(kept):
                break
            if all(word_distance(set(h.tokens), s) >= MIN_DISTANCE for s in sets):
                picked.append(h)
                sets.append(set(h.tokens))
        seen = {tuple(h.tokens) for h in kept + picked}
        for h in pool:                                   # too few that differ: the likeliest rest
            if len(picked) < cfg.num_captions - len(kept) and tuple(h.tokens) not in seen:
                picked.append(h)
                seen.add(tuple(h.tokens))
        out.append(picked)
    return out


def fill_nbest(beams, samples, num_captions):
    """Beam search's best, then the diverse samples, then (too few samples differ) the next distinct beams."""
    out = []
    for rest, others in zip(beams, samples):
        chosen = rest[:1] + others
        seen = {tuple(h.tokens) for h in chosen}
        chosen += [h for h in rest[1:] if tuple(h.tokens) not in seen][:num_captions - len(chosen)]
        out.append(chosen)
    return out


def search(decoder, features, cfg: SearchConfig = SearchConfig(), keep_alphas=False, memory=None):
    """The N best captions per image, as search.search finds them (its samples drawn by numpy's generator)."""
    beams = candidates(lambda c: beam_search(decoder, features, c, keep_alphas), lambda: features, cfg, memory)
    if cfg.num_captions == 1 or cfg.diversity == "beam":
        return [b[:cfg.num_captions] for b in beams]
    if cfg.diversity != "sample":
        raise ValueError(f"unknown diversity '{cfg.diversity}' (expected 'sample' or 'beam')")
    tokens, totals, lengths = sample(decoder, features, DIVERSE_SAMPLES, cfg.max_len, cfg.seed, cfg.top_p)
    picked = pick_diverse(tokens.tolist(), totals.tolist(), lengths.tolist(), [b[:1] for b in beams],
                          DIVERSE_SAMPLES, cfg)
    return fill_nbest(beams, picked, cfg.num_captions)

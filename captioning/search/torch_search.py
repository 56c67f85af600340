"""Greedy and beam search, batched over images and beams, for any decoder with init_state/step.

Beam search keeps K hypotheses per image in one [B*K] batch, so the decoder runs once per step for the
whole set, and an image leaves the batch as soon as its captions are done (its speed against one image at
a time: bench/beam_speed.py, figures in bench/README.md). It never
emits <unk>, <pad> or <start>, never ends on the first word, can forbid repeating a trigram, and ranks
finished captions by log-probability divided by length**alpha (so that short captions are not favoured
just for having fewer terms in the sum). Greedy search is beam search with K = 1.
"""
import torch

from captioning.config import SearchConfig
from captioning.search.consensus import candidates
# The pure-Python parts are shared with the numpy search of the ONNX runtime, so both decide alike.
from captioning.search.numpy_search import (DIVERSE_SAMPLES, Hypothesis, best_distinct, done, fill_nbest, keep_order,
                                             pick_diverse)
from captioning.data.vocab import END, PAD, START, UNK


def _trigram_repeats(seqs):
    """(rows, words): each word that would repeat a trigram already in its row of `seqs` [N, T]."""
    match = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])   # earlier (a, b) == last two
    return match.nonzero(as_tuple=True)[0], seqs[:, 2:][match]


def _banned_trigrams(seqs, vocab_size):
    """Mask [N, V] of words that would repeat a trigram already in each sequence."""
    banned = torch.zeros(seqs.shape[0], vocab_size, dtype=torch.bool, device=seqs.device)
    if seqs.shape[1] >= 3:
        banned[_trigram_repeats(seqs)] = True
    return banned


@torch.inference_mode()
def beam_search(decoder, features, cfg: SearchConfig = SearchConfig(), keep_alphas=False):
    """Returns, per image, a list of up to `cfg.num_captions` Hypothesis, best first, distinct in words."""
    b, k = features.shape[0], max(1, cfg.beam_size)
    k_kept = max(k, cfg.num_captions)          # finished hypotheses to collect before an image is done
    device = features.device
    state = decoder.init_state(features)
    # What depends on the image alone (the grid and its attention keys) is the same for an image's K beams,
    # and beams never move between images: it is set aside instead of being reordered with the beams.
    fixed = {key: state.pop(key) for key in getattr(decoder, "per_image", ()) if key in state}
    # All K beams start from <start> alike, so the first step runs one row per image (`width` 1), not K.
    tokens, scores, seqs, width = _start(b, device)
    alphas = None
    finished = [[] for _ in range(b)]
    # Images still searching, as indices into `finished`. A finished image leaves the batch at once, so the
    # decoder never runs for it again: a batch costs the sum of its captions' lengths, not its longest
    # caption's length times the batch size (as one image at a time would).
    active = list(range(b))

    for t in range(cfg.max_len):
        n = len(active)
        logits, state, alpha = decoder.step(tokens, {**state, **fixed})
        state = {key: v for key, v in state.items() if key not in fixed}
        logp = _constrained(logits, seqs, t, cfg)
        vocab = logp.shape[1]
        if keep_alphas and alpha is not None:
            alphas = alpha.unsqueeze(1) if alphas is None else torch.cat([alphas, alpha.unsqueeze(1)], 1)

        total = (scores.view(-1, 1) + logp).view(n, width * vocab)
        if total.shape[1] < 2 * k:              # a vocabulary smaller than 2K on the first step
            total = torch.cat([total, total.new_full((n, 2 * k - total.shape[1]), float("-inf"))], 1)
        top_scores, top_idx = total.topk(2 * k, dim=1)     # 2K: enough for K to go on after any <end>s
        beam, word = (top_idx // vocab).clamp_(max=width - 1), top_idx % vocab
        is_end = (word == END) & torch.isfinite(top_scores)
        for i, hyp in _ended(is_end, beam, top_scores, seqs, alphas, t, width, cfg):
            finished[active[i]].append(hyp)
        sel_beam, sel_word, sel_scores = _going_on(is_end, beam, word, top_scores, k)

        # An image is done once it has enough finished captions (cfg.stop_early) or, without stop_early, once
        # also no live beam is likely to beat the worst of them: with alpha 0 this is exact (a live beam's
        # log-probability only falls), with alpha > 0 the usual estimate. Stopping at K finished captions can
        # miss a better, longer one; the steps the beams run on past them are what stop_early saves.
        best_live = sel_scores.max(1).values.tolist()
        going = [i for i in range(n) if not done(finished[active[i]], best_live[i], k_kept, t, cfg)]
        if not going:
            break
        order, fixed = _keep(going, n, width, k, fixed)
        pick = torch.tensor(order, device=device)
        if len(going) < n:
            sel_beam, sel_word, sel_scores = sel_beam[pick], sel_word[pick], sel_scores[pick]
            active = [active[i] for i in order]
        # One reordering does both: each going image's beams take their chosen parents' state.
        rows = (pick.unsqueeze(1) * width + sel_beam).view(-1)
        state = {key: v.index_select(0, rows) for key, v in state.items()}
        seqs = torch.cat([seqs.index_select(0, rows), sel_word.view(-1, 1)], 1)
        if alphas is not None:
            alphas = alphas.index_select(0, rows)
        tokens, scores, width = sel_word.view(-1), sel_scores, k

    return [best_distinct(f, cfg.num_captions) for f in finished]


def _keep(going, n, width, k, fixed):
    """The batch positions of the going images in their new order, and the image-only state for them, K rows
    each. After the first step each image's one row is repeated K times. Later, images that finished leave
    by moving the last going images' rows into their places and cutting the tail: K rows copied per image
    that leaves, where taking the going rows would copy every row of these largest tensors at every step."""
    if width < k:                        # the first step's one row a photo (K 1: the swaps below)
        index = torch.tensor(going, device=_device(fixed)).repeat_interleave(k)
        return going, {key: v.index_select(0, index) for key, v in fixed.items()}
    order = keep_order(going, n)
    if len(order) == n:
        return order, fixed
    moves = [(i, p) for i, p in enumerate(order) if i != p]
    if moves:
        dst, src = (torch.tensor([r * k + j for r in ends for j in range(k)], device=_device(fixed))
                    for ends in zip(*moves))
        for v in fixed.values():
            v.index_copy_(0, dst, v.index_select(0, src))
    return order, {key: v[:len(order) * k] for key, v in fixed.items()}


def _device(tensors):
    return next(iter(tensors.values())).device if tensors else None


def _start(b, device):
    """The first step's input: <start> for each image's single row, scores [B, 1], empty sequences, width 1."""
    return (torch.full((b,), START, dtype=torch.long, device=device), torch.zeros(b, 1, device=device),
            torch.zeros(b, 0, dtype=torch.long, device=device), 1)


def _constrained(logits, seqs, t, cfg):
    """Log-probabilities [N, V] with what search never emits set to -inf: <pad>, <start>, <unk>; <end> as
    the first word; anything but <end> at the last step; a repeated trigram (when blocked)."""
    logp = logits.float().log_softmax(-1)
    logp[:, [PAD, START, UNK]] = float("-inf")
    if t == 0:
        logp[:, END] = float("-inf")            # at least one word
    if t == cfg.max_len - 1:
        logp[:, :] = float("-inf")
        logp[:, END] = 0.0                      # out of room: close every beam here
    if cfg.block_trigrams and seqs.shape[1] >= 3:
        logp[_trigram_repeats(seqs)] = float("-inf")     # by index: no [N, V] mask built at every step
    return logp


def _ended(is_end, beam, top_scores, seqs, alphas, t, width, cfg):
    """(image index in the batch, Hypothesis) for each <end> among an image's top K candidates (`width` rows
    an image)."""
    k = is_end.shape[1] // 2
    for i, j in is_end[:, :k].nonzero().tolist():
        row = i * width + int(beam[i, j])
        length = t + 1                                      # words plus <end>
        yield i, Hypothesis(seqs[row].tolist(), float(top_scores[i, j]),
                            float(top_scores[i, j]) / length ** cfg.length_alpha,
                            alphas[row].cpu() if alphas is not None else None)


def _going_on(is_end, beam, word, top_scores, k):
    """The K best candidates per image that are not <end>, in topk's order: (beam, word, score) [n, K],
    score -inf where fewer than K are left."""
    go_on = ~is_end & torch.isfinite(top_scores)
    keep = go_on & (go_on.long().cumsum(1) <= k)
    order = torch.sort((~keep).float(), dim=1, stable=True).indices[:, :k]  # kept columns first, in order
    sel_scores = torch.where(keep.gather(1, order), top_scores.gather(1, order),
                             torch.full_like(top_scores[:, :k], float("-inf")))
    return beam.gather(1, order), word.gather(1, order), sel_scores


def greedy_search(decoder, features, max_len=20, block_trigrams=True):
    """Best single caption per image, one word at a time (the tests' reference; training scores dev with beam
    search, the objective's dev_beam)."""
    cfg = SearchConfig(beam_size=1, max_len=max_len, block_trigrams=block_trigrams)
    return [h[0] for h in beam_search(decoder, features, cfg)]


def sequence_logprob(decoder, features, tokens):
    """Log-probability the decoder gives `tokens` (without <start>; <end> appended) for one image.
    Lets tests compare searches by the quantity they maximise."""
    with torch.inference_mode():
        state = decoder.init_state(features)
        prev = torch.tensor([START], device=features.device)
        total = 0.0
        for word in list(tokens) + [END]:
            logits, state, _ = decoder.step(prev, state)
            total += float(logits.float().log_softmax(-1)[0, word])
            prev = torch.tensor([word], device=features.device)
    return total


def sample(decoder, features, n, max_len=20, generator=None, top_p=1.0):
    """`n` captions per image drawn word by word from the decoder's distribution (nucleus sampling when
    top_p < 1). Runs with autograd on when the caller has it on: self-critical training backpropagates
    through the returned log-probabilities.

    Returns (tokens [B*n, T] words then <end> then <pad>, logprobs [B*n, T] of the chosen tokens, 0 after
    the end, lengths [B*n] words plus <end> where it ended). Rows are image-major: image i's samples are
    rows i*n .. i*n+n-1."""
    state = {key: v.repeat_interleave(n, 0) for key, v in decoder.init_state(features).items()}
    rows = features.shape[0] * n
    tokens = torch.full((rows,), START, dtype=torch.long, device=features.device)
    alive = torch.ones(rows, dtype=torch.bool, device=features.device)
    out, logps = [], []
    for t in range(max_len):
        logits, state, _ = decoder.step(tokens, state)
        logits = logits.float()
        banned = [PAD, START, UNK] + ([END] if t == 0 else [])   # as in beam search: at least one word
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, banned] = True
        if t == max_len - 1:
            mask[:] = True
            mask[:, END] = False                                   # out of room: end here
        logp = logits.masked_fill(mask, float("-inf")).log_softmax(-1)
        tokens = torch.multinomial(_nucleus(logp.detach().exp(), top_p), 1, generator=generator).squeeze(1)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, PAD))
        chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        logps.append(torch.where(alive, chosen, torch.zeros_like(chosen)))   # <pad> has log 0 = -inf
        out.append(tokens)
        alive = alive & (tokens != END)
        if not alive.any():
            break
    tokens = torch.stack(out, 1)
    return tokens, torch.stack(logps, 1), (tokens != PAD).sum(1)


def _nucleus(probs, top_p):
    """Keep the smallest set of most likely words whose probabilities reach top_p (Holtzman et al. 2020)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p                  # the words after the set is full
    return probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))


def search(decoder, features, cfg: SearchConfig = SearchConfig(), keep_alphas=False, memory=None):
    """The N best captions per image, as a user gets them. The first is beam search's best or, with a
    consensus memory (consensus.py) and cfg.rerank, the best of the rerank_pool best by the vote of the nearest
    training photos' captions; with diversity "beam" the others are the next-best distinct beams (often the
    same sentence with another ending), with "sample" they are the most likely of several nucleus samples
    that differ from every caption kept so far in at least half of their words."""
    beams = candidates(lambda c: beam_search(decoder, features, c, keep_alphas),
                       lambda: features.float().cpu().numpy(), cfg, memory)
    if cfg.num_captions == 1 or cfg.diversity == "beam":
        return [b[:cfg.num_captions] for b in beams]
    if cfg.diversity != "sample":
        raise ValueError(f"unknown diversity '{cfg.diversity}' (expected 'sample' or 'beam')")
    return fill_nbest(beams, diverse_samples(decoder, features, cfg, [b[:1] for b in beams]), cfg.num_captions)


@torch.inference_mode()
def diverse_samples(decoder, features, cfg, chosen):
    """Per image, up to num_captions − 1 sampled Hypothesis that differ from `chosen` and each other."""
    generator = torch.Generator(device=features.device).manual_seed(cfg.seed)
    n = DIVERSE_SAMPLES
    tokens, logps, lengths = sample(decoder, features, n, cfg.max_len, generator, cfg.top_p)
    return pick_diverse(tokens.tolist(), logps.sum(1).tolist(), lengths.tolist(), chosen, n, cfg)

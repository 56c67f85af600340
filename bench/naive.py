"""The plain ways to do each stage: what the optimised code is measured against (bench/) and checked
against (tests/features/test_speed_paths.py). Written for obviousness, not speed.
"""
import numpy as np
import torch
import torch.nn.functional as F

from captioning.features.images import load_image
from captioning.search.torch_search import beam_search
from captioning.training.optim import optimizer_step
from captioning.data.vocab import PAD


@torch.inference_mode()
def plain_extract(paths, trunk, transform, grid_out, pooled_out):
    """One image at a time, as the seed scripts did: decode, transform, forward, store. No batching,
    default memory format, no overlap of decoding with the CNN."""
    for i, path in enumerate(paths):
        x = transform(load_image(path)).unsqueeze(0)
        g = trunk(x).flatten(2).transpose(1, 2)[0]
        grid_out[i] = g.to(torch.float16).numpy()
        pooled_out[i] = g.mean(0).to(torch.float16).numpy()


def naive_loss(decoder, features, tokens, lengths, att_reg=1.0):
    """Teacher-forced loss with every caption padded to the full width of `tokens`: the decoder and its
    vocabulary projection run on every padded position too; padding is ignored only in the loss. `features`
    hold one row per caption (no sharing between captions of one image). Only the decoder contract is used."""
    targets = tokens[:, 1:]
    if not decoder.uses_grid:
        # Show-and-Tell: `forward` told that every caption is full width, so its one fused LSTM runs over the
        # padding (`step` by step would be slower than any plain code, and it has no dropout).
        logits, flat_targets, _ = decoder(features, tokens, torch.full_like(lengths, tokens.shape[1]))
        return F.cross_entropy(logits, flat_targets, ignore_index=PAD)
    state = decoder.init_state(features)
    logits, alphas = [], []
    for t in range(targets.shape[1]):
        step_logits, state, alpha = decoder.step(tokens[:, t], state)
        logits.append(step_logits)
        alphas.append(alpha)
    logits = torch.stack(logits, 1)                                       # [N, T, V]: padding included
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)
    if att_reg and decoder.has_attention:
        # The decoder's own term counts attention on a caption's real words only (as training does).
        real = (torch.arange(targets.shape[1], device=tokens.device) < (lengths - 1).unsqueeze(1)).float()
        loss = loss + att_reg * decoder.extra_loss(torch.stack(alphas, 1) * real.unsqueeze(-1))
    return loss


def naive_batches(n, batch_size, generator):
    """Captions in random order, cut into batches: no bucketing, no grouping by image."""
    return list(torch.split(torch.randperm(n, generator=generator), batch_size))


def naive_train_epoch(decoder, optimizer, store, data, batch_size, generator, clip=5.0, att_reg=1.0):
    """One epoch the plain way: random batches, full-width padding, each caption's features read on its own."""
    decoder.train()
    total, count = 0.0, 0
    source = store.grid if decoder.uses_grid else store.pooled
    for idx in naive_batches(len(data.lengths), batch_size, generator):
        feats = torch.from_numpy(np.stack([np.asarray(source[int(r)]) for r in data.rows[idx]]))
        loss = naive_loss(decoder, feats, data.tokens[idx], data.lengths[idx], att_reg)
        optimizer_step(loss, optimizer, decoder.parameters(), clip)   # the same step as train.py's
        n = int((data.lengths[idx] - 1).sum())
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def one_at_a_time_beam(decoder, features, cfg):
    """Beam search image by image (the batch dimension is 1 every time)."""
    out = []
    for i in range(features.shape[0]):
        out += beam_search(decoder, features[i:i + 1], cfg)
    return out

"""Decoders searched as one: an Ensemble of several models, and MirrorPair, one model reading a photo
and its mirror image. Both meet the Decoder contract's search half (init_state, step, uses_grid,
has_attention, per_image), so every search runs them unchanged."""
import math

import torch
from torch import nn


class Ensemble(nn.Module):
    """Several decoders trained on the same features and vocabulary, searched as one: each word's
    probability is the mean of theirs. Models from different runs make different mistakes, so the mean
    is better than each (at the cost of running every member at every step)."""

    def __init__(self, decoders):
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.uses_grid = any(d.uses_grid for d in decoders)   # pooled features are the grid's mean
        self.has_attention = any(d.has_attention for d in decoders)
        self.per_image = tuple(f"{i}.{k}" for i, d in enumerate(decoders) for k in getattr(d, "per_image", ()))

    def init_state(self, features):
        pooled = features.mean(1) if features.dim() == 3 else features
        return {f"{i}.{k}": v for i, d in enumerate(self.members)
                for k, v in d.init_state(features if d.uses_grid else pooled).items()}

    def step(self, tokens, state):
        logps, new, alphas = [], {}, []
        for i, d in enumerate(self.members):
            mine = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")}
            logits, mine, alpha = d.step(tokens, mine)
            logps.append(logits.float().log_softmax(-1))
            new.update({f"{i}.{k}": v for k, v in mine.items()})
            if alpha is not None:
                alphas.append(alpha)
        mean = torch.logsumexp(torch.stack(logps), 0) - math.log(len(logps))  # log of the mean probability
        return mean, new, self.attention(alphas)

    def attention(self, alphas):
        """The attention map shown for the ensemble: the members' mean [B, P] (None without attention)."""
        return torch.stack(alphas).mean(0) if alphas else None


class MirrorPair(Ensemble):
    """One decoder reading a photo twice, as it is and mirrored left to right, searched as an ensemble of
    the two readings (the mean of their word probabilities): each sees details the other misses. Its
    features are the two side by side, [B, P, 2C] (or pooled [B, 2C]). Attention maps are the plain
    reading's: the mirrored one's look at the mirrored photo."""

    def __init__(self, decoder):
        super().__init__([decoder, decoder])

    def init_state(self, features):
        halves = features.chunk(2, dim=-1)
        return {f"{i}.{k}": v for i, half in enumerate(halves) for k, v in self.members[i].init_state(half).items()}

    def attention(self, alphas):
        return alphas[0] if alphas else None


def align_mirror(mirror, grid_hw):
    """The mirror image's grid [B, P, C] flipped back along its width, so that its cell i lies over the same
    part of the scene as the photo's cell i. grid_hw: the grid's (rows, columns); (0, 0) or a size that does
    not match P: a square grid."""
    b, p, c = mirror.shape
    h, w = grid_hw if grid_hw and grid_hw[0] * grid_hw[1] == p else (math.isqrt(p),) * 2
    if h * w != p:
        raise ValueError(f"a grid of {p} cells is not {h}x{w}: its width is unknown")
    return mirror.reshape(b, h, w, c).flip(2).reshape(b, p, c)


class FusedMirror(nn.Module):
    """One decoder reading a photo and its mirror image as one photo: the grid it reads is the mean of the
    photo's grid and the mirror image's, flipped back so that cells line up (pooled features: the mean of
    the two). Features as MirrorPair takes them, [B, P, 2C] or [B, 2C]; one decoder row per beam where
    MirrorPair runs two, so the search costs half as much. Its attention maps lie over the photo's cells."""

    def __init__(self, decoder, grid_hw):
        super().__init__()
        self.decoder, self.grid_hw = decoder, tuple(grid_hw or (0, 0))
        self.uses_grid, self.per_image = decoder.uses_grid, tuple(getattr(decoder, "per_image", ()))
        self.has_attention = getattr(decoder, "has_attention", decoder.uses_grid)   # the contract's, where it has it

    def init_state(self, features):
        plain, mirror = features.chunk(2, dim=-1)
        if features.dim() == 3:
            mirror = align_mirror(mirror, self.grid_hw)
        return self.decoder.init_state((plain + mirror) / 2)

    def step(self, tokens, state):
        return self.decoder.step(tokens, state)

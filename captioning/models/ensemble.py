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

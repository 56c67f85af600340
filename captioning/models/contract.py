"""The contract every caption decoder meets, and what all of them share (feature normalisation, the loss).

Captions are token ids laid out `<start> w1 ... wn <end> <pad>...`; a decoder is trained to predict token
t+1 from tokens up to t. Search, ensembles, training, export and every interface are written once against
`Decoder`; the decoders themselves live one a file (lstm.py, attention.py, updown.py) and are registered
by name in decoders.py.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Decoder(nn.Module):
    """The contract every decoder meets (B images or beams, P grid cells, C channels, V words, T tokens).

    name          the registry name (decoders.py), also ModelConfig.decoder's value.
    uses_grid     True: features are the grid [B, P, C]; False: the pooled vector [B, C].
    has_attention True: step() returns an attention map over the P cells (what the dashboard and the
                  captioned PNGs draw); False: it returns None. A decoder may read the grid without one.
    per_image     names of state entries that depend on the image only (never on the words so far): search
                  keeps them aside instead of reordering them with the beams.
    norm          a FeatureNorm, set from the training features' statistics before training.
    init_state(features) -> dict of batch-first tensors (the state before <start>).
    step(tokens [B], state) -> (logits [B, V], new state, attention [B, P] or None): one word.
    forward(features, captions [N, T], lengths [N], image_index [N] or None) -> (logits [M, V],
                  targets [M], aux): teacher forcing over the M real (non-pad) positions; with `image_index`,
                  `features` hold each image once and caption i belongs to image image_index[i].
    extra_loss(aux) -> the decoder's own loss term (scalar tensor) or None; training weights it.
    """
    name = ""
    uses_grid = False
    has_attention = False
    per_image = ()

    def extra_loss(self, aux):
        return None


class FeatureNorm(nn.Module):
    """Standardises encoder features per channel with statistics of the training images.

    ImageNet features are all-positive with channel scales that differ by 100x; centring them makes the
    decoder train faster and lets a randomly initialised encoder (demo, tests) work at all."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, mean, std):
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-3))

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def caption_loss(logits, targets, label_smoothing=0.0):
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

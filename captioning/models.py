"""Caption decoders: Show-and-Tell LSTM and Show-Attend-and-Tell soft attention.

Both read captions as token ids laid out `<start> w1 ... wn <end> <pad>...` and are trained to predict
token t+1 from tokens up to t. Both expose the same two-call interface for search:
    state = decoder.init_state(features)          # dict of tensors, batch first
    logits, state, alpha = decoder.step(tokens, state)
so greedy and beam search are written once, for both.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .vocab import START


@dataclass
class ModelConfig:
    decoder: str = "lstm"        # "lstm" (Show and Tell) or "attention" (Show, Attend and Tell)
    vocab_size: int = 0
    feat_dim: int = 0            # channels of the encoder's features
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 512
    context_dim: int = 512       # attention decoder: features are first projected to this size (0: keep C)
    dropout: float = 0.5

    def to_dict(self):
        return asdict(self)


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


class ShowTellDecoder(nn.Module):
    """Vinyals et al. 2015: the image embedding takes the place of `<start>`, then a fused nn.LSTM."""
    uses_grid = False
    per_image = ("image",)   # state that depends on the image only, not on the words so far (see search.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = FeatureNorm(cfg.feat_dim)
        self.image_embed = nn.Linear(cfg.feat_dim, cfg.embed_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def _inputs(self, image, tokens):
        """Word embeddings, with the image embedding in the place of <start>."""
        return torch.where((tokens == START).unsqueeze(-1), image.unsqueeze(1), self.embed(tokens))

    def forward(self, features, captions, lengths, image_index=None):
        """Logits and targets for the real (non-pad) positions only: the vocabulary projection, the
        costliest layer, never runs on padding. With `image_index`, `features` hold each image once and
        caption i belongs to image image_index[i]."""
        image = self.image_embed(self.norm(features))
        if image_index is not None:
            image = image[image_index]
        steps = (lengths - 1).cpu()
        x = self.drop(self._inputs(image, captions[:, :-1]))
        packed = pack_padded_sequence(x, steps, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        targets = pack_padded_sequence(captions[:, 1:], steps, batch_first=True, enforce_sorted=False).data
        return self.out(self.drop(hidden.data)), targets, None

    def init_state(self, features):
        b = features.shape[0]
        zeros = features.new_zeros(b, 1, self.cfg.hidden_dim, dtype=torch.float32)   # batch first, see step
        return {"image": self.image_embed(self.norm(features)), "h": zeros.clone(), "c": zeros.clone()}

    def step(self, tokens, state):
        x = self._inputs(state["image"], tokens.unsqueeze(1))
        # nn.LSTM keeps (layers, batch, hidden); store batch first so search can reorder every entry alike.
        h, c = state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous()
        out, (h, c) = self.lstm(x, (h, c))
        new = {"image": state["image"], "h": h.transpose(0, 1), "c": c.transpose(0, 1)}
        return self.out(out[:, 0]), new, None


class AttentionDecoder(nn.Module):
    """Xu et al. 2015, soft attention: at each word the LSTM looks at a weighted mix of the grid cells,
    scaled by a learnt gate; a doubly stochastic penalty asks every cell to be looked at about once."""
    uses_grid = True
    per_image = ("feats", "proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, h, a = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim
        self.norm = FeatureNorm(cfg.feat_dim)
        # Projecting the (1280- or 2048-channel) grid once per image makes every word's attention and LSTM
        # input several times cheaper; on a CPU that is most of an epoch's time.
        c = cfg.context_dim or cfg.feat_dim
        self.project = (nn.Sequential(nn.Linear(cfg.feat_dim, c), nn.ReLU(), nn.Dropout(cfg.dropout))
                        if cfg.context_dim else nn.Identity())
        self.enc_att, self.dec_att, self.full_att = nn.Linear(c, a), nn.Linear(h, a), nn.Linear(a, 1)
        self.init_h, self.init_c = nn.Linear(c, h), nn.Linear(c, h)
        self.gate = nn.Linear(h, c)
        self.embed = nn.Embedding(cfg.vocab_size, e, padding_idx=0)
        self.cell = nn.LSTMCell(e + c, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(h, cfg.vocab_size)

    def init_state(self, features):
        feats = self.project(self.norm(features))                       # [B, P, C]
        mean = feats.mean(1)
        return {"feats": feats, "proj": self.enc_att(feats),
                "h": torch.tanh(self.init_h(mean)), "c": torch.tanh(self.init_c(mean))}

    def _attend(self, state):
        # The [B, P, A] sum and its tanh are most of a search step's time; tanh in place saves a tensor that size.
        scores = self.full_att((state["proj"] + self.dec_att(state["h"]).unsqueeze(1)).tanh_()).squeeze(-1)
        alpha = scores.softmax(-1)                                      # [B, P], sums to one
        # The weighted mix of cells as a batched matrix product: no [B, P, C] product tensor to sum.
        context = torch.bmm(alpha.unsqueeze(1), state["feats"]).squeeze(1)
        return torch.sigmoid(self.gate(state["h"])) * context, alpha

    def step(self, tokens, state):
        context, alpha = self._attend(state)
        h, c = self.cell(torch.cat([self.embed(tokens), context], -1), (state["h"], state["c"]))
        new = dict(state, h=h, c=c)
        return self.out(self.drop(h)), new, alpha

    def forward(self, features, captions, lengths, image_index=None):
        """Teacher-forced pass. Captions are sorted longest first so that step t runs only on the rows
        still inside their caption: no compute on padding. With `image_index`, `features` hold each image
        once (its projections are computed once for all its captions)."""
        state = self.init_state(features)
        if image_index is not None:
            state = {k: v[image_index] for k, v in state.items()}
        order = lengths.argsort(descending=True)
        state = {k: v[order] for k, v in state.items()}
        captions, steps = captions[order], (lengths[order] - 1).tolist()
        emb = self.embed(captions[:, :-1])
        hidden, targets = [], []
        alphas = features.new_zeros(len(steps), steps[0], state["feats"].shape[1])
        for t in range(steps[0]):
            n = sum(s > t for s in steps)                               # rows still running at step t
            state = {k: v[:n] for k, v in state.items()}
            context, alpha = self._attend(state)
            h, c = self.cell(torch.cat([emb[:n, t], context], -1), (state["h"], state["c"]))
            state.update(h=h, c=c)
            hidden.append(h)
            targets.append(captions[:n, t + 1])
            alphas[:n, t] = alpha
        # One vocabulary projection for all steps: a single large matrix product beats many small ones.
        return self.out(self.drop(torch.cat(hidden))), torch.cat(targets), alphas

    @staticmethod
    def attention_penalty(alphas):
        """Doubly stochastic regularisation: over a caption, each cell's total attention should be ~1."""
        return ((1.0 - alphas.sum(1)) ** 2).mean()


class Ensemble(nn.Module):
    """Several decoders trained on the same features and vocabulary, searched as one: each word's
    probability is the mean of theirs. Models from different runs make different mistakes, so the mean
    is better than each (at the cost of running every member at every step)."""

    def __init__(self, decoders):
        super().__init__()
        self.members = nn.ModuleList(decoders)
        self.uses_grid = any(d.uses_grid for d in decoders)   # pooled features are the grid's mean
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
        return mean, new, (torch.stack(alphas).mean(0) if alphas else None)


def build_decoder(cfg: ModelConfig):
    if cfg.decoder == "lstm":
        return ShowTellDecoder(cfg)
    if cfg.decoder == "attention":
        return AttentionDecoder(cfg)
    raise ValueError(f"unknown decoder '{cfg.decoder}' (expected 'lstm' or 'attention')")


def caption_loss(logits, targets, label_smoothing=0.0):
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

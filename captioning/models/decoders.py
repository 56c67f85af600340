"""Caption decoders: Show-and-Tell LSTM, Show-Attend-and-Tell soft attention, and Up-Down attention.

Every decoder meets one contract (`Decoder` below) and is registered by name in `DECODERS`, so search,
ensembles, training, export and every interface are written once for all of them. Captions are token
ids laid out `<start> w1 ... wn <end> <pad>...`; a decoder is trained to predict token t+1 from tokens
up to t. Adding a decoder is one class with `@register("name")`.
"""
import math
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.config import ModelConfig
from captioning.utils import registry
from captioning.data.vocab import START


DECODERS = {}


register = registry(DECODERS)


def build_decoder(cfg: ModelConfig):
    if cfg.decoder not in DECODERS:
        raise ValueError(f"unknown decoder '{cfg.decoder}' (expected one of: {', '.join(DECODERS)})")
    return DECODERS[cfg.decoder](cfg)


class Decoder(nn.Module):
    """The contract every decoder meets (B images or beams, P grid cells, C channels, V words, T tokens).

    uses_grid   True: features are the grid [B, P, C]; False: the pooled vector [B, C].
    per_image   names of state entries that depend on the image only (never on the words so far): search
                keeps them aside instead of reordering them with the beams.
    norm        a FeatureNorm, set from the training features' statistics before training.
    init_state(features) -> dict of batch-first tensors (the state before <start>).
    step(tokens [B], state) -> (logits [B, V], new state, attention [B, P] or None): one word.
    forward(features, captions [N, T], lengths [N], image_index [N] or None) -> (logits [M, V],
                targets [M], aux): teacher forcing over the M real (non-pad) positions; with `image_index`,
                `features` hold each image once and caption i belongs to image image_index[i].
    extra_loss(aux) -> the decoder's own loss term (scalar tensor) or None; training weights it.
    """
    name = ""
    uses_grid = False
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


@register("lstm")
class ShowTellDecoder(Decoder):
    """Vinyals et al. 2015: the image embedding takes the place of `<start>`, then a fused nn.LSTM."""
    uses_grid = False
    per_image = ("image",)

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
        """The vocabulary projection, the costliest layer, never runs on padding (packed sequences)."""
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


def attention_penalty(alphas):
    """alphas [N, T, P] → mean over captions and cells of (1 − Σ_t alpha)²."""
    return ((1.0 - alphas.sum(1)) ** 2).mean()


class GridDecoder(Decoder):
    """What the attention decoders share: a projected grid, one word at a time through `_advance`
    (embedded word, state → top hidden state, changed state entries, attention), and a teacher-forced
    pass that runs each step only on the captions still going."""
    uses_grid = True

    def __init__(self, cfg: ModelConfig):
        """The layers both attention decoders have, in the order the built-in model's parameters were made
        (an optimizer state in a checkpoint lists them by position)."""
        super().__init__()
        self.cfg = cfg
        self.norm = FeatureNorm(cfg.feat_dim)
        c = self.context = cfg.context_dim or cfg.feat_dim
        # Projecting the (1280- or 2048-channel) grid once per image makes every word's attention and LSTM
        # input several times cheaper; on a CPU that is most of an epoch's time.
        self.project = (nn.Sequential(nn.Linear(cfg.feat_dim, c), nn.ReLU(), nn.Dropout(cfg.dropout))
                        if cfg.context_dim else nn.Identity())
        h, a = cfg.hidden_dim, cfg.attention_dim
        self.enc_att, self.dec_att, self.full_att = nn.Linear(c, a), nn.Linear(h, a), nn.Linear(a, 1)

    def _attention(self, state, query):
        """Soft attention of `query` [B, A] (already projected) over the cells: (context [B, C], alpha [B, P])."""
        # The [B, P, A] sum and its tanh are most of a search step's time; tanh in place saves a tensor that size.
        scores = self.full_att((state["proj"] + query.unsqueeze(1)).tanh_()).squeeze(-1)
        alpha = scores.softmax(-1)                                      # [B, P], sums to one
        # The weighted mix of cells as a batched matrix product: no [B, P, C] product tensor to sum.
        return torch.bmm(alpha.unsqueeze(1), state["feats"]).squeeze(1), alpha

    def step(self, tokens, state):
        h, new, alpha = self._advance(self.embed(tokens), state)
        return self.out(self.drop(h)), {**state, **new}, alpha

    def forward(self, features, captions, lengths, image_index=None):
        """Captions sorted longest first, so step t runs only on the rows still inside their caption."""
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
            h, new, alpha = self._advance(emb[:n, t], state)
            state.update(new)
            hidden.append(h)
            targets.append(captions[:n, t + 1])
            alphas[:n, t] = alpha
        # One vocabulary projection for all steps: a single large matrix product beats many small ones.
        return self.out(self.drop(torch.cat(hidden))), torch.cat(targets), alphas

    def extra_loss(self, alphas):
        """Doubly stochastic regularisation: over a caption, each cell's total attention should be ~1."""
        return attention_penalty(alphas)

    attention_penalty = staticmethod(attention_penalty)


@register("attention")
class AttentionDecoder(GridDecoder):
    """Xu et al. 2015, soft attention: at each word the LSTM looks at a weighted mix of the grid cells,
    scaled by a learnt gate; a doubly stochastic penalty asks every cell to be looked at about once."""
    per_image = ("feats", "proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        e, h, c = cfg.embed_dim, cfg.hidden_dim, self.context
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
        context, alpha = self._attention(state, self.dec_att(state["h"]))
        return torch.sigmoid(self.gate(state["h"])) * context, alpha

    def _advance(self, emb, state):
        context, alpha = self._attend(state)
        h, c = self.cell(torch.cat([emb, context], -1), (state["h"], state["c"]))
        return h, {"h": h, "c": c}, alpha


@register("updown")
class UpDownDecoder(GridDecoder):
    """Anderson et al. 2018, top-down attention with two LSTMs. The attention LSTM sees the language
    LSTM's last state, the mean image feature and the word; its state chooses where to look; the language
    LSTM reads the attended features and the attention LSTM's state and predicts the next word."""
    per_image = ("feats", "proj", "mean")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        e, h, c = cfg.embed_dim, cfg.hidden_dim, self.context
        self.embed = nn.Embedding(cfg.vocab_size, e, padding_idx=0)
        self.att_cell = nn.LSTMCell(h + c + e, h)
        self.lang_cell = nn.LSTMCell(c + h, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(h, cfg.vocab_size)

    def init_state(self, features):
        feats = self.project(self.norm(features))                       # [B, P, C]
        zeros = feats.new_zeros(feats.shape[0], self.cfg.hidden_dim)
        return {"feats": feats, "proj": self.enc_att(feats), "mean": feats.mean(1),
                "h1": zeros, "c1": zeros, "h2": zeros, "c2": zeros}

    def _advance(self, emb, state):
        h1, c1 = self.att_cell(torch.cat([state["h2"], state["mean"], emb], -1), (state["h1"], state["c1"]))
        context, alpha = self._attention(state, self.dec_att(h1))
        h2, c2 = self.lang_cell(torch.cat([context, self.drop(h1)], -1), (state["h2"], state["c2"]))
        return h2, {"h1": h1, "c1": c1, "h2": h2, "c2": c2}, alpha


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


def caption_loss(logits, targets, label_smoothing=0.0):
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

"""What the attention decoders (attention.py, updown.py) share: the projected grid, soft attention over
its cells, the teacher-forced pass and the doubly stochastic attention penalty."""
import torch
from torch import nn

from captioning.config import ModelConfig
from captioning.models.contract import Decoder, FeatureNorm


def attention_penalty(alphas):
    """alphas [N, T, P] → mean over captions and cells of (1 − Σ_t alpha)²."""
    return ((1.0 - alphas.sum(1)) ** 2).mean()


class GridDecoder(Decoder):
    """A projected grid, one word at a time through `_advance` (embedded word, state → top hidden state,
    changed state entries, attention), and a teacher-forced pass that runs each step only on the captions
    still going."""
    uses_grid = True
    has_attention = True

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

"""Show-Attend-and-Tell (Xu et al. 2015): one LSTM with gated soft attention over the grid."""
import torch
from torch import nn

from captioning.config import ModelConfig
from captioning.models.grid import GridDecoder


class AttentionDecoder(GridDecoder):
    """Xu et al. 2015, soft attention: at each word the LSTM looks at a weighted mix of the grid cells,
    scaled by a learnt gate; a doubly stochastic penalty asks every cell to be looked at about once."""
    name = "attention"
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

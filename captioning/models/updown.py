"""Up-Down (Anderson et al. 2018): top-down attention with an attention LSTM and a language LSTM."""
import torch
from torch import nn

from captioning.config import ModelConfig
from captioning.models.grid import GridDecoder


class UpDownDecoder(GridDecoder):
    """Anderson et al. 2018, top-down attention with two LSTMs. The attention LSTM sees the language
    LSTM's last state, the mean image feature and the word; its state chooses where to look; the language
    LSTM reads the attended features and the attention LSTM's state and predicts the next word."""
    name = "updown"
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

"""Show-and-Tell (Vinyals et al. 2015): the pooled image vector, then a fused nn.LSTM."""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.config import ModelConfig
from captioning.data.vocab import START
from captioning.models.contract import Decoder, FeatureNorm


class ShowTellDecoder(Decoder):
    """Vinyals et al. 2015: the image embedding takes the place of `<start>`, then a fused nn.LSTM."""
    name = "lstm"
    uses_grid = False
    has_attention = False
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

"""The decoder registry: every decoder by name, so search, training, export and every interface (the CLI's
and the menu's choices, the dashboard's model card) are written once for all of them.

Adding a decoder is one file with a class deriving `contract.Decoder` (its docstring is the contract) and
one line here; `ModelConfig.decoder`'s choices name it too (a test checks the two agree).
"""
from captioning.config import ModelConfig
from captioning.models.attention import AttentionDecoder
from captioning.models.lstm import ShowTellDecoder
from captioning.models.updown import UpDownDecoder

DECODERS = {cls.name: cls for cls in (ShowTellDecoder, AttentionDecoder, UpDownDecoder)}


def build_decoder(cfg: ModelConfig):
    if cfg.decoder not in DECODERS:
        raise ValueError(f"unknown decoder '{cfg.decoder}' (expected one of: {', '.join(DECODERS)})")
    return DECODERS[cfg.decoder](cfg)

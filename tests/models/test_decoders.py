"""Every registered decoder through the whole pipeline: training, greedy and beam search, an ensemble, a
checkpoint round trip, export, and ONNX export. A decoder added to the registry is tested here without a new test."""
import pytest
import torch

from captioning.deploy import onnx_runtime
from captioning.inference.captioner import Captioner, caption_files
from captioning.data.datasets import load_dataset
from captioning.deploy.onnx_export import export_onnx
from captioning.results.outputs import OutputConfig
from captioning.training.checkpoint import export_model, load_checkpoint
from captioning.models.contract import Decoder
from captioning.models.decoders import DECODERS, build_decoder
from captioning.config import SearchConfig
from captioning.search.torch_search import beam_search, greedy_search
from tests.helpers import copy_cache, run_training

def test_the_cli_offers_exactly_the_registered_decoders():
    from captioning.config import ModelConfig
    from dataclasses import fields
    [decoder] = [f for f in fields(ModelConfig) if f.name == "decoder"]
    assert decoder.metadata["choices"] == list(DECODERS)          # --decoder and the menu offer these
    assert all(issubclass(cls, Decoder) and cls.name == name for name, cls in DECODERS.items())


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_decoder_trains_searches_ensembles_and_exports(name, attention_model, shapes_data, tmp_path):
    work = copy_cache(attention_model[0], tmp_path / "w")
    best = run_training(work, shapes_data, name, epochs=2, hidden_dim=48, embed_dim=24)
    ckpt = load_checkpoint(best)
    history = ckpt["history"]
    assert ckpt["model_config"]["decoder"] == name and len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 1.05   # it trains (2 short epochs)

    captioner = Captioner.load(best, device="cpu")
    decoder = captioner.decoder
    torch.manual_seed(0)
    shape = (4, 49, decoder.cfg.feat_dim) if decoder.uses_grid else (4, decoder.cfg.feat_dim)
    feats = torch.randn(*shape)
    greedy = greedy_search(decoder, feats)
    beams = beam_search(decoder, feats, SearchConfig(beam_size=3, num_captions=2))
    assert all(g.tokens and len(b) == 2 for g, b in zip(greedy, beams))

    # A checkpoint round trip gives the same decoder; its fp16 export the same captions.
    again = build_decoder(decoder.cfg)
    again.load_state_dict({k: v.float() for k, v in ckpt["decoder_state"].items()})
    assert [h.tokens for h in greedy_search(again.eval(), feats)] == [g.tokens for g in greedy]
    small = export_model(best, tmp_path / "small.pt")
    exported = Captioner.load(small, device="cpu")
    assert [h[0].tokens for h in beam_search(exported.decoder, feats, SearchConfig(beam_size=3))] == \
        [b[0].tokens for b in beams]

    # Its ONNX export captions the held-out shapes as torch does, without torch (tests/deploy/test_onnx.py: the rest).
    folder = export_onnx(Captioner.load(best, device="cpu"), tmp_path / "onnx")
    test = [r.image for r in load_dataset(shapes_data).split("test")][:24]
    cfg = SearchConfig(beam_size=3)
    want = caption_files(captioner, test, cfg, outputs=OutputConfig(png=False))
    got = onnx_runtime.caption_files(Captioner.load(folder), test, cfg, outputs=OutputConfig(png=False))
    assert [r.captions for r in got] == [r.captions for r in want]

    # An ensemble with the attention model of the same features and vocabulary searches as one model.
    captioner.join([Captioner.load(attention_model[1], device="cpu")])
    joined = captioner.search(torch.randn(4, 49, decoder.cfg.feat_dim), SearchConfig(beam_size=2, mirror=False))
    assert all(h[0].tokens for h in joined)

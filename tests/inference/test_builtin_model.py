"""The built-in Flickr8k model (captioning/assets/default_model.pt) and `export`, which makes such files."""
import json
import os

import pytest
import torch
from PIL import Image

from captioning.training import checkpoint as ck
from captioning.inference.captioner import Captioner
from captioning.config import SearchConfig
from captioning.utils import CaptioningError
from captioning.data.vocab import Vocabulary
from tests.helpers import ROOT, TORCH_HOME, cli

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


# ---- export ------------------------------------------------------------------------------------------

def test_export_is_small_fp16_and_captions_the_same(attention_model, shapes_data, tmp_path):
    workdir, best = attention_model
    out = ck.export_model(best, tmp_path / "small.pt")
    small = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in small["decoder_state"].values() if v.is_floating_point())
    assert "optimizer_state" not in small and "generator_state" not in small
    assert out.stat().st_size < 0.6 * best.stat().st_size          # weights halved, optimizer moments gone
    assert json.loads(out.with_suffix(".json").read_text())["decoder"] == "attention"

    images = [Image.open(p).convert("RGB") for p in sorted((shapes_data / "Images").glob("*.jpg"))[:8]]
    full, half = Captioner.load(best, device="cpu"), Captioner.load(out, device="cpu")
    cfg = SearchConfig(beam_size=3, rerank=False)       # the weights, not the vote, are tested here
    assert [r.captions[0] for r in half.caption_pil(images, cfg)] == \
           [r.captions[0] for r in full.caption_pil(images, cfg)]


def test_export_keeps_the_evaluation_reports(lstm_model, tmp_path):
    _, best = lstm_model
    report = tmp_path / "eval_test.json"
    report.write_text(json.dumps({"scores": {"CIDEr-D": 0.5}, "settings": {"beam_size": 3}, "captions": [1, 2]}))
    out = ck.export_model(best, tmp_path / "small.pt", {"test": report})
    evaluation = torch.load(out, weights_only=True)["evaluation"]
    assert evaluation == {"test": {"scores": {"CIDEr-D": 0.5}, "settings": {"beam_size": 3}}}  # captions left out
    assert ck.read_summary(out)["evaluation"] == {"test": {"CIDEr-D": 0.5}}
    with pytest.raises(CaptioningError, match="evaluation report"):
        ck.export_model(best, tmp_path / "other.pt", {"val": tmp_path / "missing.json"})


def test_export_command_finds_reports_beside_the_model(lstm_model, tmp_path):
    _, best = lstm_model
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.pt").write_bytes(best.read_bytes())
    (tmp_path / "models" / "eval_test.json").write_text(json.dumps({"scores": {"CIDEr-D": 0.25}, "captions": []}))
    r = cli("export", "--output", tmp_path / "m.pt", "--workdir", tmp_path)   # the workdir's best model
    assert r.returncode == 0, r.stderr
    assert "MB" in r.stderr and "evaluation reports: test" in r.stderr
    assert ck.read_summary(tmp_path / "m.pt")["evaluation"] == {"test": {"CIDEr-D": 0.25}}


# ---- the shipped model -------------------------------------------------------------------------------

needs_builtin = pytest.mark.skipif(not ck.BUILTIN.exists(), reason="this checkout ships no built-in model")


@needs_builtin
def test_builtin_model_is_small_safe_and_consistent():
    assert ck.BUILTIN.stat().st_size < 20e6
    ckpt = ck.load_checkpoint(ck.BUILTIN)                          # weights_only=True inside
    torch.load(ck.BUILTIN, weights_only=True)
    cfg, vocab = ckpt["model_config"], Vocabulary(ckpt["vocab"])
    assert cfg["vocab_size"] == len(vocab) == ckpt["decoder_state"]["embed.weight"].shape[0]
    assert ckpt["encoder"]["name"] == "mobilenet_v2" and ckpt["encoder"]["weights"] == "IMAGENET1K_V1"
    assert all(v.dtype == torch.float16 for v in ckpt["decoder_state"].values() if v.is_floating_point())
    for split in ("val", "test"):                                   # its scores travel with it
        assert ckpt["evaluation"][split]["scores"]["CIDEr-D"] > 0.4
    captioner = Captioner(ckpt, device="cpu", source=ck.BUILTIN)    # weights fit the configuration
    memory = captioner.memory                                       # it carries its consensus memory
    assert len(memory.features) == 6000 and len(memory.owner) == 30000   # Flickr8k's training photos and captions
    assert ck.read_summary(ck.BUILTIN)["decoder"] == cfg["decoder"]


@needs_builtin
def test_own_model_wins_over_the_builtin_one(lstm_model, tmp_path, capsys):
    workdir, best = lstm_model
    assert ck.find_model(tmp_path) == ck.BUILTIN
    assert ck.find_model(workdir) == best
    assert ck.find_model(workdir, "default") == ck.BUILTIN
    Captioner.load(workdir=tmp_path, device="cpu")
    assert capsys.readouterr().err.count("built-in Flickr8k model") == 1   # said once, in one line
    Captioner.load(workdir=workdir, device="cpu")
    assert "built-in" not in capsys.readouterr().err


@pytest.mark.slow
@needs_builtin
@pytest.mark.skipif(not (TORCH_HOME / "hub" / "checkpoints").is_dir(), reason="needs ../shared/torch_home")
def test_builtin_model_captions_the_example_photos(tmp_path):
    assert len(EXAMPLES) >= 2
    env = {"TORCH_HOME": str(TORCH_HOME)}
    r = cli("caption", *EXAMPLES, "--json", "--output", tmp_path, "--workdir", tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    vocab = set(ck.load_checkpoint(ck.BUILTIN)["vocab"])
    captions = [x["caption"] for x in results]
    assert len(set(captions)) == len(captions)                      # a different caption for each photo
    for c in captions:
        assert len(c.split()) >= 3 and set(c.split()) <= vocab
    assert all(os.path.getsize(x["png"]) > 0 for x in results)


def test_ensemble_of_the_two_shapes_models_captions_and_refuses_strangers(attention_model, lstm_model,
                                                                         shapes_data, tmp_path):
    _, att = attention_model
    _, lstm = lstm_model
    both = Captioner.load(att, device="cpu", ensemble=[lstm])
    assert len(both.decoder.members) == 2 and str(lstm) in str(both.source)
    images = [Image.open(p).convert("RGB") for p in sorted((shapes_data / "Images").glob("*.jpg"))[:4]]
    for r in both.caption_pil(images, SearchConfig(beam_size=3), keep_alphas=True):
        assert len(r.captions[0].split()) >= 3 and r.alphas is not None
    other = torch.load(lstm, weights_only=True)
    other["vocab"][4], other["vocab"][5] = other["vocab"][5], other["vocab"][4]   # same words, other ids
    torch.save(other, tmp_path / "stranger.pt")
    with pytest.raises(CaptioningError, match="share the encoder and the vocabulary"):
        Captioner.load(att, device="cpu", ensemble=[tmp_path / "stranger.pt"])


def test_mirror_reading_is_the_mirrored_photos_features_and_can_be_turned_off(monkeypatch):
    """The default search reads each photo twice: encode(mirror=True) puts the mirror image's features
    beside the photo's; --no-mirror captions from the photo's alone, as the model does by itself."""
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HOME))
    c = Captioner.load("default", device="cpu")
    photo = Image.open(EXAMPLES[0]).convert("RGB")
    both = c.encode([photo], mirror=True)
    plain, flipped = c.encode([photo]), c.encode([photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert both.shape[-1] == 2 * plain.shape[-1]
    assert torch.allclose(both[..., :plain.shape[-1]], plain, atol=1e-4)
    assert torch.allclose(both[..., plain.shape[-1]:], flipped, atol=1e-2 * float(plain.abs().max()))
    assert SearchConfig().mirror
    from captioning.search.torch_search import search
    off = SearchConfig(mirror=False, guidance=False)   # the plain search (guidance: tests/test_grounding.py)
    assert c.caption_pil([photo], off)[0].captions == [c.vocab.decode(h.tokens) for h in search(c.decoder, plain, off, memory=c.memory)[0]]
    assert c.caption_pil([photo])[0].captions[0] == c.caption(EXAMPLES[0])

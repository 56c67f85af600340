"""Grounded captions (issue 25): the ImageNet head's tags, the word detectors, guided search and its fallback."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.training.checkpoint import BUILTIN
from captioning.grounding.concepts import Concepts
from captioning.config import SearchConfig
from captioning.grounding.head import WORDS_FILE, load_classes
from captioning.grounding.guidance import Grounding, Guided, bias_rows, choose, fallback_text, finish_text, plural_fix
from captioning.search.numpy_search import Hypothesis
from captioning.search.torch_search import beam_search
from captioning.data.vocab import END

from tests.helpers import ROOT, TORCH_HOME

WORDNET = Path("/usr/share/wordnet")
HAVE_WEIGHTS = BUILTIN.exists() and (TORCH_HOME / "hub" / "checkpoints").is_dir()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the built-in model and ../shared/torch_home")


# ---- the mapping --------------------------------------------------------------------------------------

def test_the_mapping_covers_all_1000_classes_with_plain_words():
    classes = load_classes()
    assert [c["index"] for c in classes] == list(range(1000))
    assert all(c["words"] and all(w == w.lower() for w in c["words"]) for c in classes)
    first = {c["name"]: c["words"][0] for c in classes}
    assert first["Egyptian cat"] == first["tabby"] == "cat"
    assert first["golden retriever"] == first["Pekinese"] == "dog"
    assert first["admiral"] == first["monarch"] == "butterfly"
    assert (first["espresso"], first["Granny Smith"], first["fox squirrel"], first["daisy"]) == \
           ("coffee", "apple", "squirrel", "daisy")
    assert first["moped"] in ("scooter", "motorcycle")
    assert {c["kind"] for c in classes if c["name"] in ("ballplayer", "scuba diver", "groom")} == {"person"}


@pytest.mark.skipif(not (WORDNET / "data.noun").exists() or importlib.util.find_spec("timm") is None,
                    reason="needs Debian's wordnet-base and timm (requirements-dev.txt)")
def test_the_mapping_is_reproducible_from_its_script():
    spec = importlib.util.spec_from_file_location("imagenet_words", ROOT / "tools" / "imagenet_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build(WORDNET) == json.loads(WORDS_FILE.read_text())


def test_the_detectors_ship_with_people_words():
    c = Concepts.load()
    assert c.words[0] == "people" and c.weight.shape == (len(c.words), 1280)
    assert {"man", "men", "woman", "people", "boy", "girl", "shirt"} <= set(c.people_words)
    assert not {"dog", "cat", "grass", "ball", "white", "building"} & set(c.people_words)


# ---- the head on real photos --------------------------------------------------------------------------

@needs_weights
def test_the_tools_encoder_reproduces_torchvisions_classifier_and_tags_the_cat(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HOME))
    import torchvision
    from captioning.inference.captioner import Captioner
    c = Captioner.load("default", device="cpu")
    photo = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    pooled = c.encode([photo]).mean(1).numpy()          # BatchNorm folded, as captioning runs it
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    with torch.no_grad():
        ref = model(c.encoder()[1](photo).unsqueeze(0)).softmax(-1).numpy()
    head = c.grounder().head
    assert np.abs(head.probs(pooled) - ref).max() < 1e-4
    result = c.caption_pil([photo])[0]
    assert "cat" in [t["word"] for t in result.tags]
    assert "cat" in result.captions[0].split() and "dog" not in result.captions[0].split()
    assert 0.0 <= result.confidence <= 1.0


@needs_weights
def test_guidance_off_is_the_plain_search(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(TORCH_HOME))
    from captioning.inference.captioner import Captioner
    from captioning.search.torch_search import search
    c = Captioner.load("default", device="cpu")
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples").glob("*.jpg"))]
    off = SearchConfig(guidance=False)
    feats = c.encode(photos, mirror=True)
    plain = [[c.vocab.decode(h.tokens) for h in hs] for hs in search(c.search_decoder(off), feats, off, memory=c.memory)]
    assert [r.captions for r in c.caption_pil(photos, off)] == plain
    assert all(r.tags == [] for r in c.caption_pil(photos, off))


# ---- guided search ------------------------------------------------------------------------------------

class Fixed:
    """A decoder whose word distribution never changes: word 5 likeliest, then 6, 7...; <end> after 3 words."""
    uses_grid, per_image = False, ()

    def init_state(self, features):
        return {"t": torch.zeros(features.shape[0])}

    def step(self, tokens, state):
        logits = torch.full((len(tokens), 12), -8.0)
        logits[:, 5:] = torch.arange(7, 0, -1, dtype=torch.float)        # 5 > 6 > ... > 11
        logits[:, END] = torch.where(state["t"] >= 3, 10.0, -8.0)
        return logits, {"t": state["t"] + 1}, None


def test_constrained_output_contains_its_constraint_and_no_barred_word():
    feats = torch.zeros(2, 4)
    plain = beam_search(Fixed(), feats, SearchConfig(beam_size=3, block_trigrams=False))
    assert all(10 not in h[0].tokens for h in plain) and all(5 in h[0].tokens for h in plain)
    g = [Grounding([], 0.1, word="w10", proxy=10, bar_people=True), Grounding([], 0.9)]
    bars, boosts = bias_rows(g, 12, people_ids=[5])
    guided = Guided(Fixed(), torch.from_numpy(bars), torch.from_numpy(boosts), torch.tensor([10, -1]))
    out = beam_search(guided, feats, SearchConfig(beam_size=3, block_trigrams=False))
    assert 10 in out[0][0].tokens and 5 not in out[0][0].tokens      # the constraint said, the barred word not
    assert out[0][0].tokens.count(10) == 1                           # raised until said, not beyond
    assert out[1][0].tokens == plain[1][0].tokens                    # a photo without guidance keeps its caption
    assert choose(out[0], g[0], [5]) is out[0][0]
    assert choose([Hypothesis([5, 10], 0.0, 0.0)], g[0], [5]) is None


def test_words_the_vocabulary_lacks_and_the_plain_fallback():
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "insect", "on", "leaf", "an", "orange"]
    g = Grounding([], 0.0, word="ladybug", kind="animal", proxy=5)
    assert finish_text("an insect on a leaf", g, words) == "a ladybug on a leaf"
    assert finish_text("a leaf", g, words) == "a leaf"
    assert fallback_text(Grounding([], 0.0, word="orange", kind="food")) == "a close-up of an orange"
    assert fallback_text(Grounding([], 0.0)) == "a photo"
    assert plural_fix("a apple on a table") == "an apple on a table"

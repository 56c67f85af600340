"""Keywords (tags) for photo libraries: tags.py's one function from logits to tags, and every place the tags
go: JSON/JSONL/CSV rows (resuming older files), XMP dc:subject and IPTC Keywords through exiftool (merged
with the keywords a photo already has), the captioned PNG, the dashboard, the CLI's and menu's printout,
and the ONNX export (its head graph and mapping) against torch on examples/chelsea.jpg."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.results import render
from captioning.results.metadata import ExifTool, exiftool_path, write_xmp_sidecar, xmp_packet
from captioning.results.outputs import OutputConfig, Outputs, Photo, RowFile, Result, key, keywords
from captioning.grounding.tags import TagMap, class_words, tags_from_logits
from captioning.utils import CaptioningError

from tests.helpers import ROOT, TORCH_HOME

needs_exiftool = pytest.mark.skipif(exiftool_path() is None, reason="exiftool not installed "
                                    "(apt-get install libimage-exiftool-perl)")
CHELSEA = ROOT / "examples" / "chelsea.jpg"
TAGS = [{"word": "cat", "score": 0.91}, {"word": "animal", "score": 0.4}]


def tiny_mapping():
    """ImageNet's order, as far as these tests need it: the domestic cats (281-285) → cat, the dogs → dog,
    both → animal; everything else unmapped."""
    return [["cat", "animal"] if 281 <= i <= 285 else ["dog", "animal"] if 151 <= i <= 268 else None
            for i in range(1000)]


def tagged(image, captions=("a cat on a bed",), scores=(-1.25,), tags=TAGS, confidence=0.8):
    return Result(str(image), list(captions), list(scores), tags=[dict(t) for t in tags], confidence=confidence)


def jpeg(path):
    a = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)
    return path


def exif_json(path, *tags):
    out = subprocess.run([exiftool_path(), "-j", "-struct", "-G1", *(f"-{t}" for t in tags), str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def as_list(value):
    return value if isinstance(value, list) else [] if value is None else [value]


# ---- tags.py ------------------------------------------------------------------------------------------

def test_tags_sum_a_words_classes_keep_those_above_the_threshold_highest_first():
    tag_map = TagMap([["cat", "animal"], ["cat", "animal"], ["dog", "animal"], None])
    logits = np.log([[0.3, 0.25, 0.4, 0.05], [0.05, 0.05, 0.05, 0.85]])
    got = tags_from_logits(logits, tag_map, 0.3)
    assert got == [[{"word": "animal", "score": 0.95}, {"word": "cat", "score": 0.55}, {"word": "dog", "score": 0.4}],
                   []]
    assert tags_from_logits(logits, tag_map, 0.5)[0] == got[0][:2]
    assert tags_from_logits(logits, tag_map, 0.3, limit=1)[0] == got[0][:1]
    # Two readings of each photo (it and its mirror image): the mean of their probabilities.
    mirrored = np.log([[0.1, 0.1, 0.7, 0.1], [0.05, 0.05, 0.05, 0.85]])
    assert [t["word"] for t in tags_from_logits(np.stack([logits, mirrored]), tag_map, 0.3)[0]] == \
        ["animal", "dog", "cat"]
    # Equal scores: the more specific word (fewer classes) first.
    assert [t["word"] for t in tags_from_logits(np.log([[0.5, 0.5, 1e-9, 1e-9]]), tag_map, 0.3)[0]] == ["cat", "animal"]
    with pytest.raises(CaptioningError, match="3 classes but the tag mapping has 4"):
        tags_from_logits(np.zeros((1, 3)), tag_map, 0.3)


def test_every_mapping_shape_reads_as_the_same_words():
    entries = [{"index": 1, "name": "tabby", "words": ["cat"]}, {"index": 0, "name": "tench", "words": ["fish"]}]
    assert class_words({"classes": entries}) == [("fish",), ("cat",)]          # tools/imagenet_words.py's file
    assert class_words(["fish", ["cat", "cat"], None]) == [("fish",), ("cat",), ()]
    assert class_words({"0": "fish", "2": "cat"}) == [("fish",), (), ("cat",)]
    with pytest.raises(CaptioningError, match="not a word"):
        class_words([3])


# ---- rows ---------------------------------------------------------------------------------------------

def test_json_jsonl_and_csv_rows_carry_tags_and_confidence(tmp_path):
    res = tagged(tmp_path / "a.jpg", ["a cat on a bed", "a cat"], [-1.25, -2.5])
    assert res.to_json()["tags"] == TAGS and res.to_json()["confidence"] == 0.8
    assert keywords(res) == ["cat", "animal"]
    for kind in ("csv", "jsonl"):
        rows = RowFile(tmp_path / f"out.{kind}", kind)
        rows.write(res)
        rows.close()
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["tags"] == TAGS and row["confidence"] == 0.8
    table = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [(r["caption"], r["tags"], r["confidence"]) for r in table] == [
        ("a cat on a bed", "cat; animal", "0.8000"), ("a cat", "cat; animal", "0.8000")]


def test_resuming_csv_and_jsonl_files_from_before_the_tags(tmp_path):
    old_csv, old_jsonl = tmp_path / "old.csv", tmp_path / "old.jsonl"
    old_csv.write_text(f"image,caption,score\n{tmp_path / 'a.jpg'},a dog,-1.0000\n")
    old_jsonl.write_text(json.dumps({"image": str(tmp_path / "a.jpg"), "caption": "a dog"}) + "\n")
    for path, kind in ((old_csv, "csv"), (old_jsonl, "jsonl")):
        rows = RowFile(path, kind)
        assert rows.done == {key(tmp_path / "a.jpg")}
        rows.write(tagged(tmp_path / "b.jpg"))
        rows.close()
    # The old CSV keeps its own three columns: a reader of that file is not handed a ragged table.
    assert old_csv.read_text().splitlines()[1:] == [f"{tmp_path / 'a.jpg'},a dog,-1.0000",
                                                   f"{tmp_path / 'b.jpg'},a cat on a bed,-1.2500"]
    assert json.loads(old_jsonl.read_text().splitlines()[1])["tags"] == TAGS


# ---- XMP and IPTC keywords ------------------------------------------------------------------------------

@needs_exiftool
def test_keywords_round_trip_through_exiftool_and_the_users_own_survive(tmp_path):
    photo = jpeg(tmp_path / "a.jpg")
    subprocess.run([exiftool_path(), "-q", "-overwrite_original", "-XMP-dc:Subject=holiday", "-XMP-dc:Subject=cat",
                    "-IPTC:Keywords=holiday", str(photo)], check=True)
    pixels = np.asarray(Image.open(photo))
    tool = ExifTool()
    try:
        assert tool.write(photo, "a cat on a bed", keywords=["cat", "animal"]) is None
        assert tool.write(photo, "a cat on a bed", keywords=["cat", "\x1b\x07"]) is None   # nothing doubles
        png = tmp_path / "b.png"
        Image.fromarray(pixels).save(png)
        assert tool.write(png, "a cat", keywords=["cat", "café"]) is None
    finally:
        tool.close()
    meta = exif_json(photo, "XMP-dc:Subject", "IPTC:Keywords", "XMP-dc:Description")
    assert sorted(as_list(meta["XMP-dc:Subject"])) == ["animal", "cat", "holiday"]
    assert sorted(as_list(meta["IPTC:Keywords"])) == ["animal", "cat", "holiday"]
    assert meta["XMP-dc:Description"] == "a cat on a bed"
    assert np.array_equal(np.asarray(Image.open(photo)), pixels)                # lossless: the same pixels
    assert as_list(exif_json(png, "XMP-dc:Subject")["XMP-dc:Subject"]) == ["cat", "café"]


@needs_exiftool
def test_xmp_sidecars_new_and_existing_get_the_keywords(tmp_path):
    new = tmp_path / "new.xmp"
    assert write_xmp_sidecar(new, "a cat", keywords=["cat", "animal & co", "cat", "bad\x00\nword"]) is None
    assert "<rdf:li>animal &amp; co</rdf:li>" in new.read_text()
    assert as_list(exif_json(new, "XMP-dc:Subject")["XMP-dc:Subject"]) == ["cat", "animal & co", "bad word"]
    old = tmp_path / "old.xmp"
    old.write_text(xmp_packet("a dog", ["holiday"]).replace('rdf:about=""', 'rdf:about="" xmlns:xmp="http://ns'
                   '.adobe.com/xap/1.0/" xmp:Rating="4"'))
    tool = ExifTool()
    try:
        assert write_xmp_sidecar(old, "a cat", tool, ["cat", "holiday"]) is None
    finally:
        tool.close()
    meta = exif_json(old, "XMP-dc:Subject", "XMP-xmp:Rating")
    assert sorted(as_list(meta["XMP-dc:Subject"])) == ["cat", "holiday"] and meta["XMP-xmp:Rating"] == 4


@needs_exiftool
def test_a_folder_runs_xmp_and_metadata_outputs_carry_the_tags(tmp_path):
    photo = jpeg(tmp_path / "a.jpg")
    sink = Outputs(OutputConfig(png=False, xmp=True, metadata=True, jsonl=str(tmp_path / "out.jsonl")), False)
    sink.submit(Photo(photo, Path("a.jpg")), tagged(photo))
    sink.close()
    assert not sink.failures
    assert sorted(as_list(exif_json(photo, "IPTC:Keywords")["IPTC:Keywords"])) == ["animal", "cat"]
    assert sorted(as_list(exif_json(tmp_path / "a.xmp", "XMP-dc:Subject")["XMP-dc:Subject"])) == ["animal", "cat"]


# ---- the PNG, the dashboard, the printout ------------------------------------------------------------------

def test_the_captioned_png_has_a_line_of_tags_under_the_caption(tmp_path):
    image = Image.new("RGB", (120, 90), "orange")
    plain = render.save_captioned_image(image, "a cat", tmp_path / "plain.png")
    with_tags = render.save_captioned_image(image, "a cat", tmp_path / "tags.png", TAGS)
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(with_tags))
    assert b.shape[0] > a.shape[0] and np.array_equal(b[:a.shape[0] - 30], a[:a.shape[0] - 30])
    band = b[a.shape[0] - 25:]                               # the new rows: grey text on white
    assert (band < 200).any() and not (band < 60).any()
    assert render.tag_line(TAGS) == "cat 0.91 · animal 0.40"


def test_the_dashboard_shows_the_tags_and_puts_them_in_its_csv():
    pytest.importorskip("streamlit")
    from captioning.interfaces import dashboard
    res = tagged("a.jpg")
    assert dashboard.tags_text(res) == "tags: cat 0.91 · animal 0.40 — confidence 0.80"
    rows = list(csv.DictReader(dashboard.results_csv([res]).splitlines()))
    assert rows[0]["tags"] == "cat; animal" and rows[0]["confidence"] == "0.8000"


def test_the_dashboard_page_shows_a_photos_tags(tmp_path, monkeypatch):
    st = pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from captioning.inference.captioner import Captioner
    from tests.helpers import small_checkpoint
    small_checkpoint(tmp_path / "models" / "best.pt", "lstm")
    real = Captioner.results
    monkeypatch.setattr(Captioner, "results", lambda self, names, hyps: [
        Result(r.image, r.captions, r.scores, r.words, r.alphas, tags=TAGS, confidence=0.8)
        for r in real(self, names, hyps)])
    from streamlit import config
    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")    # this computer: the path box is there
    st.cache_resource.clear()
    from captioning.interfaces import dashboard
    dashboard.forget_models()   # the server's models outlive a test: this one captions with its own
    monkeypatch.setattr("sys.argv", ["dashboard.py", "--workdir", str(tmp_path), "--no-segmentation",
                                     "--image", str(CHELSEA)])
    at = AppTest.from_file(str(ROOT / "captioning" / "interfaces" / "dashboard.py"), default_timeout=120)
    try:
        at.run()
    finally:
        config.set_option("server.address", before)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert "tags: cat 0.91 · animal 0.40 — confidence 0.80" in [c.value.replace("\\", "") for c in at.caption]


def test_caption_prints_the_tags_and_so_does_the_menus_caption_option(monkeypatch, capsys, tmp_path, run_main):
    from captioning.inference import captioner
    from captioning.interfaces import cli
    from captioning.interfaces import menu
    monkeypatch.setattr(captioner, "caption_files", lambda *a, **k: [tagged(CHELSEA)])
    monkeypatch.setattr(captioner.Captioner, "load", classmethod(lambda cls, *a, **k: None))
    code, out, err = run_main("caption", CHELSEA, "--model", "default", "--no-png")
    assert code == 0, err
    printed = out.splitlines()
    assert printed == [str(CHELSEA), "  a cat on a bed", "  tags: cat (0.91), animal (0.40)"]
    answers = iter([str(CHELSEA), "", "n"])
    monkeypatch.setattr(menu.out, "input", lambda prompt: next(answers))
    state = menu.MenuState(cli.build_parser().parse_args(["--workdir", str(tmp_path)]), cli.run_argv)
    menu.do_caption(state)
    assert "  tags: cat (0.91), animal (0.40)" in capsys.readouterr().out.splitlines()


# ---- ONNX ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tagging_export(tmp_path_factory):
    """A tiny decoder on the pretrained MobileNetV2 (its ImageNet head), exported with the tiny mapping."""
    if not (TORCH_HOME / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").exists():
        pytest.skip("needs ../shared/torch_home's MobileNetV2 weights")
    import torch

    from captioning.deploy import onnx_export
    from captioning.inference.captioner import Captioner
    from captioning.training.checkpoint import save_checkpoint
    from captioning.features.encoders import EncoderSpec
    from captioning.config import ModelConfig
    from captioning.models.decoders import build_decoder
    from tests.helpers import WORDS
    root = tmp_path_factory.mktemp("tagging")
    mapping = root / "words.json"
    mapping.write_text(json.dumps({"classes": [{"index": i, "words": w or []} for i, w in enumerate(tiny_mapping())]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(TORCH_HOME))
        mp.setattr(onnx_export, "MAPPING", mapping)
        torch.manual_seed(0)
        cfg = ModelConfig(decoder="lstm", vocab_size=len(WORDS), feat_dim=1280, embed_dim=16, hidden_dim=24,
                          dropout=0.0)
        ckpt = {"decoder_state": build_decoder(cfg).state_dict(), "vocab": WORDS, "model_config": cfg.to_dict(),
                "encoder": EncoderSpec("mobilenet_v2", "IMAGENET1K_V1").to_dict(), "grid_hw": [7, 7]}
        captioner = Captioner.load(save_checkpoint(root / "model.pt", ckpt), device="cpu")
        folder = onnx_export.export_onnx(captioner, root / "export")
        torch_logits = torch_reference_logits(captioner)
    return folder, mapping, torch_logits


def torch_reference_logits(captioner):
    """torchvision's own MobileNetV2 classifying chelsea.jpg and its mirror image, preprocessed by the
    captioner's transform: logits [2, 1000]."""
    import torch
    import torchvision

    from captioning.features.images import load_image
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    x = captioner.encoder()[1](load_image(CHELSEA))[None]
    with torch.no_grad():
        return model(torch.cat([x, x.flip(-1)])).numpy()


def test_onnx_tags_equal_torch_tags_on_chelsea(tagging_export, tmp_path):
    from captioning.deploy import onnx_runtime as rt
    from captioning.features.images import load_image
    from captioning.config import SearchConfig
    folder, mapping, torch_logits = tagging_export
    config = json.loads((folder / rt.CONFIG).read_text())
    assert config["tags"] == {"graph": "head.onnx", "mapping": "imagenet_words.json"}
    assert (folder / "imagenet_words.json").read_bytes() == mapping.read_bytes()     # the export carries it
    captioner = rt.OnnxCaptioner(folder)
    for readings, mirror in ((torch_logits[:1, None], False), (torch_logits[:, None], True)):
        want = tags_from_logits(readings, TagMap.load(mapping), 0.1)[0]
        assert [t["word"] for t in want][:2] == ["cat", "animal"]
        got = captioner.caption_pil([load_image(CHELSEA)], SearchConfig(beam_size=2, rerank=False, mirror=mirror,
                                                                          tag_threshold=0.1))[0].tags
        assert [t["word"] for t in got] == [t["word"] for t in want]
        assert np.allclose([t["score"] for t in got], [t["score"] for t in want], atol=1e-3)
    # A folder run through the runtime writes them too.
    shutil.copy(CHELSEA, tmp_path / "chelsea.jpg")
    results = rt.caption_files(captioner, [tmp_path], SearchConfig(beam_size=2, rerank=False, tag_threshold=0.1),
                               outputs=OutputConfig(png=False, jsonl=str(tmp_path / "out.jsonl")))
    assert [t["word"] for t in results[0].tags][:2] == ["cat", "animal"]
    assert json.loads((tmp_path / "out.jsonl").read_text())["tags"] == results[0].to_json()["tags"]


@pytest.mark.parametrize("how, says", [("no head", "head.onnx is missing"), ("bad entry", "damaged"),
                                       ("elsewhere", "damaged")])
def test_an_export_with_a_damaged_tags_entry_is_one_line(tagging_export, tmp_path, how, says):
    from captioning.deploy import onnx_runtime as rt
    folder = tmp_path / "bad"
    shutil.copytree(tagging_export[0], folder)
    config = json.loads((folder / rt.CONFIG).read_text())
    if how == "no head":
        (folder / "head.onnx").unlink()
    else:
        config["tags"] = ["head.onnx"] if how == "bad entry" else {"graph": "/etc/passwd", "mapping": "x.json"}
        (folder / rt.CONFIG).write_text(json.dumps(config))
    with pytest.raises(CaptioningError, match=says):
        rt.OnnxCaptioner(folder)

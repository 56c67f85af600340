"""Tests for captioning/evaluation.py: a model run over a split, scored, and its report."""
import json

import pytest

from captioning.inference.captioner import Captioner
from captioning.metrics.scores import score_captions
from captioning.features.extract import extract_features
from captioning import evaluation
from captioning.evaluation import EvalRun, caption_split, evaluate_model
from captioning.config import ExtractConfig
from captioning.features.prepare import prepare
from captioning.config import SearchConfig
from captioning.utils import CaptioningError


def test_evaluate_model_captions_the_split_and_scores_its_report(attention_model, shapes_data, tmp_path,
                                                                monkeypatch):
    workdir, ckpt = attention_model   # its workdir holds the feature cache: nothing to extract
    report = tmp_path / "val.json"
    titles = []
    monkeypatch.setattr(evaluation, "print_metrics_table", lambda scores, title: titles.append(title))
    run = EvalRun(shapes_data, split="val", model=ckpt, workdir=workdir, device="cpu", output=report, batch_size=7)
    scores = evaluate_model(run, SearchConfig(beam_size=2))
    written = json.loads(report.read_text())
    captioner = Captioner.load(ckpt, device="cpu")
    _, records, store = prepare(shapes_data, workdir, captioner.spec, ExtractConfig(device="cpu"))
    val = [r for r in records if r.split == "val"]
    assert [c["image"] for c in written["captions"]] == [str(r.image) for r in val]   # every image, in order
    # The search run and recorded: re-ranking widened --beam-size 2 to the pool's 10.
    assert titles == [f"val split, {len(val):,} images, beam 10, its 10 best re-ranked"]
    assert written["settings"] == {"split": "val", "images": len(val), "model": str(ckpt), "beam_size": 10,
                                   "length_alpha": SearchConfig().length_alpha, "max_len": SearchConfig().max_len,
                                   "mirror": True, "mirror_mode": "fused", "stop_early": True, "rerank": True,
                                   "rerank_pool": 10, "neighbours": 30}
    assert written["scores"] == scores and scores["CIDEr-D"] > 0
    # The captions are the model's beam search on the cached features (7 at a time as all at once), and
    # the scores are evaluate.py's on them.
    mirror = extract_features(store.paths, captioner.spec, workdir, ExtractConfig(device="cpu", mirror=True))
    at_once = caption_split(captioner, [store, mirror], val, SearchConfig(beam_size=2), batch_size=len(val))
    assert [c["caption"] for c in written["captions"]] == at_once
    again = score_captions({c["image"]: c["caption"] for c in written["captions"]},
                           {c["image"]: c["references"] for c in written["captions"]})
    assert again == pytest.approx(scores)


def test_a_split_without_images_is_one_sentence(attention_model, shapes_data, tmp_path):
    workdir, ckpt = attention_model
    with pytest.raises(CaptioningError, match="The dataset has no images in its 'holdout' split."):
        evaluate_model(EvalRun(shapes_data, split="holdout", model=ckpt, workdir=workdir, device="cpu",
                               output=tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()

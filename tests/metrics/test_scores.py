"""Tests for captioning/metrics/scores.py: metric values, the no-Java path, quiet stdout, reports.

The Java tests compare against pycocoevalcap called the official way (PTBTokenizer + scorers); METEOR
needs ~7 s to start, so only two tests start it."""
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from captioning.metrics import scores as evaluate
from captioning.metrics.scores import (SCORE_KEYS, _clean, java_available, print_metrics_table, ptb_tokenize,
                                 score_captions, write_report)
from captioning.utils import CaptioningError

needs_java = pytest.mark.skipif(shutil.which("java") is None or not java_available(),
                                reason="java not on PATH")

# Raw text as datasets have it: mixed case, trailing spaces, with or without a final period.
REFS = {
    "img1.jpg": ["A black dog is running through the grass .", "A dog runs across a green field.",
                 "The black dog runs on the lawn", "A dog's running in a park.  "],
    "img2.jpg": ["Two children play on the beach.", "Two kids are playing in the sand near the water ."],
    "img3.jpg": ["A man rides a red bicycle down the street.", "A cyclist on a city road .",
                 "A man in a helmet is riding his bike", "Someone bikes past some shops.",
                 "A person riding a bicycle , outdoors ."],
    "img4.jpg": ["A woman holds an umbrella in the rain", "A lady with an umbrella walks on a wet sidewalk."],
}
CANDS = {
    "img1.jpg": "A black dog runs through the grass.",
    "img2.jpg": "two kids are playing on the beach",
    "img3.jpg": "a man is riding a bike down the street .",
    "img4.jpg": "A dog is sitting on a couch.",
}


def direct_scores(cands, refs, meteor):
    """pycocoevalcap the way its own COCOEvalCap runs it; `meteor` is a started Meteor()."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": cands[k]}] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    m = meteor.compute_score(gts, res)[0]
    return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3], "METEOR": m,
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


def meteor_children():
    """Live child processes of this test run that are METEOR's Java (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"meteor" in cmd:
            found.append(cmd)
    return found


@pytest.mark.slow
@needs_java
def test_java_path_matches_pycocoevalcap_and_keeps_stdout_clean(capfd, monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module
    # One METEOR Java process serves both sides (each start costs ~7 s): the official computation
    # first, then score_captions gets the same process and must shut it down.
    started = meteor_module.Meteor()
    theirs = direct_scores(CANDS, REFS, started)
    capfd.readouterr()
    monkeypatch.setattr(meteor_module, "Meteor", lambda: started)
    ours = score_captions(CANDS, REFS)
    out, _ = capfd.readouterr()
    assert out == ""
    assert started.meteor_p.poll() is not None  # closed after use
    assert set(ours) == set(SCORE_KEYS)
    for key in SCORE_KEYS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    # The example is neither perfect nor hopeless, so equality above is not trivially 0 == 0.
    assert 0.1 < ours["BLEU-4"] < 0.9 and 0.1 < ours["METEOR"] < 0.9 and ours["CIDEr-D"] > 0.5


@pytest.mark.slow
@needs_java
def test_java_path_survives_awkward_text_and_closes_meteor(capfd):
    # Newlines and "|||" break METEOR's line protocol (it would wait forever); an empty caption must
    # score as empty, not crash or shift the other captions.
    cands = {1: "a dog\nruns ||| on grass", 2: "", 3: "A man | riding a bike.", 4: "café au lait"}
    refs = {1: ["A dog runs on the grass.", "a dog\r\nin a field"], 2: ["Two kids on a beach"],
            3: ["A man riding a bike.", "   ", "someone on a bicycle |||"], 4: ["a café table"]}
    scores = score_captions(cands, refs)
    out, _ = capfd.readouterr()
    assert out == ""
    assert all(isinstance(scores[k], float) for k in SCORE_KEYS)
    assert 0 < scores["METEOR"] < 1 and 0 < scores["BLEU-1"] < 1
    assert meteor_children() == []
    # The empty caption drags the set down: the same set without it scores higher.
    del cands[2], refs[2]
    without = score_captions(cands, refs, metrics=("BLEU", "ROUGE_L"))
    assert without["BLEU-1"] > scores["BLEU-1"] and without["ROUGE-L"] > scores["ROUGE-L"]


TOKENIZER_CASES = [
    "A black dog is running through the grass .", "A dog's ball (red) is on the \"grass\".",
    "The man isn't going; they're here, we'll see... I'd go & I'm done!",
    "black-and-white photo -- of a 3.5 m tall St. Bernard, near Mr. Smith's car",
    "1,000 people at 5:30 p.m. in the U.S.A. at the dogs' bowls", "what?! yes!! a - b .. c",
    "A young boy slides on a Slip 'n' Slide .", "She said 'hello' to the cat", "don't can't won't cannot",
    "the dog\u2019s \u201cball\u201d \u2014 50% off for $5 at #1 a.",
]


@pytest.fixture(scope="module")
def ptb_reference():
    """The Java tokenizer's output for all TOKENIZER_CASES, in one Java start."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(TOKENIZER_CASES)})
    return {TOKENIZER_CASES[i]: v[0] for i, v in out.items()}


@needs_java
@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_python_tokenizer_matches_ptb(text, ptb_reference):
    assert ptb_tokenize(text) == ptb_reference[text]


@needs_java
def test_python_path_agrees_with_java_path(capsys):
    metrics = ("BLEU", "ROUGE_L", "CIDEr")  # METEOR left out: starting it costs seconds
    with_java = score_captions(CANDS, REFS, metrics=metrics, use_java=True)
    without = score_captions(CANDS, REFS, metrics=metrics, use_java=False)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert without[key] == pytest.approx(with_java[key], abs=1e-3), key
    assert capsys.readouterr().out == ""


def test_without_java_meteor_is_none_and_said_so(capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "java_available", lambda: False)
    scores = score_captions(CANDS, REFS)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert scores["METEOR"] is None
    assert "Java was not found" in captured.err
    assert all(isinstance(scores[k], float) for k in SCORE_KEYS if k != "METEOR")
    with pytest.raises(CaptioningError, match="Java"):
        score_captions(CANDS, REFS, use_java=True)
    monkeypatch.undo()
    assert score_captions(CANDS, REFS, use_java=False)["METEOR"] is None
    assert "METEOR skipped" in capsys.readouterr().err


def test_java_available_false_without_java_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_available.__wrapped__() is False


def test_perfect_candidates_score_top_and_beat_wrong_ones():
    perfect = {k: v[1] for k, v in REFS.items()}
    wrong = {k: "a plate of food on a wooden table" for k in REFS}
    best = score_captions(perfect, REFS, use_java=False)
    worst = score_captions(wrong, REFS, use_java=False)
    for n in range(1, 5):
        assert best[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert best["ROUGE-L"] == pytest.approx(1.0)
    assert worst["BLEU-1"] < 0.5 and worst["BLEU-4"] < 1e-3
    assert best["CIDEr-D"] > 1.0 > worst["CIDEr-D"]


def test_scores_do_not_depend_on_key_type_or_order():
    base = score_captions(CANDS, REFS, use_java=False)
    keys = list(reversed(list(CANDS)))
    as_paths = score_captions({Path(k): CANDS[k] for k in keys}, {Path(k): REFS[k] for k in keys},
                              use_java=False)
    assert as_paths == pytest.approx(base)


def test_empty_and_single_inputs():
    empty = score_captions({"a": ""}, {"a": ["A dog runs."]}, use_java=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert empty[key] == pytest.approx(0.0, abs=1e-9), key
    # One image: CIDEr-D's idf is 0 for every n-gram, so it is 0 by construction, but nothing fails.
    one = score_captions({"a": "a dog runs"}, {"a": ["A dog runs."]}, use_java=False)
    assert one["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and one["CIDEr-D"] == 0.0
    only_bleu = score_captions({"a": "a dog runs"}, {"a": ["A dog runs."]}, metrics=("BLEU",), use_java=False)
    assert only_bleu["BLEU-1"] is not None
    assert only_bleu["ROUGE-L"] is None and only_bleu["CIDEr-D"] is None and only_bleu["METEOR"] is None


def test_bad_inputs_raise_captioning_error():
    with pytest.raises(CaptioningError, match="no captions"):
        score_captions({}, REFS, use_java=False)
    with pytest.raises(CaptioningError, match="no reference"):
        score_captions({"new.jpg": "a dog"}, REFS, use_java=False)
    with pytest.raises(CaptioningError, match="no reference"):
        score_captions({"a": "a dog"}, {"a": ["  ", ""]}, use_java=False)
    with pytest.raises(CaptioningError, match="Unknown metric"):
        score_captions(CANDS, REFS, metrics=("SPICE",), use_java=False)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60), st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3))
def test_python_path_never_crashes(candidate, references):
    references = [r for r in references if _clean(r)] or ["a dog"]   # what score_captions counts as text
    tokens = ptb_tokenize(candidate).split()
    assert not set(tokens) & {".", ",", "?", "!", ";", ":", "'", "`", "--", "..."}
    assert "\n" not in ptb_tokenize(candidate)
    scores = score_captions({"x": candidate, "y": "a dog"}, {"x": references, "y": ["a cat"]}, use_java=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert 0.0 <= scores[key] <= 1.0 + 1e-9


def test_print_metrics_table_goes_to_stderr(capsys):
    print_metrics_table({"BLEU-4": 0.21234, "METEOR": None}, "Test split")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Test split" in captured.err and "0.2123" in captured.err and "skipped" in captured.err


def test_write_report_is_valid_json_and_atomic(tmp_path):
    import numpy as np
    path = tmp_path / "reports" / "eval.json"
    captions = [{"image": "img1.jpg", "caption": "a dog", "references": ["A dog."]}]
    write_report(path, {"BLEU-4": np.float64(0.25), "METEOR": None}, captions, {"split": "test", "beam_size": 3})
    assert json.loads(path.read_text()) == {"scores": {"BLEU-4": 0.25, "METEOR": None},
                                            "settings": {"split": "test", "beam_size": 3}, "captions": captions}
    # A failing write leaves the previous report whole and no temporary file behind.
    with pytest.raises(TypeError):
        write_report(path, {"BLEU-4": 0.5}, [{"image": object()}])
    assert json.loads(path.read_text())["scores"]["BLEU-4"] == 0.25
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]

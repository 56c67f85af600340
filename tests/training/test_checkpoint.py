"""Checkpoints: weights_only loading, every kind of bad file refused clearly, atomic saves, lookup order."""
import json
import os
import random

import pytest
import torch

from captioning.training import checkpoint as ck
from captioning.utils import CaptioningError


def minimal():
    return {"decoder_state": {"w": torch.ones(2)}, "vocab": ["<pad>", "<start>", "<end>", "<unk>", "dog"],
            "model_config": {"decoder": "lstm"}, "encoder": {"name": "resnet18"}, "epoch": 1,
            "best_score": 0.5, "best_metric": "CIDEr-D", "history": [{"val_loss": 2.0}]}


def test_round_trip_and_summary(tmp_path):
    path = ck.save_checkpoint(tmp_path / "m.pt", minimal())
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["decoder_state"]["w"], torch.ones(2))
    summary = ck.read_summary(path)
    assert summary["vocab_size"] == 5 and summary["decoder"] == "lstm"
    assert "vocabulary 5 words" in ck.describe(summary)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = "/tmp/image-captioning-evil-mark"


@pytest.mark.parametrize("kind", ["missing", "folder", "garbage", "truncated", "pickle_code", "foreign",
                                  "old_version", "incomplete"])
def test_bad_files_are_refused_in_one_sentence(tmp_path, kind):
    path = tmp_path / "m.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(random.Random(1).randbytes(1000))
    elif kind == "truncated":
        ck.save_checkpoint(path, minimal())
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "pickle_code":
        if os.path.exists(EVIL_MARK):
            os.unlink(EVIL_MARK)
        torch.save({"x": Evil()}, path)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    elif kind == "old_version":
        torch.save({**minimal(), "format": ck.FORMAT, "version": 0}, path)
    elif kind == "incomplete":
        torch.save({"format": ck.FORMAT, "version": ck.VERSION, "vocab": []}, path)
    with pytest.raises(CaptioningError) as err:
        ck.load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not os.path.exists(EVIL_MARK)    # the code inside the pickle never ran
    if kind in ("garbage", "truncated", "pickle_code"):
        assert err.value.__cause__ is not None  # torch.load's own error, kept for --debug


def test_random_bytes_are_called_corrupt_not_code(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CaptioningError) as e:
        ck.load_checkpoint(bad)
    assert "code" not in str(e.value) and "corrupt" in str(e.value)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ck.save_checkpoint(tmp_path / "last.pt", minimal())
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, {**minimal(), "epoch": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.pt"]   # no temp file left


def test_find_model_order(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "BUILTIN", tmp_path / "builtin.pt")
    with pytest.raises(CaptioningError, match="train"):
        ck.find_model(tmp_path)
    ck.BUILTIN.write_bytes(b"x")
    assert ck.find_model(tmp_path) == ck.BUILTIN                 # nothing of the user's: the built-in one
    models = tmp_path / "models"
    models.mkdir()
    (models / "last.pt").write_bytes(b"x")
    assert ck.find_model(tmp_path) == models / "last.pt"          # the user's own model wins
    (models / "best.pt").write_bytes(b"x")
    assert ck.find_model(tmp_path) == models / "best.pt"
    assert ck.find_model(tmp_path, "default") == ck.BUILTIN       # unless they ask for the built-in one
    assert ck.find_model(tmp_path, "~/x.pt") == ck.Path(os.path.expanduser("~/x.pt"))


def test_split_scores_come_from_the_checkpoint_else_the_report_beside_it(tmp_path):
    from captioning.training.checkpoint import report_path, split_scores
    path = tmp_path / "best.pt"
    assert split_scores({}, path, "test") == (None, "")
    report_path(tmp_path, "test").write_text(json.dumps({"scores": {"CIDEr-D": 0.4}, "captions": []}))
    assert split_scores({}, path, "test") == ({"CIDEr-D": 0.4}, "from eval_test.json")
    stored = {"evaluation": {"test": {"scores": {"CIDEr-D": 0.5}}}}
    assert split_scores(stored, path, "test") == ({"CIDEr-D": 0.5}, "stored in the checkpoint")
    assert split_scores(stored, path, "val") == (None, "")
    report_path(tmp_path, "val").write_text("{broken")
    assert split_scores({}, path, "val") == (None, "")

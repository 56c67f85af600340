"""Training objectives: self-critical arithmetic, one step on a toy problem, resume, and the registry."""
import types

import numpy as np
import pytest
import torch

from captioning.training import objectives
from captioning.config import ModelConfig
from captioning.models.decoders import build_decoder
from captioning.training.objectives import OBJECTIVES, SelfCritical, caption_ids, self_critical_advantage
from captioning.features.prepare import CaptionData
from captioning.config import TrainConfig
from captioning.training.train import train
from captioning.data.vocab import END, PAD


def test_the_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    adv = self_critical_advantage(rewards, 4)
    # image 0 (sum 12): baselines 11/3, 10/3, 9/3, 6/3; image 1: all equal, no signal
    expected = [1 - 11 / 3, 2 - 10 / 3, 0, 6 - 2, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected)


def test_sampled_rows_keep_their_end_and_drop_padding():
    tokens = torch.tensor([[5, 6, END, PAD], [7, 7, 7, 7]])
    assert caption_ids(tokens) == [[5, 6, END], [7, 7, 7, 7]]


def toy_problem(seed=0):
    """Two images whose references are fixed sentences: reward is high only for the right one."""
    torch.manual_seed(seed)
    vocab = 12
    refs = {0: [4, 5, 6], 1: [7, 8, 9]}
    tokens = torch.full((10, 6), PAD)
    rows, lengths = [], []
    for i in range(10):
        row = i % 2
        seq = [1, *refs[row], END]
        tokens[i, :len(seq)] = torch.tensor(seq)
        rows.append(row)
        lengths.append(len(seq))
    data = CaptionData(tokens, torch.tensor(lengths), torch.tensor(rows))
    grid = np.random.RandomState(seed).randn(2, 4, 8).astype(np.float16)
    store = types.SimpleNamespace(grid=grid, pooled=grid.mean(1))
    cfg = TrainConfig(objective="scst", batch_size=16, scst_samples=8,
                      model=ModelConfig(decoder="attention", vocab_size=vocab, feat_dim=8, embed_dim=16,
                                        hidden_dim=32, attention_dim=16, context_dim=16, dropout=0.0))
    return cfg, data, store


def expected_reward(objective, store, n=64):
    torch.manual_seed(123)
    with torch.no_grad():
        _, value, count = objective.loss(objective.module, store, torch.tensor([0, 1] * (n // 16)), "cpu")
    return value / count


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_scst_steps_raise_the_expected_reward(baseline):
    cfg, data, store = toy_problem()
    cfg.scst_baseline = baseline
    decoder = build_decoder(cfg.model)
    objective = SelfCritical(cfg, decoder, data)
    before = expected_reward(objective, store)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _, _ = objective.loss(objective.module, store, torch.tensor([0, 1]), "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = expected_reward(objective, store)
    assert after > before + 0.5, (before, after)   # CIDEr-D of the right sentence here is about 10


def test_every_objective_is_registered():
    assert set(OBJECTIVES) == {"xe", "scst"}
    for cls in OBJECTIVES.values():
        assert cls.stat in ("train_loss", "train_reward") and cls.dev_beam >= 1


def scst(workdir, data, epochs, resume=False):
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    spec, cfg = demo_configs(epochs=epochs, seed=0)
    cfg.objective, cfg.batch_size, cfg.scst_samples, cfg.scst_lr, cfg.dev_images = "scst", 40, 4, 1e-4, 20
    return train(data, workdir, cfg, spec, ExtractConfig(device="cpu", num_workers=1), resume=resume)


@pytest.fixture(scope="module")
def xe_start(attention_model, tmp_path_factory):
    """A workdir holding the session's trained attention model as its models/best.pt."""
    import shutil
    work = tmp_path_factory.mktemp("scst-start")
    shutil.copytree(attention_model[0] / "cache", work / "cache")
    (work / "models").mkdir()
    shutil.copy(attention_model[1], work / "models" / "best.pt")
    shutil.copy(attention_model[1].with_suffix(".json"), work / "models" / "best.json")
    return work


def copy_start(xe_start, dst):
    import shutil
    shutil.copytree(xe_start, dst)
    return dst


def test_scst_keeps_the_start_model_and_never_ends_worse(xe_start, shapes_data, tmp_path):
    work = copy_start(xe_start, tmp_path / "w")
    start = torch.load(work / "models" / "best.pt", weights_only=True)
    best = scst(work, shapes_data, epochs=1)
    kept = torch.load(work / "models" / "xe_best.pt", weights_only=True)
    assert all(torch.equal(kept["decoder_state"][k], v) for k, v in start["decoder_state"].items())
    last = torch.load(work / "models" / "last.pt", weights_only=True)
    history = last["history"]
    assert [h["epoch"] for h in history] == [0, 1] and history[0]["train_reward"] is None
    assert last["train_config"]["objective"] == "scst" and last["train_config"]["init_from"].endswith("xe_best.pt")
    assert history[1]["train_reward"] > 0
    # best.pt is the better of the start (epoch 0, beam search) and the trained epoch: never worse.
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["best_score"] == max(h["CIDEr-D"] for h in history) >= history[0]["CIDEr-D"]
    assert ckpt["epoch"] == max(history, key=lambda h: h["CIDEr-D"])["epoch"]


def test_scst_resume_is_exact(xe_start, shapes_data, tmp_path):
    straight = copy_start(xe_start, tmp_path / "straight")
    scst(straight, shapes_data, epochs=2)
    split = copy_start(xe_start, tmp_path / "split")
    scst(split, shapes_data, epochs=1)
    scst(split, shapes_data, epochs=2, resume=True)
    a = torch.load(straight / "models" / "last.pt", weights_only=True)
    b = torch.load(split / "models" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2]
    for ha, hb in zip(a["history"][1:], b["history"][1:]):
        assert ha["train_reward"] == pytest.approx(hb["train_reward"], rel=1e-6)
    for k in a["decoder_state"]:
        assert torch.allclose(a["decoder_state"][k], b["decoder_state"][k], atol=1e-6), k


def test_an_objective_alone_decides_its_rate_start_and_epoch_zero(xe_start, shapes_data, tmp_path, monkeypatch):
    """train.py asks the objective, never its name: a new objective with its own learning rate, start
    checkpoint and epoch-0 scoring trains with no change to the loop. Its rate 0 keeps the start's weights."""
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    start = xe_start / "models" / "best.pt"

    class Frozen(objectives.CrossEntropy):
        scores_start = True

        @staticmethod
        def learning_rate(cfg):
            return 0.0

        @staticmethod
        def start_from(workdir, cfg):
            return start

    monkeypatch.setitem(OBJECTIVES, "frozen", Frozen)
    work = tmp_path / "w"
    import shutil
    shutil.copytree(xe_start / "cache", work / "cache")
    spec, cfg = demo_configs(epochs=1, seed=0)
    cfg.objective, cfg.dev_images = "frozen", 20
    best = train(shapes_data, work, cfg, spec, ExtractConfig(device="cpu", num_workers=1))
    last = torch.load(work / "models" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [0, 1]           # the start was scored as epoch 0
    assert last["history"][1]["lr"] == 0.0 and last["train_config"]["init_from"] == str(start)
    begun = torch.load(start, weights_only=True)
    assert last["vocab"] == begun["vocab"]
    assert all(torch.equal(last["decoder_state"][k], v) for k, v in begun["decoder_state"].items())
    assert torch.load(best, weights_only=True)["epoch"] == 0           # nothing beat the unchanged start


def test_the_training_loop_never_names_an_objective():
    from pathlib import Path
    import captioning.training.train as loop
    source = Path(loop.__file__).read_text()
    assert "objective ==" not in source and "objective !=" not in source and '"scst"' not in source

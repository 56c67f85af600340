"""Training for real on the synthetic shapes: it learns, checkpoints are complete, resume is exact."""
import shutil

import pytest
import torch

from captioning.inference.captioner import Captioner
from captioning.data.datasets import load_dataset
from captioning.interfaces.demo import caption_is_right
from captioning.config import SearchConfig
from captioning.data.synthetic import shapes_truth, truth_for_image
from tests.helpers import copy_cache, run_training

def held_out_captions(best, data):
    captioner = Captioner.load(best, device="cpu")
    test = load_dataset(data).split("test")
    from captioning.features.images import load_image
    # Photo only: a mirrored shape is on the other side, and the captions say which side.
    results = captioner.caption_pil([load_image(r.image) for r in test], SearchConfig(beam_size=3, mirror=False))
    truth = shapes_truth(data)
    return [(r.captions[0], truth_for_image(truth, rec.image)) for r, rec in zip(results, test)]


def test_attention_decoder_learns_the_shapes(attention_model, shapes_data):
    _, best = attention_model
    ckpt = torch.load(best, weights_only=True)
    history = ckpt["history"]
    assert history[-1]["val_loss"] < 0.7 * history[0]["val_loss"]
    pairs = held_out_captions(best, shapes_data)
    right = sum(caption_is_right(c, t) for c, t in pairs) / len(pairs)
    assert right >= 0.5, pairs   # all three of colour, shape, position right; chance is about 1 in 48


def test_lstm_decoder_learns_colours_and_shapes(lstm_model, shapes_data):
    _, best = lstm_model
    history = torch.load(best, weights_only=True)["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    pairs = held_out_captions(best, shapes_data)
    right = sum(t["colour"] in c.split() and t["shape"] in c.split() for c, t in pairs) / len(pairs)
    # 17 held-out photos: the fraction moves in steps of 6%, and float rounding alone (fused or plain AdamW,
    # equal to 1e-7 a step) moves a 6-epoch run between 10 and 14 of them. Chance is about 1 in 48.
    assert right >= 0.5, pairs


def test_checkpoint_is_complete_and_plain(attention_model):
    workdir, best = attention_model
    ckpt = torch.load(best, weights_only=True)       # no pickle of arbitrary objects
    assert ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert ckpt["model_config"]["vocab_size"] == len(ckpt["vocab"])
    assert ckpt["encoder"]["name"] == "resnet18" and ckpt["encoder"]["weights"] is None
    assert {"train_loss", "val_loss", "BLEU-4", "CIDEr-D", "lr"} <= set(ckpt["history"][0])
    assert ckpt["best_score"] == max(h["CIDEr-D"] for h in ckpt["history"])
    for name in ("best.pt", "last.pt", "best.json", "last.json", "curves.png"):
        assert (workdir / "models" / name).exists(), name
    assert not list((workdir / "models").glob("*.tmp"))


def test_resume_continues_to_the_same_result(lstm_model, shapes_data, tmp_path):
    straight = copy_cache(lstm_model[0], tmp_path / "straight")
    run_training(straight, shapes_data, "lstm", epochs=3, hidden_dim=64, embed_dim=32)
    split = copy_cache(lstm_model[0], tmp_path / "split")
    run_training(split, shapes_data, "lstm", epochs=2, hidden_dim=64, embed_dim=32)

    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    from captioning.training.train import train
    spec, cfg = demo_configs(epochs=3)
    train(shapes_data, split, cfg, spec, ExtractConfig(device="cpu"), resume=True)

    a = torch.load(straight / "models" / "last.pt", weights_only=True)
    b = torch.load(split / "models" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], rel=1e-5)
    for k in a["decoder_state"]:
        assert torch.allclose(a["decoder_state"][k], b["decoder_state"][k], atol=1e-5), k


def test_flip_and_cosine_training_resumes_to_the_same_result(lstm_model, shapes_data, tmp_path, monkeypatch):
    """--flip (each epoch's own draw of mirror images) and --lr-schedule cosine resume exactly after a
    Ctrl-C, and the mirror features really are trained on (the losses differ from a run without them)."""
    import captioning.training.train as train_mod
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    from captioning.training.train import train

    def run(name, flip=True, resume=False):
        work = tmp_path / name
        if not work.exists():
            copy_cache(lstm_model[0], work)
        spec, cfg = demo_configs(epochs=2)
        cfg.model.decoder, cfg.model.hidden_dim, cfg.model.embed_dim = "lstm", 64, 32
        cfg.flip, cfg.lr_schedule = flip, "cosine"
        train(shapes_data, work, cfg, spec, ExtractConfig(device="cpu"), resume=resume)
        return torch.load(work / "models" / "last.pt", weights_only=True)

    straight, plain = run("straight"), run("plain", flip=False)
    real_epoch = train_mod.train_epoch
    monkeypatch.setattr(train_mod, "train_epoch",
                        lambda r, epoch: (_ for _ in ()).throw(KeyboardInterrupt) if epoch == 2 else real_epoch(r, epoch))
    run("split")
    monkeypatch.setattr(train_mod, "train_epoch", real_epoch)
    split = run("split", resume=True)
    assert [h["epoch"] for h in split["history"]] == [1, 2]
    for ha, hb in zip(straight["history"], split["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["lr"] == pytest.approx(hb["lr"])
    for k in straight["decoder_state"]:
        assert torch.allclose(straight["decoder_state"][k], split["decoder_state"][k], atol=1e-5), k
    assert straight["history"][0]["train_loss"] != pytest.approx(plain["history"][0]["train_loss"], rel=1e-4)
    # cosine: the rate for the next epoch, halfway down after 1 of 2 epochs, 0 after the last
    assert [h["lr"] for h in straight["history"]] == pytest.approx([cfg_lr() / 2, 0.0])


def cfg_lr():
    from captioning.interfaces.demo import demo_configs
    return demo_configs()[1].lr


def test_cosine_schedule_falls_from_the_full_rate_towards_zero():
    from captioning.config import TrainConfig
    from captioning.training.optim import make_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, lrs = make_scheduler(opt, TrainConfig(epochs=4, lr_schedule="cosine")), []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5)])


def test_ctrl_c_keeps_the_finished_epochs(lstm_model, shapes_data, tmp_path, monkeypatch):
    import captioning.training.train as train_mod
    workdir = copy_cache(lstm_model[0], tmp_path / "w")
    real_epoch, calls = train_mod.train_epoch, []

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_epoch", interrupted_on_second)
    best = run_training(workdir, shapes_data, "lstm", epochs=4, hidden_dim=64, embed_dim=32)
    assert best == workdir / "models" / "best.pt"
    assert torch.load(workdir / "models" / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path, shapes_data):
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    from captioning.training.train import train
    from captioning.utils import CaptioningError
    spec, cfg = demo_configs(epochs=1)
    with pytest.raises(CaptioningError, match="Nothing to resume"):
        train(shapes_data, tmp_path, cfg, spec, ExtractConfig(device="cpu"), resume=True)


def test_fused_optimizer_steps_like_the_plain_one_and_shares_its_state():
    """train.py's optimizer (fused AdamW where torch has it) takes the plain AdamW's steps, and the state of
    either resumes the other, so checkpoints from before it still continue."""
    from captioning.config import ModelConfig
    from captioning.models.decoders import build_decoder
    from captioning.config import TrainConfig
    from captioning.training.optim import make_optimizer
    cfg = TrainConfig()
    torch.manual_seed(0)
    a = build_decoder(ModelConfig(decoder="attention", vocab_size=50, feat_dim=16, embed_dim=8, hidden_dim=16,
                                  attention_dim=8, context_dim=8))
    b = build_decoder(a.cfg)
    b.load_state_dict(a.state_dict())
    fast = make_optimizer(a.parameters(), cfg)
    plain = torch.optim.AdamW(b.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def steps(n):
        for _ in range(n):
            grads = [torch.randn_like(p) for p in a.parameters()]
            for model, opt in ((a, fast), (b, plain)):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                opt.step()

    before = [p.detach().clone() for p in a.parameters()]
    steps(3)
    for p, q, p0 in zip(a.parameters(), b.parameters(), before):
        assert torch.allclose(p, q, atol=1e-6)
        assert not torch.equal(p, p0)              # it did step
    # Swap the states: the plain one resumes the fused one's and the other way round.
    fast_state, plain_state = fast.state_dict(), plain.state_dict()
    fast.load_state_dict(plain_state)
    plain.load_state_dict(fast_state)
    steps(2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_optimizer_is_plain_adamw_where_torch_has_no_fused_kernel(monkeypatch):
    """On a torch or device without the fused kernel (AdamW(fused=True) raises), training still gets an AdamW
    over all the parameters, with the configured learning rate."""
    from captioning.config import TrainConfig
    from captioning.training.optim import make_optimizer
    real = torch.optim.AdamW

    def without_fused(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused)
    cfg = TrainConfig()
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    optimizer = make_optimizer(iter(params), cfg)         # a generator, as model.parameters() is
    assert optimizer.param_groups[0]["lr"] == cfg.lr
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in params:
        assert torch.allclose(p, torch.full_like(p, 1 - cfg.lr * (1 + cfg.weight_decay)), atol=1e-6)


def test_a_run_saved_before_the_schedule_and_flip_options_resumes_as_it_started(lstm_model, tmp_path):
    """last.pt files written before --lr-schedule and --flip existed hold a plateau scheduler's state and
    were trained without mirror images: --resume goes on that way, whatever today's defaults are."""
    from captioning.config import TrainConfig
    from captioning.features.encoders import EncoderSpec
    from captioning.training.train import starting_point
    ckpt = torch.load(lstm_model[0] / "models" / "last.pt", weights_only=True)
    for key in ("lr_schedule", "flip"):
        ckpt["train_config"].pop(key)
    (tmp_path / "models").mkdir()
    torch.save(ckpt, tmp_path / "models" / "last.pt")
    _, resuming, cfg, _ = starting_point(tmp_path, TrainConfig(), EncoderSpec(), resume=True)
    assert resuming and cfg.lr_schedule == "plateau" and cfg.flip is False
    assert TrainConfig().lr_schedule == "cosine" and TrainConfig().flip   # the defaults for new runs

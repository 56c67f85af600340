"""Each setting is declared once (config.py): the command line and the menu take their options and
defaults from the dataclasses, and nothing else restates them."""
from dataclasses import fields

import pytest

from captioning.interfaces import menu
from captioning.interfaces.cli import build_parser
from captioning.config import ExtractConfig, ModelConfig, SearchConfig, TrainConfig, default_of, from_args, options

# Filled in by the code, or given by a common option (--seed, --device): not options of their own.
INTERNAL = {ModelConfig: {"vocab_size", "feat_dim"}, SearchConfig: {"block_trigrams", "seed"},
            TrainConfig: {"seed", "model"},
            ExtractConfig: {"channels_last", "threads", "decode_threads", "calibrate", "device", "flush_every_s", "mirror"}}
COMMANDS = {"train": [TrainConfig, ModelConfig, ExtractConfig], "extract": [ExtractConfig],
            "caption": [SearchConfig], "evaluate": [SearchConfig]}
NOT_IN = {("evaluate", "num_captions"), ("evaluate", "diversity"), ("evaluate", "top_p")}   # scores caption 1


def subparser(name):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("cls", list(INTERNAL))
def test_every_setting_is_an_option_or_internal(cls):
    exposed = {f.name for f, _, _ in options(cls)}
    assert exposed | INTERNAL[cls] == {f.name for f in fields(cls)}
    assert not exposed & INTERNAL[cls]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_option_defaults_to_its_field(command):
    p = subparser(command)
    actions = {}
    for a in p._actions:   # extract's --batch-size is another name for --extract-batch-size: same dest
        actions.setdefault(a.dest, []).append(a)
    for cls in COMMANDS[command]:
        for f, flag, dest in options(cls):
            if (command, f.name) in NOT_IN:
                assert dest not in actions
                continue
            [action] = [a for a in actions[dest] if flag in a.option_strings]
            assert all(a.default == default_of(f) for a in actions[dest]), (command, flag)


def test_parsed_options_build_the_configs():
    args = build_parser().parse_args(["train", "--data", "d", "--epochs", "3", "--decoder", "updown",
                                      "--objective", "scst", "--scst-lr", "1e-5", "--extract-batch-size", "8"])
    cfg = from_args(TrainConfig, args, model=from_args(ModelConfig, args))
    assert (cfg.epochs, cfg.model.decoder, cfg.objective, cfg.scst_lr) == (3, "updown", "scst", 1e-5)
    assert cfg.lr == TrainConfig.lr and cfg.model.hidden_dim == ModelConfig.hidden_dim
    assert from_args(ExtractConfig, args).batch_size == 8


def test_the_menu_offers_the_same_defaults_and_decoders():
    from captioning.models.decoders import DECODERS
    assert menu.DECODER_CHOICES == list(DECODERS)
    assert (menu.TRAIN.epochs, menu.TRAIN.batch_size, menu.TRAIN.model.decoder) == \
        (TrainConfig.epochs, TrainConfig.batch_size, ModelConfig().decoder)

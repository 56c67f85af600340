"""The menu, driven by scripted standard input: through the real entry script in a subprocess, and in-process
where kagglehub must be patched. Every answer a person can get wrong is asked again; every failure is one line
and the menu comes back; Enter at a path prompt goes back; end of input quits cleanly."""
import io
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from captioning.interfaces import cli as cli_module
from captioning.interfaces import menu
from captioning.training.checkpoint import read_summary
from tests.helpers import cli

OPTION_LABELS = [label for _, label in menu.OPTIONS]
BAD_CHOICE = "Please type a number from 1 to 8."


def run_menu(workdir, answers, cwd=None, env=None):
    """The menu on `workdir` with `answers` (one per line) as standard input; stdin ends after the last one."""
    return cli("--workdir", workdir, input="".join(f"{a}\n" for a in answers), cwd=cwd or workdir,
               env={"COLUMNS": "1000", **(env or {})})


def screens(stdout):
    """How many times the main menu asked for a choice."""
    return stdout.count("Choose:")


@pytest.fixture
def workdir_with_model(attention_model, tmp_path):
    """A fresh workdir holding a copy of the fixture's best model, where the menu looks for it."""
    _, best = attention_model
    workdir = tmp_path / "work"
    (workdir / "models").mkdir(parents=True)
    shutil.copy(best, workdir / "models" / "best.pt")
    shutil.copy(best.with_suffix(".json"), workdir / "models" / "best.json")
    return workdir


# ---- the first screen ----------------------------------------------------------------------------------

def test_first_screen_in_an_empty_workdir(tmp_path):
    r = run_menu(tmp_path, ["8"], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0
    assert "image-captioning" in r.stdout
    for label in OPTION_LABELS:
        assert label in r.stdout
    from captioning.training.checkpoint import BUILTIN
    # No model of the user's: the built-in one is shown, said to be built in (or "none yet" without one).
    assert ("built-in Flickr8k model" if BUILTIN.exists() else "none yet") in r.stdout
    assert "none chosen" in r.stdout
    assert r.stdout.rstrip().endswith("Bye.")
    assert not re.search(r"\|\s+torch(\.|$)", r.stderr, re.MULTILINE)  # the first screen imports no torch


def test_first_screen_describes_the_trained_model(workdir_with_model):
    summary = read_summary(workdir_with_model / "models" / "best.pt")
    r = run_menu(workdir_with_model, ["8"])
    assert r.returncode == 0
    assert "none yet" not in r.stdout
    assert f"{summary['decoder']} decoder on {summary['encoder']}" in r.stdout
    assert f"vocabulary {summary['vocab_size']:,} words" in r.stdout
    assert str(workdir_with_model / "models" / "best.pt") in r.stdout


# ---- bad answers are asked again -----------------------------------------------------------------------

def test_bad_menu_choices_are_asked_again(tmp_path):
    r = run_menu(tmp_path, ["abc", "0", "99", "", "  ", "8"])
    assert r.returncode == 0
    assert r.stdout.count(BAD_CHOICE) == 5
    assert screens(r.stdout) == 6
    assert "Bye." in r.stdout and "Traceback" not in r.stderr


def test_train_prompts_ask_again_for_bad_numbers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    answers = ["3", str(data),
               "",                                    # encoder: the default
               "transformer", "attention",            # decoder: not a choice, then one
               "ten", "-1", "0", "100000000000", "2.5", "5",        # epochs
               "abc", "0", "-8", "99999999"]          # batch size, then the input ends
    r = run_menu(tmp_path, answers)
    assert r.returncode == 0
    assert "Traceback" not in r.stderr
    from captioning.config import TrainConfig
    from captioning.models.decoders import DECODERS
    assert r.stdout.count(f"Please type one of: {', '.join(DECODERS)}.") == 1
    assert r.stdout.count(f"Epochs [{TrainConfig.epochs}]:") == 6
    assert r.stdout.count(f"Batch size [{TrainConfig.batch_size}]:") == 5
    assert r.stdout.count("Please type a whole number from 1 to 1,000.") == 2      # "ten", "2.5"
    assert r.stdout.count("out of range: type a number from 1 to 1,000.") == 3     # -1, 0, huge
    assert r.stdout.count("Please type a whole number from 1 to 4,096.") == 1      # "abc"
    assert r.stdout.count("out of range: type a number from 1 to 4,096.") == 3     # 0, -8, huge
    # The input ended at the next prompt (or at the menu): the menu says goodbye, nothing was trained.
    assert r.stdout.rstrip().endswith("Bye.")
    assert not (tmp_path / "models").exists()


# ---- actions -------------------------------------------------------------------------------------------

def test_caption_a_quoted_path_with_spaces(workdir_with_model, shapes_data, tmp_path):
    folder = tmp_path / "my pictures"
    folder.mkdir()
    photo = folder / "my photo.jpg"
    shutil.copy(sorted((shapes_data / "Images").glob("*.jpg"))[0], photo)
    here = tmp_path / "here"
    here.mkdir()
    # Option 4, the path as a terminal's drag-and-drop gives it, beam size default, no attention maps, quit.
    r = run_menu(workdir_with_model, ["4", f'"{photo}"', "", "n", "8"], cwd=here)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stdout and "Traceback" not in r.stderr
    # The image (after the last prompt: piped input is not echoed), its caption, where the PNG went.
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(str(photo)))
    assert len(lines[at + 1].split()) >= 2
    after = [line.strip() for line in lines[at + 2:] if not line.strip().startswith("tags:")]   # keywords, if any
    assert after[0] == "saved captioned_image.png"
    assert (here / "captioned_image.png").read_bytes()[:4] == b"\x89PNG"
    assert screens(r.stdout) == 2 and r.stdout.rstrip().endswith("Bye.")


def test_enter_at_a_path_prompt_goes_back_to_the_menu(tmp_path):
    r = run_menu(tmp_path, ["4", "", "2", "", "8"])   # caption: Enter; extract (no dataset yet): Enter
    assert r.returncode == 0
    assert r.stdout.count("(Enter to go back):") == 2
    assert screens(r.stdout) == 3
    assert "error" not in r.stdout and r.stderr == ""


def test_a_path_that_does_not_exist_is_asked_again(tmp_path):
    r = run_menu(tmp_path, ["4", str(tmp_path / "nowhere.jpg"), "", "8"])
    assert r.returncode == 0
    assert r.stdout.count("Not found:") == 1
    assert screens(r.stdout) == 2


@pytest.mark.parametrize("answers", [[], ["abc"]])
def test_end_of_input_at_the_menu_quits_cleanly(tmp_path, answers):
    r = run_menu(tmp_path, answers)
    assert r.returncode == 0
    assert r.stdout.rstrip().endswith("Bye.")
    assert r.stderr == ""


def test_a_failing_action_is_one_line_and_the_menu_comes_back(tmp_path):
    not_a_dataset = tmp_path / "holiday photos"
    not_a_dataset.mkdir()
    (not_a_dataset / "notes.txt").write_text("no captions here")
    r = run_menu(tmp_path, ["1", "local", str(not_a_dataset), "8"])
    assert r.returncode == 0
    errors = [line for line in r.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No captioning dataset found" in errors[0], r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert screens(r.stdout) == 2 and r.stdout.rstrip().endswith("Bye.")


# ---- in-process: download with kagglehub patched -------------------------------------------------------

@pytest.fixture
def menu_in_process(monkeypatch, capsys):
    """Run main() with no command (the menu) here, answers on sys.stdin → (exit code, stdout)."""
    import os
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # main() sets it when unset
    monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))     # no wrapping of long lines

    def run(workdir, answers):
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{a}\n" for a in answers)))
        code = cli_module.main(["--workdir", str(workdir)])
        return code, capsys.readouterr().out
    return run


def test_download_offline_is_one_sentence_and_the_menu_continues(tmp_path, monkeypatch, menu_in_process):
    import kagglehub
    import requests

    def offline(handle, path=None, *, force_download=False, output_dir=None):
        raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='www.kaggle.com'): Max retries")
    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle-cache"))  # empty: no cached copy either

    code, out = menu_in_process(tmp_path, ["1", "", "8"])   # download the default dataset, then quit
    assert code == 0
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "Could not reach Kaggle" in errors[0] and "internet connection" in errors[0]
    assert "Traceback" not in out and "HTTPSConnectionPool" not in out
    assert screens(out) == 2 and out.rstrip().endswith("Bye.")
    assert "none chosen" in out.split("Choose:")[1]  # the failed download was not remembered as the dataset


def test_caption_offers_folder_outputs(monkeypatch, tmp_path):
    answers = iter(["csv, txt, bogus", "csv,txt,metadata", "y"])
    monkeypatch.setattr(menu, "ask", lambda prompt, default=None: next(answers))
    monkeypatch.setattr(menu, "ask_choice", lambda prompt, choices, default: next(answers))
    assert menu.folder_outputs(tmp_path / "photo.jpg") == []          # one photo: nothing to ask
    assert menu.folder_outputs(tmp_path) == ["--csv=captions.csv", "--txt", "--write-metadata", "--no-png",
                                             "--recursive"]


def test_quit_is_the_last_option_and_the_readme_numbers_them_alike():
    assert menu.OPTIONS[-1][1].startswith("Quit")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key, label in menu.OPTIONS:
        row = "Quit" if label.startswith("Quit") else "Web dashboard" if "dashboard" in label else None
        if row:
            assert f"| {key} {row} |" in readme


@pytest.mark.parametrize("answer, width", [("", menu.SearchConfig.rerank_pool), ("3", 3)])
def test_caption_asks_the_width_the_search_uses_and_passes_it_as_beam_and_pool(tmp_path, monkeypatch, answer,
                                                                                  width):
    from captioning.config import SearchConfig
    cfg = SearchConfig()
    assert cfg.rerank and menu.SEARCH_WIDTH == max(cfg.beam_size, cfg.rerank_pool)   # the default search's width
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"")
    asked, ran = [], []
    answers = iter([str(photo), answer, "n"])

    def fake_ask(prompt, default=None):
        asked.append((prompt, default))
        a = next(answers)
        return a if a else str(default)
    monkeypatch.setattr(menu, "ask", fake_ask)
    args = type("Args", (), {"workdir": str(tmp_path), "device": "cpu", "seed": 0})()
    menu.do_caption(menu.MenuState(args, ran.append))
    assert asked[1] == ("Beam width (1 = greedy; with re-ranking also the candidates it chooses among)",
                        menu.SEARCH_WIDTH)
    assert f"--beam-size={width}" in ran[0] and f"--rerank-pool={width}" in ran[0]

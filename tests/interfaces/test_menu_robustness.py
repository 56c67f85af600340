"""The menu under Ctrl-C and end of input, at every kind of prompt and during work, with its output closed
and with the GPU out of memory: always one line or a calm message, and the menu comes back. A real SIGINT
to the entry script in a subprocess, and scripted answers in this process."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
from rich.console import Console

from captioning.interfaces import cli as cli_module
from captioning.interfaces import menu
from tests.helpers import ENTRY, ENV, cuda_oom, Proc

# ---- the menu: Ctrl-C and end of input -----------------------------------------------------------------

def test_ctrl_c_at_a_prompt_returns_to_the_menu_and_at_the_menu_quits(tmp_path):
    """A real SIGINT to the menu process while it waits at an option's prompt, then at the main menu."""
    run = Proc([ENTRY, "--workdir", tmp_path], cwd=tmp_path, stdin=True)
    run.wait_for(lambda: run.out.count("Choose") == 1, timeout=30, what="the menu")
    run.send("4\n")
    run.wait_for(lambda: "Image file or folder" in run.out, timeout=30, what="the path prompt")
    run.p.send_signal(signal.SIGINT)
    run.wait_for(lambda: run.out.count("Choose") == 2, timeout=30, what="the menu again")
    assert "Cancelled; back to the menu." in run.out
    run.send("3\n")                                   # train: its first prompt asks for the dataset folder
    run.wait_for(lambda: "Dataset folder" in run.out, timeout=30, what="the dataset prompt")
    run.p.send_signal(signal.SIGINT)
    run.wait_for(lambda: run.out.count("Choose") == 3, timeout=30, what="the menu a third time")
    run.p.send_signal(signal.SIGINT)                  # Ctrl-C at the menu itself: goodbye
    assert run.finish(30) == 0
    assert run.out.rstrip().endswith("Bye.") and run.out.count("Cancelled; back to the menu.") == 2
    assert run.err == "" and "Traceback" not in run.out


class Script:
    """Answers for the menu's prompts; KeyboardInterrupt / EOFError entries are raised like Ctrl-C / Ctrl-D."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def input(self, prompt="", **kwargs):
        menu.out.print(prompt, end="")
        self.prompts.append(str(prompt))
        if not self.answers:
            raise EOFError
        answer = self.answers.pop(0)
        if isinstance(answer, type) and issubclass(answer, BaseException):
            menu.out.print()
            raise answer
        return answer


@pytest.fixture
def scripted_menu(monkeypatch, capsys):
    """Run the menu in this process with scripted answers → (exit code, stdout)."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))

    def run(answers, *argv):
        monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
        script = Script(answers)
        monkeypatch.setattr(menu.out, "input", script.input)
        code = cli_module.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return run


@pytest.mark.parametrize("answers, prompt", [
    (["3", KeyboardInterrupt], "Dataset folder"),
    (["3", "{data}", KeyboardInterrupt], "Encoder"),
    (["3", "{data}", "", KeyboardInterrupt], "Decoder"),
    (["3", "{data}", "", "", "0", KeyboardInterrupt], "Epochs"),             # after a rejected answer, too
    (["3", "{data}", "", "", "", KeyboardInterrupt], "Batch size"),
    (["1", KeyboardInterrupt], "Download mini-coco"),
    (["4", KeyboardInterrupt], "Image file or folder"),
    (["5", "{data}", KeyboardInterrupt], "Split"),
])
def test_ctrl_c_at_every_kind_of_prompt_returns_to_the_menu(tiny, tmp_path, scripted_menu, answers, prompt):
    answers = [a.format(data=tiny.data) if isinstance(a, str) else a for a in answers]
    code, out = scripted_menu(answers + ["8"], "--workdir", tmp_path)
    assert code == 0
    cut = out.rindex(prompt)
    assert "Cancelled; back to the menu." in out[cut:]
    assert out.count("Choose") == 2 and out.rstrip().endswith("Bye.")
    assert "Traceback" not in out and "error" not in out


@pytest.mark.parametrize("stop", [KeyboardInterrupt, EOFError])
def test_ctrl_c_or_ctrl_d_at_the_main_menu_quits_cleanly(tmp_path, scripted_menu, stop):
    code, out = scripted_menu(["abc", stop], "--workdir", tmp_path)
    assert code == 0 and out.rstrip().endswith("Bye.") and "Traceback" not in out


@pytest.mark.parametrize("encoder", ["-h", "--help", "--data", "resnet 50"])
def test_any_encoder_answer_is_one_line_and_the_menu_goes_on(tiny, tmp_path, scripted_menu, encoder):
    """Menu answers reach the CLI's parser: one that looks like an option must not end the menu with a usage."""
    dash = tmp_path / "-data"                      # a folder whose name starts with a dash, too
    shutil.copytree(tiny.data, dash)
    code, out = scripted_menu(["2", str(dash), encoder, "8"], "--workdir", tmp_path)
    assert code == 0 and "usage:" not in out and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert f"Unknown encoder '{encoder}'" in line
    assert out.count("Choose") == 2 and out.rstrip().endswith("Bye.")


def test_ctrl_c_during_work_returns_to_the_menu(tiny, tmp_path, scripted_menu, monkeypatch):
    import captioning.features.prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_module, "prepare", interrupted)   # e.g. during the feature extraction
    code, out = scripted_menu(["2", str(tiny.data), "", "8"], "--workdir", tmp_path)
    assert code == 0 and "Cancelled; back to the menu." in out and out.count("Choose") == 2


def test_menu_errors_are_one_line_unless_debug(tiny, tmp_path, scripted_menu, monkeypatch):
    import captioning.features.prepare as prepare_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nmore detail")
    monkeypatch.setattr(prepare_module, "prepare", bug)
    code, out = scripted_menu(["2", str(tiny.data), "", "8"], "--workdir", tmp_path)
    assert code == 0 and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert "ZeroDivisionError: division by zero" in line and "--debug" in line and "more detail" not in out
    code, out = scripted_menu(["2", str(tiny.data), "", "8"], "--workdir", tmp_path, "--debug")
    assert code == 0 and "Traceback" in out and out.count("Choose") == 2


def test_menu_whose_output_is_closed_exits_quietly(tmp_path):
    """stdout closed under the tool (a pager quit early, `| head`): no BrokenPipeError trace on stderr."""
    p = subprocess.Popen([sys.executable, str(ENTRY), "--workdir", str(tmp_path)], cwd=tmp_path, env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    _, err = p.communicate(b"7\n", timeout=60)
    assert err.decode() == ""


def test_gpu_out_of_memory_in_the_menu_suggests_a_smaller_batch(tiny, tmp_path, monkeypatch, scripted_menu):
    import captioning.training.train as train_module
    monkeypatch.setattr(train_module, "train", cuda_oom)    # the menu's default encoder needs ImageNet weights
    code, out = scripted_menu(["3", str(tiny.data), "", "", "", "", "8"], "--workdir", tmp_path)
    assert code == 0 and "Traceback" not in out
    [line] = [l for l in out.splitlines() if "error:" in l]
    assert "out of memory" in line and "smaller batch size" in line and out.count("Choose") == 2

"""The interactive menu: a title panel, the model's status, numbered options, prompts with defaults.

Every option returns to the menu. A bad answer is re-asked; a failure is one sentence; Ctrl-C at a
prompt or during work comes back here; Ctrl-C or end of input at the menu itself quits.
The first screen imports no torch, so it appears at once.
"""
import json
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from captioning.training.checkpoint import BUILTIN, describe, find_model, read_summary
from captioning.config import ModelConfig, SearchConfig, TrainConfig
from captioning.utils import CaptioningError, atomic_write_json, clean_user_path, failure_message

out = Console(highlight=False)

OPTIONS = [("1", "Download a dataset (Kaggle) or choose a local one"), ("2", "Extract image features"),
           ("3", "Train a caption model"), ("4", "Caption images"), ("5", "Evaluate the model"),
           ("6", "Quick demo (offline, about two minutes)"),
           ("7", "Open the web dashboard in your browser (Ctrl-C comes back here)"), ("8", "Quit (also q)")]


class Back(Exception):
    """The user cancelled this option (empty answer where nothing is the default)."""


# --- prompts ---------------------------------------------------------------------------------------

def ask(prompt, default=None):
    hint = f" [dim]\\[{escape(str(default))}][/]" if default not in (None, "") else ""
    answer = out.input(f"{prompt}{hint}: ").strip()
    return answer if answer else ("" if default is None else str(default))


def ask_int(prompt, default, lo=1, hi=100_000):
    while True:
        answer = ask(prompt, default)
        try:
            value = int(answer)
        except ValueError:
            out.print(f"[red]Please type a whole number from {lo} to {hi:,}.[/]")
            continue
        if lo <= value <= hi:
            return value
        out.print(f"[red]{value} is out of range: type a number from {lo} to {hi:,}.[/]")


def ask_choice(prompt, choices, default):
    while True:
        answer = ask(f"{prompt} ({'/'.join(choices)})", default).lower()
        if answer in choices:
            return answer
        out.print(f"[red]Please type one of: {', '.join(choices)}.[/]")


def ask_path(prompt, default=None, want="any"):
    """A path typed or dragged in (quotes, spaces, ~ are fine). Empty answer with no default: back."""
    while True:
        answer = ask(prompt + " (Enter to go back)" if default is None else prompt, default)
        if not answer:
            raise Back()
        path = clean_user_path(answer)
        if not path.exists():
            out.print(f"[red]Not found: {escape(str(path))}[/]")
        elif want == "dir" and not path.is_dir():
            out.print(f"[red]That is a file; please give a folder: {escape(str(path))}[/]")
        else:
            return path


# The prompts' defaults and choices are the settings' own (config.py), as the command line's are.
TRAIN = TrainConfig()
SEARCH = SearchConfig()
# The default search re-ranks (models carry a consensus memory), and then searches max(--beam-size,
# --rerank-pool) wide: the menu asks for that width and passes it as both, so the width asked is the one used.
SEARCH_WIDTH = max(SEARCH.beam_size, SEARCH.rerank_pool) if SEARCH.rerank else SEARCH.beam_size
DECODER_CHOICES = next(f.metadata["choices"] for f in fields(ModelConfig) if f.name == "decoder")


# --- state -------------------------------------------------------------------------------------------

class MenuState:
    """What the menu remembers between runs: the dataset folder last used (in <workdir>/cache/menu.json)."""

    def __init__(self, args, run_cli):
        self.args = args
        self.run_cli = run_cli   # argv → runs that command with the CLI's own parser (cli.run_argv)
        self.file = Path(args.workdir) / "cache" / "menu.json"
        try:
            self.data = json.loads(self.file.read_text()).get("data")
        except (OSError, ValueError):
            self.data = None

    def remember(self, data):
        self.data = str(data)
        try:
            atomic_write_json(self.file, {"data": self.data})
        except OSError:
            pass  # remembering is a convenience; never fail an action for it


def model_status(workdir):
    try:
        path = find_model(workdir)
    except CaptioningError:
        return "[yellow]none yet[/] — train one (3) or run the demo (6)"
    summary = read_summary(path)
    where = escape(str(path))
    if path == BUILTIN:
        where = "the built-in Flickr8k model; train your own with (3)"
    return f"{escape(describe(summary))}\n[dim]{where}[/]" if summary else where


def header(state):
    out.print(Panel.fit("[bold]image-captioning[/]\nCaption photos with a CNN encoder and an LSTM decoder",
                        border_style="cyan"))
    info = Table.grid(padding=(0, 2))
    info.add_row("[bold]Model[/]", model_status(state.args.workdir))
    info.add_row("[bold]Dataset[/]", escape(state.data) if state.data else "[yellow]none chosen[/] (1)")
    out.print(info)
    menu = Table.grid(padding=(0, 2))
    for key, label in OPTIONS:
        menu.add_row(f"[bold cyan]{key}[/]", label)
    out.print(menu)


# --- actions -----------------------------------------------------------------------------------------

def dataset_folder(state):
    return ask_path("Dataset folder", state.data, want="dir")


def do_download(state):
    from captioning.data.download import download_dataset
    choice = ask_choice("Download mini-coco (default), flickr8k, or use a local folder", ["mini-coco", "flickr8k",
                                                                                          "local"], "mini-coco")
    if choice == "local":
        from captioning.data.datasets import load_dataset
        path = ask_path("Dataset folder", want="dir")
        dataset = load_dataset(path)
        out.print(f"Found a {dataset.layout} dataset with {len(dataset.records):,} images.")
    else:
        path = download_dataset(choice)
        out.print(f"Dataset ready in: {escape(str(path))}")
    state.remember(path)


def run_command(state, argv):
    """Run a CLI command with the menu's answers: one parser, one set of defaults, the commands' own code."""
    common = [f"--workdir={state.args.workdir}", f"--device={state.args.device}", f"--seed={state.args.seed}"]
    state.run_cli([*argv[:1], *common, *map(str, argv[1:])])


def do_extract(state):
    data = dataset_folder(state)
    encoder = ask("Encoder (resnet18/34/50/101/152, mobilenet_v2, ...)", "resnet50")
    state.remember(data)
    # "--opt=value": an answer such as "-h" stays a value, not an option.
    run_command(state, ["extract", f"--data={data}", f"--encoder={encoder}"])


def do_train(state):
    data = dataset_folder(state)
    encoder = ask("Encoder (resnet18/34/50/101/152, mobilenet_v2, ...)", "resnet50")
    decoder = ask_choice("Decoder", DECODER_CHOICES, TRAIN.model.decoder)
    epochs = ask_int("Epochs", TRAIN.epochs, 1, 1000)
    batch = ask_int("Batch size", TRAIN.batch_size, 1, 4096)
    resume = []
    if (Path(state.args.workdir) / "models" / "last.pt").exists():
        if ask_choice("A previous run exists. Continue it (y) or start over (n)", ["y", "n"], "y") == "y":
            resume = ["--resume"]
    state.remember(data)
    run_command(state, ["train", f"--data={data}", f"--encoder={encoder}", f"--decoder={decoder}",
                        f"--epochs={epochs}", f"--batch-size={batch}", *resume])


def ask_search_width():
    """The search's width as --beam-size and --rerank-pool (see SEARCH_WIDTH)."""
    width = ask_int("Beam width (1 = greedy; with re-ranking also the candidates it chooses among)",
                    SEARCH_WIDTH, 1, 20)
    return [f"--beam-size={width}", f"--rerank-pool={width}"]


def do_caption(state):
    path = ask_path("Image file or folder")
    search = ask_search_width()
    attention = []
    summary = read_summary(find_model(state.args.workdir))
    if summary and summary.get("attention", summary.get("decoder") == "attention"):   # older summaries lack it
        if ask_choice("Also draw the attention maps", ["y", "n"], "n") == "y":
            attention = ["--attention"]
    run_command(state, ["caption", *search, *attention, *folder_outputs(path), "--", path])


FOLDER_OUTPUTS = {"png": [], "csv": ["--csv=captions.csv"], "jsonl": ["--jsonl=captions.jsonl"], "txt": ["--txt"],
                  "xmp": ["--xmp"], "metadata": ["--write-metadata"]}


def folder_outputs(path):
    """For a folder: which outputs (as the command's flags), and whether to go into subfolders."""
    if not path.is_dir():
        return []
    while True:
        answer = ask(f"Outputs, comma-separated ({', '.join(FOLDER_OUTPUTS)}; csv/jsonl go to the current folder)",
                     "png")
        chosen = [w.strip().lower() for w in answer.split(",") if w.strip()]
        if chosen and all(w in FOLDER_OUTPUTS for w in chosen):
            break
        out.print(f"[red]Please name some of: {', '.join(FOLDER_OUTPUTS)}.[/]")
    flags = [f for w in chosen for f in FOLDER_OUTPUTS[w]] + ([] if "png" in chosen else ["--no-png"])
    if ask_choice("Include subfolders", ["y", "n"], "n") == "y":
        flags.append("--recursive")
    return flags


def do_evaluate(state):
    data = dataset_folder(state)
    split = ask_choice("Split", ["val", "test"], "test")
    search = ask_search_width()
    run_command(state, ["evaluate", f"--data={data}", f"--split={split}", *search])


def do_dashboard(state):
    run_command(state, ["dashboard"])   # runs until Ctrl-C, which brings the menu back


def do_demo(state):
    from captioning.interfaces.demo import run_demo
    run_demo(state.args.workdir, device=state.args.device, seed=state.args.seed)


ACTIONS = {"1": do_download, "2": do_extract, "3": do_train, "4": do_caption, "5": do_evaluate, "6": do_demo,
           "7": do_dashboard}


def run_menu(args, run_cli):
    state = MenuState(args, run_cli)
    while True:
        try:
            header(state)
            choice = ask("Choose", "").lower()
        except (KeyboardInterrupt, EOFError):
            out.print("\nBye.")
            return
        if choice in ("8", "q", "quit", "exit"):
            out.print("Bye.")
            return
        if choice not in ACTIONS:
            out.print(f"[red]Please type a number from 1 to {len(OPTIONS)}.[/]\n")
            continue
        try:
            ACTIONS[choice](state)
        except Back:
            pass
        except KeyboardInterrupt:
            out.print("\n[yellow]Cancelled; back to the menu.[/]")
        except EOFError:
            out.print("\nBye.")
            return
        except Exception as e:  # the menu must survive anything; --debug shows the details
            if args.debug:
                out.print_exception()
            out.print(f"[red]error:[/] {escape(failure_message(e, batch_option='batch size'))}")
        out.print()

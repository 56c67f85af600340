"""Command-line subcommands. Each parses its options and calls one pipeline stage.

torch is imported only inside the commands, so `--help` and the menu answer at once.
Exit codes: 0 success, 2 usage error (argparse), 1 any other failure — with one line on stderr.
"""
import argparse
import importlib.util
import json
import os
import sys
import warnings

from rich.markup import escape

from captioning.config import (ExportConfig, ExtractConfig, ModelConfig, SearchConfig, TrainConfig, add_options, from_args, positive_float,
                     positive_int)
from captioning.interfaces.launcher import PASSWORD_ENV, cmd_dashboard
from captioning.utils import CaptioningError, clean_user_path, console, failure_message, printable


def common_options(defaults=True):
    """The options every command takes, before or after its name. The commands' copy has no defaults
    (argparse.SUPPRESS): a subcommand's default would otherwise overwrite a value given before the command."""
    def d(value):
        return value if defaults else argparse.SUPPRESS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=d("auto"), choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run (default: CUDA or MPS when present, else CPU)")
    common.add_argument("--seed", type=int, default=d(0), help="random seed (default 0)")
    common.add_argument("--workdir", default=d("."), help="where models/ and cache/ live (default: current folder)")
    common.add_argument("--debug", action="store_true", default=d(False), help="show full tracebacks (for bug reports)")
    return common


def encoder_options(p, default="resnet50"):
    p.add_argument("--encoder", default=default, help=f"torchvision backbone (default {default}; e.g. resnet18, "
                   "resnet34, resnet101, resnet152, mobilenet_v2, efficientnet_b0)")
    p.add_argument("--encoder-weights", metavar="PATH", help="a local weights file instead of torchvision's download")
    add_options(p, ExtractConfig)


def search_options(p, skip=()):
    add_options(p, SearchConfig, skip)


def dist_option(p):
    p.add_argument("--dist-timeout", type=positive_float, default=1800, metavar="SECONDS", help="under torchrun: "
                   "how long a process waits for the others before the job stops (default 1800)")


def ensemble_option(p):
    p.add_argument("--ensemble", nargs="+", default=[], metavar="PATH", help="more checkpoints (same encoder "
                   "and vocabulary) whose word probabilities are averaged with --model's")


def library_options(p):
    """Folder runs (a photo library): the outputs beside or inside the photos, and resuming."""
    g = p.add_argument_group("photo libraries")
    g.add_argument("--recursive", action="store_true", help="every image under the folders (output names keep "
                   "the relative path)")
    g.add_argument("--no-png", dest="png", action="store_false", help="no captioned PNGs")
    g.add_argument("--csv", metavar="FILE", help="append image,caption,score,tags,confidence rows as "
                   "the run goes")
    g.add_argument("--jsonl", metavar="FILE", help="append one JSON object per image as the run goes")
    g.add_argument("--txt", action="store_true", help="a photo.txt caption sidecar beside each photo")
    g.add_argument("--xmp", action="store_true", help="a photo.xmp sidecar (dc:description, IPTC alt text)")
    g.add_argument("--write-metadata", action="store_true", help="the caption into each photo's own metadata "
                   "(JPEG/PNG/WebP/TIFF, pixels untouched; needs exiftool)")
    g.add_argument("--skip-existing", action="store_true", help="skip photos already in --csv/--jsonl (a rerun "
                   "does this anyway), or whose sidecars and PNG exist")


def dashboard_options(p):
    p.add_argument("--model", help="checkpoint to start with (default: models/best.pt in the workdir)")
    p.add_argument("--image", help="a photo or folder to show at start, without uploading")
    p.add_argument("--port", type=positive_int, default=8501, help="the local web port (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                   "computer only; 0.0.0.0 is every network it is on)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR", help="a folder whose photos the "
                   "page may read by path (repeatable); beyond this computer there is no path box without it")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="a further host name "
                   "browsers may reach the page by (repeatable; e.g. behind a proxy): others are refused, so that "
                   "no web page can reach it by pointing its own name at this computer")
    p.add_argument("--password", nargs="?", const=True, metavar="TEXT", help="ask visitors for this password "
                   f"first (no TEXT: typed at the terminal; or set {PASSWORD_ENV})")
    p.add_argument("--headless", action="store_true", help="do not open a browser (e.g. on a server)")
    p.add_argument("--no-segmentation", action="store_true", help="start with the segmentation view off")


def export_options(p):
    p.add_argument("--model", help="checkpoint to export (default: models/best.pt in the workdir)")
    p.add_argument("--output", required=True, help="where to write it, e.g. captioning/assets/default_model.pt "
                   "(a folder for --format onnx)")
    p.add_argument("--data", help="give the model the consensus memory of this dataset's training photos (the one it "
                   "was trained on), for models trained before checkpoints carried it")
    add_options(p, ExportConfig)
    ensemble_option(p)


def build_parser():
    common = common_options(defaults=False)
    parser = argparse.ArgumentParser(prog="image_captioning.py", parents=[common_options()],
                                     description="Caption photos with a CNN encoder and an LSTM decoder. "
                                                 "Run with no command for the menu.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("download", parents=[common], help="download a captioning dataset from Kaggle")
    p.add_argument("--dataset", default="mini-coco", choices=["mini-coco", "flickr8k"])
    p.add_argument("--force", action="store_true", help="download again even when cached")

    p = sub.add_parser("extract", parents=[common], help="compute and cache image features for a dataset")
    p.add_argument("--data", required=True, help="dataset folder")
    encoder_options(p)
    p.add_argument("--batch-size", type=positive_int, dest="extract_batch_size", help="same as --extract-batch-size")
    dist_option(p)

    p = sub.add_parser("train", parents=[common], help="train a caption decoder (extracts features first)")
    p.add_argument("--data", required=True, help="dataset folder")
    encoder_options(p)
    add_options(p, TrainConfig)
    add_options(p, ModelConfig)
    p.add_argument("--resume", action="store_true", help="continue from models/last.pt")
    dist_option(p)

    p = sub.add_parser("caption", parents=[common], help="caption images (files or folders)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", help="checkpoint path, or 'default' for the built-in model "
                   "(default: models/best.pt in the workdir)")
    ensemble_option(p)
    search_options(p)
    p.add_argument("--output", help="PNG path for one image (default captioned_image.png); a folder for several")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout, nothing else")
    p.add_argument("--attention", action="store_true", help="also draw where the model looked, word by word")
    library_options(p)

    p = sub.add_parser("evaluate", parents=[common], help="score a model on a dataset split")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--model", help="checkpoint path or 'default' (default: models/best.pt)")
    ensemble_option(p)
    search_options(p, skip=("num_captions", "diversity", "top_p"))   # evaluation scores the first caption
    p.add_argument("--output", help="where to write the JSON report (default models/eval_<split>.json)")

    export_options(sub.add_parser("export", parents=[common], help="a small caption-only copy of a model (fp16, "
                   "no optimizer state) with its evaluation reports, or an ONNX folder that needs no PyTorch"))

    p = sub.add_parser("demo", parents=[common], help="offline demo on generated shapes (about two minutes)")
    p.add_argument("--images", type=positive_int, default=600, help="images to generate (default 600)")
    p.add_argument("--epochs", type=positive_int, default=8)

    dashboard_options(sub.add_parser("dashboard", parents=[common], help="caption photos in the browser (a "
                                    "Streamlit app; pip install -r requirements-dashboard.txt)"))
    return parser


def cmd_download(args):
    from captioning.data.download import download_dataset
    path = download_dataset(args.dataset, force=args.force)
    console.print(f"Dataset ready in: {path}")
    print(path)


def _extract_config(args):
    return from_args(ExtractConfig, args, device=args.device)


def _spec(args):
    from captioning.features.encoders import EncoderSpec
    weights = str(clean_user_path(args.encoder_weights)) if args.encoder_weights else None
    return EncoderSpec(name=args.encoder, weights="DEFAULT", weights_path=weights)


def cmd_extract(args):
    from captioning.distributed import session
    from captioning.features.prepare import prepare
    with session(args.device, args.dist_timeout) as device:   # under torchrun: one slice per process
        args.device = device
        _, records, store = prepare(clean_user_path(args.data), args.workdir, _spec(args), _extract_config(args))
        console.print(f"Features for {len(store.paths):,} images in {store.folder}")


def cmd_train(args):
    from captioning.training.train import train
    cfg = from_args(TrainConfig, args, seed=args.seed, model=from_args(ModelConfig, args))
    from captioning.distributed import session
    with session(args.device, args.dist_timeout) as device:   # under torchrun: DistributedDataParallel
        args.device = device
        best = train(clean_user_path(args.data), args.workdir, cfg, _spec(args), _extract_config(args),
                     resume=args.resume)
        if best:
            console.print(f"Best model: {best}")


def _output_config(args):
    from captioning.results.outputs import OutputConfig
    return OutputConfig(png=args.png, output=args.output, csv=args.csv and str(clean_user_path(args.csv)),
                        jsonl=args.jsonl and str(clean_user_path(args.jsonl)), txt=args.txt, xmp=args.xmp,
                        metadata=args.write_metadata, skip_existing=args.skip_existing, attention=args.attention)


def cmd_caption(args):
    # Check the cheap things (images, model file, exiftool) before the seconds-long torch import.
    from captioning.training.checkpoint import find_model
    from captioning.results.metadata import INSTALL, exiftool_path
    from captioning.results.outputs import find_photos
    inputs = [clean_user_path(i) for i in args.images]
    photos = find_photos(inputs, args.recursive)
    if args.write_metadata and exiftool_path() is None:
        raise CaptioningError(f"--write-metadata {INSTALL}.")
    cfg = from_args(SearchConfig, args, seed=args.seed)
    model = find_model(args.workdir, args.model)
    if not model.exists():
        raise CaptioningError(f"Model file not found: {model}")
    if model.is_dir():   # an ONNX export: numpy and onnxruntime, no torch at all
        from captioning.deploy.onnx_runtime import OnnxCaptioner, caption_files
        if args.attention and importlib.util.find_spec("matplotlib") is None:
            raise CaptioningError("--attention draws its maps with matplotlib, which is not installed here: "
                                  "pip install matplotlib")
        captioner = OnnxCaptioner.load(model, ensemble=args.ensemble)
        results = caption_files(captioner, inputs, cfg, paths=photos, outputs=_output_config(args))
    else:
        from captioning.inference.captioner import Captioner, caption_files
        captioner = Captioner.load(args.model, args.workdir, args.device, args.ensemble)
        results = caption_files(captioner, inputs, cfg, paths=photos, outputs=_output_config(args),
                                workdir=args.workdir)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False))
        return
    # The results are the output: plain stdout (a file name may hold "[", which rich would read as markup),
    # control characters escaped (a file name may hold a newline or a terminal's escape sequence).
    for r in results:
        print(printable(r.image))
        for i, c in enumerate(r.captions, 1):
            print(printable(f"  {i}. {c}" if len(r.captions) > 1 else f"  {c}"))
        if r.tags:
            print(printable("  tags: " + ", ".join(f"{t['word']} ({t['score']:.2f})" for t in r.tags)))
        if r.png:
            print(printable(f"  saved {r.png}" + (f" and {r.attention_png}" if r.attention_png else "")))


def cmd_evaluate(args):
    from captioning.evaluation import EvalRun, evaluate_model
    run = EvalRun(clean_user_path(args.data), args.split, args.model, args.ensemble, args.workdir, args.device,
                  args.output)
    evaluate_model(run, from_args(SearchConfig, args, seed=args.seed))


def cmd_export(args):
    from captioning.training.checkpoint import export_model, find_model, report_path
    cfg = from_args(ExportConfig, args)
    if cfg.format == "onnx":
        if args.data:
            raise CaptioningError("--data works with .pt exports; export the .pt with it first, then the ONNX folder.")
        return export_onnx_folder(args)
    if args.ensemble:
        raise CaptioningError("--ensemble exports only with --format onnx (a .pt file holds one model).")
    source = find_model(args.workdir, args.model)
    reports = {split: report_path(source.parent, split) for split in ("val", "test")}
    reports = {split: path for split, path in reports.items() if path.exists()}
    memory = data_memory(clean_user_path(args.data), args.workdir, source, args.device) if args.data else None
    out = export_model(source, args.output, reports, memory)
    found = ", ".join(reports) if reports else "none found beside the model"
    console.print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB; evaluation reports: {found})")


def data_memory(data_dir, workdir, source, device):
    """The consensus memory of a dataset's training photos for the model at `source` (its encoder's
    features, extracted into the workdir when missing; its vocabulary)."""
    from captioning.training.checkpoint import load_checkpoint, memory_tensors
    from captioning.search.consensus import training_memory
    from captioning.features.encoders import EncoderSpec
    from captioning.config import ExtractConfig
    from captioning.features.prepare import prepare
    from captioning.data.vocab import Vocabulary
    ckpt = load_checkpoint(source)
    _, records, store = prepare(data_dir, workdir, EncoderSpec(**ckpt["encoder"]), ExtractConfig(device=device))
    train = [r for r in records if r.split == "train"]
    if not train:
        raise CaptioningError(f"{data_dir} has no training photos to build the memory from.")
    return memory_tensors(training_memory(train, store, Vocabulary(ckpt["vocab"])))


def export_onnx_folder(args):
    from captioning.inference.captioner import Captioner
    from captioning.deploy.onnx_export import export_onnx
    captioner = Captioner.load(args.model, args.workdir, "cpu", args.ensemble)
    if not isinstance(captioner, Captioner):
        raise CaptioningError(f"{captioner.source} is an ONNX export already; export the .pt model it came from.")
    folder = export_onnx(captioner, args.output)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
    console.print(f"Wrote the ONNX export {folder} ({size:.1f} MB); caption with it: "
                  f"python image_captioning.py caption PHOTO --model {folder}")


def cmd_demo(args):
    from captioning.interfaces.demo import run_demo
    run_demo(args.workdir, n_images=args.images, epochs=args.epochs, device=args.device, seed=args.seed)


COMMANDS = {"download": cmd_download, "extract": cmd_extract, "train": cmd_train, "caption": cmd_caption,
            "evaluate": cmd_evaluate, "export": cmd_export, "demo": cmd_demo,
            "dashboard": cmd_dashboard}


def run_guarded(fn, debug=False):
    """Run `fn`; turn any failure into one line on stderr and an exit code (1). Returns the code."""
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        console.print("Interrupted. Finished work is saved; run the same command again to continue.")
    except BrokenPipeError:
        # stdout went away (e.g. `caption --json | head`): nothing left to tell; keep Python's exit quiet too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    except Exception as e:  # never a bare traceback: one line, and --debug for the rest
        if debug:
            console.print_exception()
        console.print(f"[red]error:[/] {escape(printable(failure_message(e)))}")
    return 1


def clean_paths(args):
    """Paths as users give them (quotes from drag and drop, `~`) → plain paths; a workdir that is a file is refused."""
    for key in ("workdir", "output", "model"):
        value = getattr(args, key, None)
        if value and value != "default":
            setattr(args, key, str(clean_user_path(value)))
    if getattr(args, "ensemble", None):
        args.ensemble = [str(clean_user_path(p)) for p in args.ensemble]
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise CaptioningError(f"--workdir {args.workdir} is a file; it must be a folder (for models/ and cache/).")


def run_argv(argv):
    """Parse `argv` with this parser and run its command: how the menu runs what its answers describe."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse has said what was wrong; the menu must not end for it
        raise CaptioningError(f"The {argv[0]} command could not use these answers (see above).") from None
    COMMANDS[args.command](args)   # a command's own SystemExit (the dashboard stopped by a signal) ends the menu


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # DataLoader workers too
    if args.command is None:
        from captioning.interfaces.menu import run_menu
        return run_guarded(lambda: (clean_paths(args), run_menu(args, run_argv)), args.debug)
    return run_guarded(lambda: (clean_paths(args), COMMANDS[args.command](args)), args.debug)

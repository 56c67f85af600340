"""`train` itself, epoch for epoch, at the commit before the code was reorganised (decoder and objective
registries, settings declared once, prepare.py: REFACTOR_BEFORE) and now, side by side in one run.

Each round runs `python image_captioning.py train` for --epochs epochs in a checkout of REFACTOR_BEFORE
(a git worktree under bench/.work) and in this tree, one after the other, with the same options, on the
same Flickr8k subset (the first --images training photos and --dev dev photos of the official splits, in
the Kaggle layout), each in its own workdir (features extracted once there). The figure is each run's own
record of its epochs (the "seconds" of the checkpoint's history: training, validation loss and dev
scoring), median over rounds; the first epoch of a run is left out when there are several. Options that
did not exist before (--flip, --lr-schedule) are left at what the old code did: no mirror images, plateau.

    python -m bench.train_commits             # ~8 min on 2 cores: both decoders, 3 rounds
    python -m bench.train_commits --quick     # ~3 min: attention only, 1 round
"""
import argparse
import shutil
import statistics
import subprocess
import sys

from bench.common import FLICKR8K, ROOT, WORK, header, table

import torch

REFACTOR_BEFORE = "5a88f59"   # the last commit before the decoder registry and objectives as plug-ins
NEW_ONLY = ["--no-flip", "--lr-schedule", "plateau"]
BATCH = {"lstm": 32, "attention": 64}   # today's defaults, given to both


def subset(folder, n_train, n_dev):
    """A Kaggle-layout copy of the captions of the first photos of the train and dev splits (photos linked)."""
    splits = {s: (FLICKR8K / "splits" / f"Flickr_8k.{s}Images.txt").read_text().split() for s in ("train", "dev")}
    keep = {"train": splits["train"][:n_train], "dev": splits["dev"][:n_dev]}
    wanted = set(keep["train"]) | set(keep["dev"])
    lines = (FLICKR8K / "captions.txt").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions.txt").write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split(",")[0] in wanted]) + "\n",
                                         encoding="utf-8")
    (folder / "splits").mkdir(exist_ok=True)
    for split, names in keep.items():
        (folder / "splits" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    (folder / "splits" / "Flickr_8k.testImages.txt").write_text("")
    if not (folder / "Images").exists():
        (folder / "Images").symlink_to(FLICKR8K / "Images")
    return folder


def checkout(commit):
    """A worktree of `commit` under bench/.work (made once)."""
    path = WORK / f"checkout-{commit}"
    if not (path / "image_captioning.py").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def epoch_seconds(tree, data, workdir, decoder, epochs, extra):
    """Runs `train` in `tree` and returns the seconds of each epoch it recorded."""
    shutil.rmtree(workdir / "models", ignore_errors=True)
    cmd = [sys.executable, "image_captioning.py", "train", "--data", str(data), "--workdir", str(workdir),
           "--decoder", decoder, "--epochs", str(epochs), "--encoder", "mobilenet_v2",
           "--batch-size", str(BATCH[decoder]), *extra]
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True)
    history = torch.load(workdir / "models" / "last.pt", weights_only=True)["history"]
    seconds = [h["seconds"] for h in history if h.get("epoch", 0) > 0]
    return seconds[1:] if len(seconds) > 1 else seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    header("train_commits")
    data = subset(WORK / "f8k-subset", args.images, args.dev)
    trees = {f"before ({REFACTOR_BEFORE})": (checkout(REFACTOR_BEFORE), []), "now": (ROOT, NEW_ONLY)}
    decoders = ["attention"] if args.quick else ["lstm", "attention"]
    rounds = 1 if args.quick else 3
    rows = []
    for decoder in decoders:
        times = {name: [] for name in trees}
        for _ in range(rounds):
            for name, (tree, extra) in trees.items():
                workdir = WORK / f"train-commits-{name.split()[0]}"
                times[name] += epoch_seconds(tree, data, workdir, decoder, args.epochs, extra)
        before, now = (statistics.median(times[name]) for name in trees)
        rows.append([decoder, f"{before:.1f}", f"{now:.1f}", f"{now / before:.2f}"])
    table(f"train, seconds per epoch ({args.images} training photos, {args.dev} dev photos; median of "
          f"{rounds} round(s))", ["decoder", f"before ({REFACTOR_BEFORE})", "now", "now / before"], rows)


if __name__ == "__main__":
    main()

"""Captioning latency: cold command line, warm Python API, and how fast --help and the menu answer.

Side by side, in one run (each cold figure the median of --repeat fresh processes):
  bare            python -c "import torch, torchvision" + build the checkpoint's encoder + one forward:
                  the floor any captioning process pays
  caption         python image_captioning.py caption photo.jpg --model M (process start to PNG written)
  overhead        caption - bare (target <= 1.5 s), then where the time goes, stage by stage
  bare, no teardown  the same, ending with os._exit as the tool does after a command (cli.exit_process):
                  Python's teardown of torch's modules is about a second of the bare figure
  --help, menu    python image_captioning.py --help / the menu's first screen (target <= 0.3 s)
  warm            Captioner.caption(path) per image in a running process, and caption_files (PNG included)

    python -m bench.caption_latency            # ~1 min
    python -m bench.caption_latency --quick    # ~30 s
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, Timer, checkpoint, flickr_images, header, table

PY = sys.executable
ENTRY = str(ROOT / "image_captioning.py")


def wall(cmd, input=None, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def median_wall(cmd, repeat, **kw):
    return statistics.median(wall(cmd, **kw)[0] for _ in range(repeat))


BARE = """
import sys, torch, torchvision
name, weights = sys.argv[1], (sys.argv[2] if sys.argv[2] != "None" else None)
model = torchvision.models.get_model(name, weights=weights).eval()
with torch.inference_mode():
    model(torch.zeros(1, 3, 224, 224))
if len(sys.argv) > 3:
    import os
    os._exit(0)
"""

# Stage by stage, what `caption IMAGE` does, timed in one fresh process.
STAGES = """
import json, sys, time
t = [("python start", time.perf_counter())]
def mark(name): t.append((name, time.perf_counter()))
from captioning.interfaces.cli import build_parser; mark("import captioning.interfaces.cli (rich, argparse)")
import torch; mark("import torch")
import torchvision; mark("import torchvision")
from captioning.inference.captioner import Captioner, caption_files; mark("import captioning (rest)")
from captioning.config import SearchConfig
c = Captioner.load(sys.argv[2], device="cpu"); mark("load checkpoint, build decoder")
c.encoder(); mark("build encoder (weights from TORCH_HOME)")
from captioning.features.images import load_image
img = load_image(sys.argv[1]); mark("load image")
cfg = SearchConfig()
feats = c.encode([img], cfg.mirror); mark("encoder forward")
hyps = c.search(feats, cfg); mark("beam search")
from captioning.results.render import save_captioned_image
save_captioned_image(img, [c.vocab.decode(hyps[0][0].tokens)], sys.argv[3]); mark("render PNG (matplotlib)")
print(json.dumps([(n, b - a) for (_, a), (n, b) in zip(t, t[1:])]))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", help="checkpoint (default ../runs/att/models/best.pt, else the built-in model)")
    ap.add_argument("--repeat", type=int, help="fresh processes per cold figure (default 5, quick 3)")
    args = ap.parse_args()
    header("caption_latency")
    repeat = args.repeat or (3 if args.quick else 5)
    model = args.model or checkpoint("att") or checkpoint("lstm")
    if not model:
        raise SystemExit("No checkpoint: pass --model PATH.")
    from captioning.training.checkpoint import load_checkpoint
    spec = load_checkpoint(model)["encoder"]
    photo = str(flickr_images(1)[0])

    with tempfile.TemporaryDirectory() as work:
        png = os.path.join(work, "out.png")
        python = median_wall([PY, "-c", "pass"], repeat)
        imports = median_wall([PY, "-c", "import torch, torchvision"], repeat)
        bare = median_wall([PY, "-c", BARE, spec["name"], str(spec["weights"])], repeat)
        bare_fast = median_wall([PY, "-c", BARE, spec["name"], str(spec["weights"]), "os._exit"], repeat)
        cold = median_wall([PY, ENTRY, "caption", photo, "--model", str(model), "--output", png], repeat)
        # Before cli.exit_process: the same command ending in sys.exit, so Python tears torch down.
        cold_teardown = median_wall([PY, "-c", "import sys; from captioning.interfaces.cli import main; sys.exit(main())",
                                     "caption", photo, "--model", str(model), "--output", png], repeat)
        cold_json = median_wall([PY, ENTRY, "caption", photo, "--model", str(model), "--output", png, "--json"],
                                repeat)
        helps = median_wall([PY, ENTRY, "--help"], repeat)
        caption_help = median_wall([PY, ENTRY, "caption", "--help"], repeat)
        menu = median_wall([PY, ENTRY, "--workdir", work], repeat, input="7\n")
        stages = json.loads(wall([PY, "-c", STAGES, photo, str(model), png])[1])
        warm_one, warm_files = warm(model, 10 if args.quick else 40)
        unfolded_one, unfolded_files = warm(model, 10 if args.quick else 40, fold=False)

    table("Cold start, seconds (median of %d fresh processes)" % repeat, ["what", "seconds", "target"], [
        ["python -c pass", f"{python:.2f}", ""],
        ["import torch, torchvision", f"{imports:.2f}", ""],
        [f"bare: imports + build {spec['name']} + one forward", f"{bare:.2f}", ""],
        ["caption photo.jpg (PNG written)", f"{cold:.2f}", ""],
        ["caption photo.jpg, ending in sys.exit (before)", f"{cold_teardown:.2f}", ""],
        ["caption photo.jpg --json", f"{cold_json:.2f}", ""],
        ["**overhead: caption - bare**", f"**{cold - bare:.2f}**", "<= 1.5"],
        ["bare, leaving by os._exit (no Python teardown)", f"{bare_fast:.2f}", ""],
        ["overhead: caption - bare without teardown", f"{cold - bare_fast:.2f}", ""],
        ["--help", f"{helps:.2f}", "<= 0.3"],
        ["caption --help", f"{caption_help:.2f}", "<= 0.3"],
        ["menu: first screen, then quit", f"{menu:.2f}", "<= 0.3"],
    ])
    table("Where a cold `caption` spends its time (one process, stage by stage)", ["stage", "seconds"],
          [[n, f"{s:.3f}"] for n, s in stages])
    table("Warm (model loaded), ms per image", ["what", "BatchNorm folded (now)", "not folded (before)"], [
        ["Captioner.caption(path), default search (mirror, re-ranked)", f"{warm_one:.0f}", f"{unfolded_one:.0f}"],
        ["caption_files, 8 per batch, PNG written", f"{warm_files:.0f}", f"{unfolded_files:.0f}"]])


def warm(model, n, fold=True):
    """ms per image through the API, and through caption_files (PNG included). With `fold=False`, the
    encoder's BatchNorm left unfolded, as captioner.py ran it before it folded it as features.py does."""
    from captioning.inference import captioner as module
    from captioning.results.outputs import OutputConfig
    from captioning.config import SearchConfig
    real = module.fold_batchnorm
    if not fold:
        module.fold_batchnorm = lambda trunk: trunk
    try:
        captioner = module.Captioner.load(model, device="cpu")
        captioner.encoder()
    finally:
        module.fold_batchnorm = real
    photos = [str(p) for p in flickr_images(n + 1)]
    captioner.caption(photos[-1])
    with Timer() as one:
        for p in photos[:n]:
            captioner.caption(p)
    with tempfile.TemporaryDirectory() as out, Timer() as files:
        module.caption_files(captioner, photos[:n], SearchConfig(), OutputConfig(output=out))
    return one.seconds / n * 1000, files.seconds / n * 1000


if __name__ == "__main__":
    main()

"""The ONNX runtime against the torch captioner, side by side in one run (README, Deploying without PyTorch).

  same captions   Flickr8k test photos (1,000) captioned by both from JPEG (beam 3): share of photos whose
                  captions are equal, and each runtime's test CIDEr-D (pure-Python scorer, the same for both)
  cold start      process start to PNG written, `caption photo.jpg --model default` against
                  `--model EXPORT` (in this environment, and in a fresh one from requirements-onnx.txt
                  where that exists): median wall seconds of --repeat runs, alternated, and CPU seconds
  warm            photos/s over 200 photos in a running process, both runtimes (encoder + search, no PNG)
  footprint       du -sm of fresh environments from requirements.txt and from requirements-onnx.txt
                  (made in bench/.work/ on first use with --make-venvs: minutes, several GB for torch)

    python -m bench.onnx_runtime                 # ~5 min on 2 idle cores
    python -m bench.onnx_runtime --photos 100    # a quick look
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.common import FLICKR8K, ROOT, WORK, Timer, header, table

ENTRY = str(ROOT / "image_captioning.py")
VENVS = {"torch (requirements.txt)": (WORK / "venv-torch", "requirements.txt"),
         "ONNX (requirements-onnx.txt)": (WORK / "venv-onnx", "requirements-onnx.txt")}


def export(folder):
    from captioning.inference.captioner import Captioner
    from captioning.deploy.onnx_export import export_onnx
    with Timer() as t:
        export_onnx(Captioner.load("default", device="cpu"), folder)
    print(f"# exported the built-in model to {folder} in {t.seconds:.1f} s")
    return folder


def test_photos(n):
    from captioning.data.datasets import load_dataset
    records = load_dataset(FLICKR8K).split("test")[:n]
    return [r.image for r in records], {str(r.image): r.captions for r in records}


def caption_both(folder, photos):
    """{runtime: (captions by photo, seconds)} for the same photos, same search settings."""
    from captioning.deploy import onnx_runtime as rt
    from captioning.inference.captioner import Captioner, caption_files
    from captioning.results.outputs import OutputConfig
    from captioning.config import SearchConfig
    def torch_files(*a, **kw):
        return caption_files(*a, **kw, workdir=WORK)   # its calibration file goes to bench/.work
    runtimes = {"torch": (Captioner.load("default", device="cpu"), torch_files),
                "ONNX": (rt.OnnxCaptioner(folder), rt.caption_files)}
    out = {}
    for name, (captioner, run) in runtimes.items():
        run(captioner, photos[:8], SearchConfig(), outputs=OutputConfig(png=False))          # warm-up
        cpu = time.process_time()                 # all this process's threads: robust to other jobs' load
        with Timer() as t:
            results = run(captioner, photos, SearchConfig(), outputs=OutputConfig(png=False))
        out[name] = ({r.image: r.captions[0] for r in results}, t.seconds, time.process_time() - cpu)
    return out


def quality(folder, n):
    from captioning.metrics.scores import score_captions
    photos, refs = test_photos(n)
    both = caption_both(folder, photos)
    torch_caps, onnx_caps = both["torch"][0], both["ONNX"][0]
    same = sum(torch_caps[k] == onnx_caps[k] for k in torch_caps) / len(torch_caps)
    cider = {name: score_captions(caps, refs, use_java=False)["CIDEr-D"] for name, (caps, *_) in both.items()}
    table(f"Same captions: {len(photos):,} Flickr8k test photos, beam 3, from JPEG", ["", "value"],
          [["photos with equal captions", f"{same:.1%}"], ["test CIDEr-D, torch", f"{cider['torch']:.4f}"],
           ["test CIDEr-D, ONNX", f"{cider['ONNX']:.4f}"], ["difference", f"{cider['ONNX'] - cider['torch']:+.4f}"]])


def warm(folder, n):
    photos, _ = test_photos(n)
    both = caption_both(folder, photos)
    table(f"Warm: {len(photos)} photos in a running process (encoder + batched beam 3, no PNG)",
          ["runtime", "photos/s", "photos per CPU second"],
          [[name, f"{len(photos) / s:.1f}", f"{len(photos) / cpu:.1f}"] for name, (_, s, cpu) in both.items()])


def cold_once(python, model, out):
    """(wall seconds, CPU seconds) of one `caption` process, start to PNG written."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([python, ENTRY, "caption", str(ROOT / "examples" / "astronaut.jpg"), "--model", model,
                        "--output", str(out)], capture_output=True, text=True, cwd=WORK,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"caption --model {model} failed:\n{r.stderr[-2000:]}")
    out.unlink()
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold(folder, repeat):
    runs = {"torch, --model default": (sys.executable, "default"), "ONNX, --model EXPORT": (sys.executable, str(folder))}
    bare = VENVS["ONNX (requirements-onnx.txt)"][0] / "bin" / "python"
    if bare.exists():
        runs["ONNX, in the torch-free environment"] = (str(bare), str(folder))
    times = {name: [] for name in runs}
    for i in range(repeat):                               # alternated: a busy spell slows every runtime alike
        for name, (python, model) in runs.items():
            times[name].append(cold_once(python, model, WORK / f"cold_{i}.png"))
    torch_wall = statistics.median(w for w, _ in times["torch, --model default"])
    rows = []
    for name, ts in times.items():
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", f"{wall / torch_wall:.0%}"])
    table(f"Cold start: process start to PNG written, one photo, median of {repeat}",
          ["runtime", "wall s", "CPU s", "wall / torch"], rows)


def make_venv(folder, requirements):
    subprocess.run(["python3", "-m", "venv", str(folder)], check=True)      # as a user would, off the PATH
    subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "-r", str(ROOT / requirements)], check=True)


def footprint(make):
    rows = []
    for name, (folder, requirements) in VENVS.items():
        if not folder.exists() and make:
            print(f"# making {folder} from {requirements} (minutes)", file=sys.stderr)
            make_venv(folder, requirements)
        if folder.exists():
            mb = subprocess.run(["du", "-sm", str(folder)], capture_output=True, text=True).stdout.split()[0]
            rows.append([name, mb])
    if rows:
        table("Footprint: du -sm of a fresh environment", ["environment", "MB"], rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--photos", type=int, default=1000, help="test photos for the same-captions check")
    p.add_argument("--warm", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5, help="cold runs per runtime")
    p.add_argument("--make-venvs", action="store_true", help="create the footprint environments when missing")
    args = p.parse_args()
    header("bench.onnx_runtime")
    WORK.mkdir(parents=True, exist_ok=True)
    folder = export(WORK / "onnx-builtin")
    footprint(args.make_venvs)
    cold(folder, args.repeat)
    warm(folder, args.warm)
    quality(folder, args.photos)


if __name__ == "__main__":
    main()

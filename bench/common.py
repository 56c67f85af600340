"""Shared pieces of the benchmarks: data locations, timing, memory readings, markdown tables."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLICKR8K = SHARED / "datasets" / "flickr8k"
# Real ImageNet weights for mobilenet_v2 live here; other encoders run with random weights (same speed).
os.environ.setdefault("TORCH_HOME", str(SHARED / "torch_home"))
# The lead's Flickr8k runs: a mobilenet_v2 feature cache and trained checkpoints (read only).
RUNS = ROOT.parent / "runs"
BASELINE = "e2dbc85"   # the commit before this changes: "before" figures come from its code

if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))   # appended, so PYTHONPATH can point at another checkout to compare


def flickr_images(n=None):
    images = sorted((FLICKR8K / "Images").glob("*.jpg"))
    if not images:
        sys.exit(f"No Flickr8k photos in {FLICKR8K / 'Images'}")
    return images[:n] if n else images


def flickr_cache(encoder="mobilenet_v2"):
    """The finished feature cache of the lead's Flickr8k run, if there is one."""
    for folder in sorted((RUNS / "f8k" / "cache").glob(f"{encoder}-*")):
        if (folder / "progress.json").exists() and '"complete": true' in (folder / "progress.json").read_text():
            return folder
    return None


def checkpoint(name):
    """A trained checkpoint of the lead's runs ('att' or 'lstm'), or None."""
    path = RUNS / name / "models" / "best.pt"
    return path if path.exists() else None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def memory_mb(pid="self"):
    """Current and peak resident memory of a process in MB: total, anonymous (heap, tensors) and
    file-backed (memory-mapped files, shared libraries; the kernel can drop these clean pages any time)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return fields


def run_sampled(cmd, env=None, every=0.2, **kw):
    """Run a command; sample its memory while it runs. Returns (CompletedProcess-like, peaks dict, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    peaks = {}
    while proc.poll() is None:
        for k, v in memory_mb(proc.pid).items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        time.sleep(every)
    out, err = proc.communicate()
    proc.stdout_text, proc.stderr_text = out, err
    return proc, peaks, time.perf_counter() - t0


def table(title, headers, rows):
    """Print a markdown table (pasted as is into bench/README.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


def machine():
    import platform
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def header(name):
    import torch
    print(f"# {name}: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"# note: load average {busy:.1f} when starting; figures from a busy machine are pessimistic")

"""Shared pieces of the benchmarks: data locations, timing, memory readings, markdown tables."""
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLICKR8K = SHARED / "datasets" / "flickr8k"
# Real ImageNet weights for mobilenet_v2 live here; other encoders run with random weights (same speed).
os.environ.setdefault("TORCH_HOME", str(SHARED / "torch_home"))
# The lead's Flickr8k runs: a mobilenet_v2 feature cache and trained checkpoints (read only).
RUNS = ROOT.parent / "runs"
WORK = ROOT / "bench" / ".work"   # what the benchmarks make for themselves (git-ignored)
BASELINE = "e2dbc85"   # the commit before this changes: "before" figures come from its code
SESSION_BASE = "7e17665"  # the last landed commit before the latest changes (beam search, cold exit)

if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))   # appended, so PYTHONPATH can point at another checkout to compare

# Where the flat modules of older commits live now, so that module_at's old code finds its `from .name` imports.
FLAT_MODULES = {
    "vocab": "data.vocab", "layouts": "data.layouts", "datasets": "data.datasets", "download": "data.download",
    "synthetic": "data.synthetic", "rewards": "metrics.cider", "evaluate": "metrics.scores",
    "outputs": "results.outputs", "metadata": "results.metadata", "render": "results.render",
    "images": "features.images", "encoders": "features.encoders", "store": "features.store",
    "tuning": "features.tuning", "features": "features.extract", "prepare": "features.prepare",
    "segment": "features.segment", "models": "models.decoders", "consensus": "search.consensus",
    "npsearch": "search.numpy_search", "search": "search.torch_search", "checkpoint": "training.checkpoint",
    "objectives": "training.objectives", "train": "training.train", "onnx_export": "deploy.onnx_export",
    "onnx_runtime": "deploy.onnx_runtime", "captioner": "inference.captioner", "cli": "interfaces.cli",
    "menu": "interfaces.menu", "demo": "interfaces.demo",
}
# Where the rest of an old module's names went when it was split further (models, train, datasets, features).
SPLIT_HOMES = ["models.contract", "models.lstm", "models.grid", "models.attention", "models.updown",
               "models.ensemble", "training.optim", "training.validation", "data.annotations", "features.decoding"]


class _FlatModule(types.ModuleType):
    """An old flat module's name for old code: its names from where they live now (also the names that old
    modules re-exported from others)."""

    def __init__(self, old):
        super().__init__(f"captioning._flat_{old}")
        self._homes = ([FLAT_MODULES[old]] + [m for m in FLAT_MODULES.values() if m != FLAT_MODULES[old]]
                       + SPLIT_HOMES + ["config"])

    def __getattr__(self, attr):
        import importlib
        if attr.startswith("__"):   # probes such as inspect's for __file__ must not import anything
            raise AttributeError(attr)
        for home in self._homes:
            module = importlib.import_module(f"captioning.{home}")
            if attr in vars(module):
                return vars(module)[attr]
        raise AttributeError(attr)


def module_at(commit, path):
    """A file of this repository as of `commit` (e.g. "captioning/features.py"), loaded as a module of the
    package beside the current one, so "before" figures run the old code in the same process; None
    without git or where the commit is not in this clone."""
    import importlib
    import importlib.util
    import re
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = f"captioning._{commit}_{Path(path).stem}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "captioning"
    for old in set(re.findall(r"from \.(\w+) import", source)) & FLAT_MODULES.keys():
        # Renamed, as the flat names of features, models and search are packages now.
        sys.modules.setdefault(f"captioning._flat_{old}", _FlatModule(old))
        source = source.replace(f"from .{old} import", f"from captioning._flat_{old} import")
    sys.modules[name] = module
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def flickr_images(n=None):
    images = sorted((FLICKR8K / "Images").glob("*.jpg"))
    if not images:
        sys.exit(f"No Flickr8k photos in {FLICKR8K / 'Images'}")
    return images[:n] if n else images


def flickr_cache(encoder="mobilenet_v2", mirror=False):
    """A finished Flickr8k feature cache (of the mirrored photos with `mirror`): one of the lead's runs if
    there is one, else this script's own (bench/.work, extracted by the tool on first use, about a minute
    for mobilenet_v2)."""
    pattern = f"cache/{encoder}-mirror-*" if mirror else f"cache/{encoder}-*"
    for folder in sorted(RUNS.glob(f"*/{pattern}")) + sorted(WORK.glob(pattern)):
        if "-mirror-" in folder.name and not mirror:
            continue
        if (folder / "progress.json").exists() and '"complete": true' in (folder / "progress.json").read_text():
            return folder
    from captioning.features.encoders import EncoderSpec
    from captioning.config import ExtractConfig
    from captioning.features.extract import extract_features
    from captioning.features.prepare import prepare
    print(f"# extracting {encoder} features of Flickr8k into {WORK} (once)", file=sys.stderr)
    store = prepare(FLICKR8K, WORK, EncoderSpec(encoder), ExtractConfig(device="cpu"))[2]
    if mirror:
        store = extract_features(store.paths, EncoderSpec(encoder), WORK, ExtractConfig(device="cpu", mirror=True))
    return store.folder


def checkpoint(name):
    """A trained Flickr8k checkpoint: the lead's run `name` ('att' or 'lstm'), else for 'att' the
    built-in model (an attention decoder trained on these features), else None."""
    path = RUNS / name / "models" / "best.pt"
    if path.exists():
        return path
    from captioning.training.checkpoint import BUILTIN
    return BUILTIN if name == "att" and BUILTIN.exists() else None


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


def _busy_seconds():
    """CPU seconds all processes on the machine have used (from /proc/stat), or None off Linux."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds():
    import resource
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


class Others:
    """How many cores other processes kept busy while a benchmark ran: figures taken next to another
    CPU-heavy job are not this machine's figures, and the report should say so."""

    def __enter__(self):
        self.start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, t = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy is None or self.start[0] is None:
            return
        self.cores = max(0.0, (busy - self.start[0]) - (own - self.start[1])) / (t - self.start[2])
        note = "  <- NOT a quiet machine: rerun" if self.cores > 0.15 else ""
        print(f"# other processes kept {self.cores:.2f} of {os.cpu_count()} cores busy during this run{note}")


def header(name):
    """The machine, and at exit how busy other processes kept it meanwhile."""
    import atexit
    import torch
    print(f"# {name}: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    others = Others().__enter__()
    atexit.register(others.__exit__)

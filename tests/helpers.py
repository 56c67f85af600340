"""Helpers shared by the tests (fixtures live in conftest.py): paths, the entry script in a subprocess, a
training run, processes watched as they run, error-line checks, and small datasets and checkpoints."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from captioning.data.vocab import SPECIALS

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "datasets" / "flickr8k"
TORCH_HOME = ROOT.parent / "shared" / "torch_home"
ENTRY = ROOT / "image_captioning.py"

def run_training(workdir, data, decoder, epochs, **model_kw):
    from captioning.interfaces.demo import demo_configs
    from captioning.config import ExtractConfig
    from captioning.training.train import train
    spec, cfg = demo_configs(epochs=epochs, seed=0)
    cfg.model.decoder = decoder
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    return train(data, workdir, cfg, spec, ExtractConfig(device="cpu", num_workers=1))


def cli(*args, cwd=None, env=None, input=None, timeout=600):
    """Run the real entry script in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, str(ENTRY), *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, input=input, capture_output=True, text=True, timeout=timeout)


# For the *_robustness tests: their subprocesses use one compute thread so that a run and its resumed twin
# compute in the same order.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_IMAGES = 32
EPOCHS = 4


class Proc:
    """A running command whose stdout and stderr are collected as they arrive (prompts need no newline)."""

    def __init__(self, argv, cwd, stdin=False):
        self.p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=ENV,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out, self._err = bytearray(), bytearray()
        self._pumps = [threading.Thread(target=self._pump, args=(f, buf), daemon=True)
                       for f, buf in ((self.p.stdout, self._out), (self.p.stderr, self._err))]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(f, buf):
        while chunk := os.read(f.fileno(), 65536):
            buf += chunk

    @property
    def out(self):
        return self._out.decode("utf-8", "replace")

    @property
    def err(self):
        return self._err.decode("utf-8", "replace")

    def wait_for(self, condition, timeout=300, what="the expected output"):
        end = time.monotonic() + timeout
        while not condition():
            if self.p.poll() is not None:
                time.sleep(0.05)  # let the pumps drain the pipes
                if condition():
                    return
                pytest.fail(f"the process ended (rc {self.p.returncode}) before {what}:\n{self.out}\n{self.err}")
            if time.monotonic() > end:
                self.p.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.out}\n{self.err}")
            time.sleep(0.01)

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def finish(self, timeout=300):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        for t in self._pumps:
            t.join(5)
        return rc


def error_line(text):
    """The failure message: exactly one non-blank line, starting 'error:', and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return lines[0]


def the_error(text):
    """The one error line among a command's progress messages; no traceback anywhere."""
    assert "Traceback" not in text and "Exception ignored" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def no_temp_files(folder):
    return sorted(str(p) for p in Path(folder).rglob("*.tmp"))


def train_argv(tiny, workdir, epochs, *extra):
    return ["train", "--data", tiny.data, "--workdir", workdir, "--device", "cpu", "--encoder", "resnet18",
            "--encoder-weights", tiny.weights, "--extract-batch-size", "4", "--epochs", str(epochs),
            "--batch-size", "8", "--decoder", "attention", "--embed-dim", "16", "--hidden-dim", "32",
            "--attention-dim", "16", "--context-dim", "16", "--dropout", "0.2", "--min-count", "1",
            "--patience", "50", "--lr", "0.003",
            # The shapes' captions say "left" and "right" (no mirror images), and a few epochs learn faster
            # with the plateau schedule than with a cosine.
            "--no-flip", "--lr-schedule", "plateau", *map(str, extra)]


def copy_cache(src, dst):
    shutil.copytree(Path(src) / "cache", Path(dst) / "cache")
    return Path(dst)


def jpeg(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="JPEG")
    return path


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def coco_name(i):
    return f"COCO_train2014_{i:012d}.jpg"


def make_mini_coco(root, ids=(9, 25, 30, 34, 36), per_image=2):
    caps = [{"image_id": i, "caption": f"A picture number {i} variant {k} "} for i in ids for k in range(per_image)]
    write_json(root / "captions.json", caps)
    for i in ids:
        jpeg(root / "Images" / coco_name(i))
    return root


def make_flickr(root, names, splits=None):
    (root / "Images").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for n in names:
        jpeg(root / "Images" / n)
        lines += [f'{n},"A dog , a ball and a beach ."', f"{n},A dog runs on the beach ."]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, listed in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"Flickr_8k.{split}Images.txt").write_text("\n".join(listed) + "\n")
    return root


def cuda_oom(*args, **kwargs):
    import torch
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total "
                                      "capacity; 5.12 GiB already allocated)\nSee documentation for Memory Management")


WORDS = SPECIALS + [f"w{i}" for i in range(40)]


def small_checkpoint(path, decoder, seed=0):
    """A tiny untrained decoder on a random-init ResNet-18 (7x7x512 grid), as a checkpoint file."""
    import torch
    from captioning.config import ModelConfig
    from captioning.features.encoders import EncoderSpec
    from captioning.models.decoders import build_decoder
    from captioning.training.checkpoint import save_checkpoint
    torch.manual_seed(seed)
    cfg = ModelConfig(decoder=decoder, vocab_size=len(WORDS), feat_dim=512, embed_dim=16, hidden_dim=24,
                      attention_dim=16, context_dim=16, dropout=0.0)
    dec = build_decoder(cfg)
    with torch.no_grad():
        dec.out.weight.mul_(8)          # peaked word distributions: no near-ties that float rounding could flip
    ckpt = {"decoder_state": dec.state_dict(), "vocab": WORDS, "model_config": cfg.to_dict(),
            "encoder": EncoderSpec("resnet18", None, seed).to_dict(), "grid_hw": [7, 7]}
    return save_checkpoint(path, ckpt)


# ---- the dashboard's tests (tests/interfaces) ----------------------------------------------------------

APP = str(ROOT / "captioning" / "interfaces" / "dashboard.py")


def dashboard():
    """The dashboard module for its helpers (it needs streamlit: skip without it)."""
    pytest.importorskip("streamlit")
    from captioning.interfaces import dashboard
    return dashboard


def expected_captions(workdir, image_path, beam=3, count=3):
    from captioning.config import SearchConfig
    from captioning.features.images import load_image
    from captioning.inference.captioner import Captioner
    from captioning.training.checkpoint import load_checkpoint
    captioner = Captioner(load_checkpoint(workdir / "models" / "best.pt"), "cpu")
    return captioner.caption_pil([load_image(image_path)], SearchConfig(beam_size=beam, num_captions=count))[0]


def texts(elements):
    return [e.value for e in elements]


def shown_photos(at):
    return [m for m in texts(at.markdown) if m.startswith("#### ")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout, what, poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Dashboard:
    """`image_captioning.py dashboard --headless` started as a user starts it, in its own session so that a
    failing test can still clean up everything it started; the signals in the tests go to its pid only."""

    def __init__(self, workdir, tmp_path, *options):
        self.port, self.log_path = free_port(), tmp_path / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "image_captioning.py"), "dashboard", "--headless",
                                      "--port", str(self.port), "--workdir", str(workdir), "--no-segmentation",
                                      *map(str, options)], cwd=tmp_path, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self.healthy, 90, "the dashboard server")

    def get(self, path):
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy
        with direct.open(self.url + path, timeout=5) as r:
            return r.status, r.read()

    def healthy(self):
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return self.get("/_stcore/health")[0] == 200
        except OSError:
            return False

    def processes(self):
        """The dashboard process and every process under it (the streamlit server and what it started)."""
        import psutil
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # only the test's own leftovers, after a failure
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        return self.log_path.read_text()

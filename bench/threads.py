"""Torch threads and OpenMP waiting on a small CPU, quiet and next to another CPU-heavy process.

torch's CPU kernels run on OpenMP (libgomp). Between parallel regions its threads spin, waiting for
the next one, instead of sleeping: on a quiet machine that saves wake-up latency, but when another
process wants the same cores the spinning threads burn the time slices the working thread needs.
OMP_WAIT_POLICY=PASSIVE makes them sleep; it must be in the environment before torch is imported.

Each cell: seconds for a fixed piece of work in a fresh process, with the given torch thread count
and wait policy, while nothing else runs / while a pure-Python busy loop runs / while another torch
training (2 threads, default policy) runs.
  attention   30 training batches of the attention decoder (64 captions, synthetic features)
  lstm        60 training batches of the Show-and-Tell decoder (32 captions)
  encoder     mobilenet_v2 forward, 40 batches of 4, channels_last

    python -m bench.threads            # ~4 min on 2 cores
    python -m bench.threads --quick    # ~1.5 min (fewer cells)
"""
import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT, header, table

WORK = {"attention": 30, "lstm": 60, "encoder": 40}


def child(kind, steps):
    import torch
    from captioning.config import ModelConfig
    from captioning.models.decoders import build_decoder
    from captioning.config import TrainConfig
    from captioning.training.objectives import decoder_loss
    torch.manual_seed(0)
    if kind == "encoder":
        import torchvision
        trunk = torchvision.models.get_model("mobilenet_v2", weights=None).features.eval()
        trunk = trunk.to(memory_format=torch.channels_last)
        x = torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            trunk(x)
            t0 = time.perf_counter()
            for _ in range(steps):
                trunk(x)
        return time.perf_counter() - t0
    grid = kind == "attention"
    batch, images = (64, 13) if grid else (32, 32)
    cfg = TrainConfig(model=ModelConfig(decoder=kind, vocab_size=2540, feat_dim=1280))
    decoder = build_decoder(cfg.model).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=4e-4)
    feats = torch.randn(images, 49, 1280) if grid else torch.randn(images, 1280)
    index = torch.arange(batch) * images // batch
    lengths = torch.randint(8, 18, (batch,))
    tokens = torch.randint(4, 2540, (batch, int(lengths.max())))
    tokens[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = 2
        tokens[i, n:] = 0
    t0 = None
    for step in range(steps + 2):
        if step == 2:
            t0 = time.perf_counter()  # after two warm-up steps
        loss, _ = decoder_loss(decoder, feats, tokens, lengths, cfg, index)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def measure(kind, steps, threads, policy, hog):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    hog_proc = None
    if hog == "python loop":
        hog_proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    elif hog == "torch training":
        hog_proc = subprocess.Popen([sys.executable, "-m", "bench.threads", "--child", "attention", "100000"], cwd=ROOT,
                                    env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if hog_proc:
            time.sleep(2)  # let it get going (imports)
        out = subprocess.run([sys.executable, "-m", "bench.threads", "--child", kind, str(steps)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        if hog_proc:
            hog_proc.kill()
            hog_proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child[0], int(args.child[1])))
        return
    header("threads")
    kinds = ["attention", "encoder"] if args.quick else ["attention", "lstm", "encoder"]
    hogs = ["none", "python loop", "torch training"]
    settings = [(2, None), (2, "PASSIVE"), (1, None)] if args.quick else [(2, None), (2, "PASSIVE"), (1, None),
                                                                           (1, "PASSIVE")]
    rows = []
    for kind in kinds:
        steps = WORK[kind] // (2 if args.quick else 1)
        for threads, policy in settings:
            cells = [measure(kind, steps, threads, policy, hog) for hog in hogs]
            rows.append([kind, threads, policy or "default (spin)", *(f"{c:.1f}" for c in cells)])
            print("  ", rows[-1], flush=True)
    table("Seconds for a fixed piece of work (lower is better)",
          ["work", "torch threads", "OMP_WAIT_POLICY", *(f"next to: {h}" for h in hogs)], rows)


if __name__ == "__main__":
    main()

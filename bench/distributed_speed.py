"""Data-parallel training: 1 vs 2 CPU processes here, and an estimate for 8 GPUs on full COCO.

Part 1, measured. captioning/training/train.py's own train_epoch on cached Flickr8k features (mobilenet_v2) with
the same global batch, run as
    1 process  × 2 threads   (the whole machine, the tool's default)
    1 process  × 1 thread    (one core: the per-core baseline)
    2 processes × 1 thread   (torchrun --nproc-per-node 2, gloo, DistributedDataParallel)
This machine has 2 cores: two processes can at best match one process using both cores; the row shows
what DDP's gradient all-reduce and the split batches cost, not a speed-up one would buy.

Part 2, an estimate, for every registered decoder (models.decoders.DECODERS). The per-step compute of
the COCO-sized decoder (vocabulary 10,000, ResNet-50's 2,048 channels, default dimensions) is measured
here on the CPU, divided by an assumed GPU speed-up, and each step adds a ring all-reduce of the fp32
gradients: 2(N-1)/N × bytes / bandwidth + 2(N-1) × latency, with no overlap with the backward pass
(DDP does overlap them: the estimate is an upper bound for this model).

    python -m bench.distributed_speed                 # ~3 min on 2 cores
    python -m bench.distributed_speed --quick         # ~1 min
"""
import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import ROOT, header, table

import torch

from captioning.models.decoders import DECODERS

COCO_CAPTIONS = 616_000   # COCO 2014 train+val captions (Karpathy train+restval is ~566k)
COCO_VOCAB = 10_000       # words seen 5+ times in COCO train (about 9,500-10,000)
COCO_CHANNELS = 2048      # ResNet-50 features
ASSUMED = {                # stated assumptions, see bench/README.md (data-parallel)
    "nvlink_GBps": 200.0,  # NCCL all-reduce bus bandwidth within one 8-GPU NVLink node (A100/H100: 200-400)
    "ib_GBps": 25.0,       # per node between nodes: one 200 Gb/s InfiniBand HDR port
    "nvlink_latency_s": 5e-6,
    "ib_latency_s": 10e-6,
}


# ---- worker: one process of a run (plain, or one rank under torchrun) ---------------------------------

def worker(args):
    from bench.train_speed import setup
    from captioning import distributed
    from captioning.config import ModelConfig
    from captioning.models.decoders import build_decoder
    from captioning.features.store import feature_stats
    from captioning.config import TrainConfig
    from captioning.training.train import train_epoch

    torch.set_num_threads(args.threads)
    with distributed.session("cpu", 600):
        world = distributed.world_size()
        store, vocab, data, _ = setup(args.images, 10)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch // world)
        cfg.model = ModelConfig(decoder=args.decoder, vocab_size=len(vocab), feat_dim=store.channels)
        torch.manual_seed(0)
        decoder = build_decoder(cfg.model)
        decoder.norm.set_stats(*feature_stats(store, data.rows, decoder.uses_grid))
        model = distributed.wrap(decoder, torch.device("cpu"))
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(0)
        seconds, losses = [], []
        for epoch in range(1, args.epochs + 1):
            distributed.barrier()
            t0 = time.perf_counter()
            losses.append(train_epoch(decoder, optimizer, store, data, cfg, generator, torch.device("cpu"), epoch,
                                      model))
            seconds.append(time.perf_counter() - t0)
        grad_bytes = 4 * sum(p.numel() for p in decoder.parameters())
        allreduce_s = measure_allreduce(grad_bytes) if world > 1 else None
        if distributed.is_main():
            print("RESULT " + json.dumps({"world": world, "threads": args.threads, "seconds": seconds,
                                          "losses": losses, "tokens": int((data.lengths - 1).sum()),
                                          "captions": len(data.lengths), "grad_bytes": grad_bytes,
                                          "allreduce_s": allreduce_s}), flush=True)


def measure_allreduce(nbytes, repeats=10):
    """Seconds for one gloo all-reduce of `nbytes` of fp32 across the ranks (fastest of `repeats`)."""
    import torch.distributed as dist
    t = torch.zeros(nbytes // 4)
    best = float("inf")
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        best = min(best, time.perf_counter() - t0)
    return best


def launch(procs, threads, args):
    """Run the worker as `procs` processes of `threads` threads; returns its RESULT dict."""
    worker_args = ["--worker", "--threads", str(threads), "--images", str(args.images), "--epochs", str(args.epochs),
                   "--batch", str(args.batch), "--decoder", args.decoder]
    if procs == 1:
        cmd = [sys.executable, "-m", "bench.distributed_speed", *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "bench.distributed_speed", *worker_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")


# ---- the estimate -------------------------------------------------------------------------------------

def cpu_step_seconds(decoder_name, batch, mean_tokens, steps=6, threads=2):
    """Measured here: one training step (forward, backward, clipping, AdamW) of the COCO-sized decoder on a
    batch of `batch` captions of Flickr8k's mean length, fastest of `steps`. Returns (seconds, grad bytes)."""
    from captioning.config import ModelConfig
    from captioning.models.decoders import build_decoder
    from captioning.config import TrainConfig
    from captioning.training.objectives import decoder_loss
    from captioning.training.optim import optimizer_step
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(decoder=decoder_name, vocab_size=COCO_VOCAB, feat_dim=COCO_CHANNELS))
    decoder = build_decoder(cfg.model)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr)
    width = int(round(mean_tokens)) + 1
    tokens = torch.randint(4, COCO_VOCAB, (batch, width))
    tokens[:, 0] = 1
    lengths = torch.full((batch,), width)
    images = max(1, batch // 5)   # 5 captions per image, grouped as train.py does for attention
    feats = torch.randn(images, 49, COCO_CHANNELS) if decoder.uses_grid else torch.randn(images, COCO_CHANNELS)
    index = torch.arange(batch) % images
    best = float("inf")
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = decoder_loss(decoder, feats, tokens, lengths, cfg, index)
        optimizer_step(loss, optimizer, decoder.parameters(), cfg.clip)
        best = min(best, time.perf_counter() - t0)
    return best, 4 * sum(p.numel() for p in decoder.parameters())


def ring_allreduce_s(nbytes, n, bandwidth_Bps, latency_s):
    return 2 * (n - 1) / n * nbytes / bandwidth_Bps + 2 * (n - 1) * latency_s


def estimate(decoder_name, per_gpu_batch, mean_tokens, speedups):
    step_cpu, grad_bytes = cpu_step_seconds(decoder_name, per_gpu_batch, mean_tokens)
    gpus = 8
    steps = COCO_CAPTIONS / (per_gpu_batch * gpus)
    layouts = {"1 node × 8 GPUs (NVLink)": ring_allreduce_s(grad_bytes, gpus, ASSUMED["nvlink_GBps"] * 1e9,
                                                              ASSUMED["nvlink_latency_s"]),
               "4 nodes × 2 GPUs (InfiniBand)": ring_allreduce_s(grad_bytes, gpus, ASSUMED["ib_GBps"] * 1e9,
                                                                   ASSUMED["ib_latency_s"])}
    rows = []
    for speedup in speedups:
        compute = step_cpu / speedup
        one_gpu = COCO_CAPTIONS / per_gpu_batch * compute
        for layout, comm in layouts.items():
            epoch = steps * (compute + comm)
            rows.append([f"{speedup:g}x", layout, f"{compute * 1e3:.1f}", f"{comm * 1e3:.2f}", f"{steps:,.0f}",
                         f"{epoch:,.0f}", f"{one_gpu / epoch:.1f}x"])
    table(f"Estimate: full COCO ({COCO_CAPTIONS:,} captions) epoch, {decoder_name} decoder (vocabulary "
          f"{COCO_VOCAB:,}, {COCO_CHANNELS} channels, {grad_bytes / 1e6:.0f} MB of fp32 gradients), 8 GPUs × batch "
          f"{per_gpu_batch} (global {per_gpu_batch * gpus}); measured CPU step here {step_cpu * 1e3:.0f} ms",
          ["GPU speed-up over this CPU (assumed)", "layout", "compute ms/step", "all-reduce ms/step", "steps",
           "s/epoch", "vs 1 GPU"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, help="Flickr8k train images, 5 captions each (default 600, quick 200)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the fastest counts (default 2)")
    ap.add_argument("--batch", type=int, default=32, help="global batch in captions (default 32)")
    ap.add_argument("--decoder", default="lstm", choices=list(DECODERS))
    ap.add_argument("--gpu-batch", type=int, default=64, help="per-GPU batch for the estimate (default 64)")
    ap.add_argument("--speedups", type=float, nargs="+", default=[20, 50, 200],
                    help="assumed GPU speed-ups over this CPU's step (default 20 50 200)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.images = args.images or (200 if args.quick else 600)
    if args.quick:
        args.epochs = 1
    header("distributed_speed")

    rows, base = [], None
    for procs, threads in ((1, 2), (1, 1), (2, 1)):
        r = launch(procs, threads, args)
        seconds = min(r["seconds"])
        base = base or seconds
        comm = f"{r['allreduce_s'] * 1e3:.1f}" if r["allreduce_s"] else "-"
        rows.append([f"{procs} × {threads}", args.batch // procs, args.batch, f"{seconds:.2f}",
                     f"{r['tokens'] / seconds:,.0f}", f"{base / seconds:.2f}x", f"{r['losses'][-1]:.4f}", comm])
        print(f"  {procs} process(es) × {threads} thread(s): {seconds:.2f}s", flush=True)
    table(f"{args.decoder} decoder, one epoch of {r['captions']:,} Flickr8k captions ({r['tokens']:,} tokens), "
          f"global batch {args.batch}, fastest of {args.epochs} epoch(s); gradients {r['grad_bytes'] / 1e6:.1f} MB",
          ["processes × threads", "batch/process", "global batch", "s/epoch", "tokens/s", "vs 1×2",
           f"train loss, epoch {args.epochs}", "gloo all-reduce ms"], rows)
    print("# same batches in every run; the losses differ a little only because 2 processes draw other dropout "
          "masks (with dropout 0 they agree to 1e-7: tests/training/test_distributed.py)")

    mean_tokens = r["tokens"] / r["captions"]
    for name in DECODERS:
        estimate(name, args.gpu_batch, mean_tokens, args.speedups)
    print(f"\n# assumptions: {json.dumps(ASSUMED)}; all-reduce not overlapped with backward; data loading and "
          "rank 0's dev scoring not counted")


if __name__ == "__main__":
    main()

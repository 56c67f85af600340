"""The optimiser side of a training step: AdamW, the learning-rate schedule, mixed precision, and the
backward pass with gradient clipping. The rate itself is the objective's (objectives.py)."""
import math

import torch

from captioning.training.objectives import objective_class


def make_optimizer(params, cfg):
    """AdamW at the objective's learning rate, fused where this torch has it for the device: one kernel over
    all parameters instead of several per tensor (bench/train_speed.py measures the two). Its state is the
    same as the plain optimizer's, so checkpoints resume under either."""
    params = list(params)
    lr = objective_class(cfg.objective).learning_rate(cfg)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):   # torch < 2.4 on CPU, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg):
    """plateau: halve the learning rate when dev CIDEr-D stalls. cosine: from the full rate down towards 0
    over the planned epochs, one step an epoch (the halvings of a plateau run come late, and each one
    raised dev CIDEr-D at once)."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: 0.5 * (1 + math.cos(math.pi * min(done, cfg.epochs) / cfg.epochs)))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=cfg.lr_patience)


def step_scheduler(scheduler, score):
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    else:
        scheduler.step()


def amp_dtype(device, amp):
    """The autocast type for training: None (float32) off CUDA or with --no-amp; else bf16 where the GPU
    has it (no loss scaling needed), fp16 with a GradScaler where not."""
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def optimizer_step(loss, optimizer, params, clip, scaler=None):
    """Backward pass, gradient clipping, update; through fp16's GradScaler when there is one (it skips the
    update when a gradient overflowed). Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return norm
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    return norm

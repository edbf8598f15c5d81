"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.train.events import MessageEvent


def build_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device,
                    notify=None) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and usable (CUDA + bitsandbytes installed)."""
    if cfg.optimizer == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
            except ImportError:
                reason = "bitsandbytes is not installed"
        else:
            reason = "it needs a CUDA device"
        if notify:
            notify(MessageEvent(f"optimizer adamw8bit unavailable ({reason}); using adamw", "warning"))
    return adamw(groups, cfg.weight_decay)


def adamw(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over every parameter) where this torch has it for the parameters' device
    (CUDA; the CPU from torch 2.4); otherwise torch's default implementation for the device. On a CPU the fused
    step of SDXL's 1,444 LoRA tensors takes ~0.04 s, the per-tensor loop ~0.14 s and the multi-tensor one ~0.24 s
    (``benchmarks/optimizer_step.py``)."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # torch < 2.4 on a CPU: "`fused=True` requires ... tensors of supported devices"
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """constant / cosine / linear, each after ``warmup_steps`` of linear warm-up (diffusers' schedules)."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=max(total_steps, 1))


def apply_update(optimizer: torch.optim.Optimizer, scheduler, params: list[torch.nn.Parameter],
                 max_grad_norm: float, scaler=None) -> float:
    """One optimizer update from the summed gradients: unscale (fp16), clip, step, advance the schedule.

    Returns the learning rate the update used.
    """
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr

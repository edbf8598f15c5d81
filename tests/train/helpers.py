"""Shared helpers for the training tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.data.dataset import load_pixels, scan_dataset
from lora_trainer.train.noise import add_noise, training_target


@torch.no_grad()
def fixed_eval_loss(backbone, folder: Path, resolution: int = 64) -> float:
    """Denoising loss on the data set at fixed noise and timesteps: comparable before and after training."""
    items = scan_dataset(folder, resolution=resolution).items
    torch.manual_seed(0)
    x0 = backbone.encode_images(torch.stack([load_pixels(item) for item in items])).float()
    cond = backbone.encode_prompts([item.caption for item in items])
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    for t in (50, 250, 450, 650, 850):
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.full((x0.shape[0],), t, dtype=torch.long)
        noisy = add_noise(x0, noise, timesteps, backbone.alphas_cumprod)
        pred = backbone.predict(noisy, timesteps, cond)
        target = training_target(x0, noise, timesteps, backbone.alphas_cumprod, backbone.prediction_type)
        total += torch.nn.functional.mse_loss(pred, target).item()
    return total / 5

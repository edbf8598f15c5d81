"""Forward diffusion for training: timesteps, noisy latents, targets and min-SNR weights."""

from __future__ import annotations

import torch

from lora_trainer.train.transfer import to_device


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0, *,
                 batch: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (brightness range).

    With ``batch``, the noise of that many samples is drawn (a data-parallel run's global batch) and its ``rows``
    (this process's share) are returned: each sample's noise depends on its place in the batch, not the process."""
    shape = (latents.shape[0] if batch is None else batch, *latents.shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return to_device(noise[rows], latents.device)


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (batch,), generator=generator, dtype=torch.long)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = to_device(values, like.device)[to_device(timesteps, like.device)].float()
    return out.view(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x_0 + sqrt(1 - a) eps, in float32."""
    a = _gather(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the denoiser should output: the noise (epsilon) or v = sqrt(a) eps - sqrt(1 - a) x_0."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, timesteps, latents)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023)."""
    a = alphas_cumprod[timesteps.cpu()].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # epsilon: min(snr, gamma) / snr, which tends to 1 at zero SNR (the last step of a zero-terminal-SNR schedule)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))

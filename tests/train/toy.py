"""A toy backbone that overfits on cue, for the overfitting alarm and early stop.

Its denoiser knows the noise schedule exactly and estimates the clean latent as one learned constant picture
(a small MLP on a constant input, whose two Linear layers get the LoRA). Trained on two flat warm-coloured
pictures and validated on two cool ones, all bright, the LoRA first learns the brightness all four share (both
losses fall), then the two training colours themselves (the training loss keeps falling, the validation loss
turns up): overfitting, reached in about 50 steps at learning_rate 1e-3, a few milliseconds a step.
The tiny random SD model needs thousands of steps to get there, which the suite cannot afford.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lora_trainer.data.captions import write_metadata_csv
from lora_trainer.models.backbone import Backbone

TARGETS = ["to_q", "to_out.0"]
WARM = [(250, 160, 120), (240, 190, 100)]
COOL = [(170, 200, 230), (180, 230, 190)]


class ConstantPicture(nn.Module):
    """A learned constant latent picture [4 * 8 * 8]."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.to_q = nn.Linear(16, 64)
        self.to_out = nn.ModuleList([nn.Linear(64, 256)])
        with torch.no_grad():
            for param in self.to_q.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            for param in self.to_out.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.001)
        self.register_buffer("one", torch.ones(1, 16))

    def forward(self) -> torch.Tensor:
        return self.to_out[0](F.gelu(self.to_q(self.one)))


class ToyBackbone(Backbone):
    model_version = "sd_v1"
    prediction_type = "epsilon"

    def __init__(self) -> None:
        self.net = ConstantPicture()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[:, :, ::8, ::8]
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 1, 4)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.cpu()].view(-1, 1, 1, 1)
        x0 = self.net().view(1, *noisy_latents.shape[1:])
        return (noisy_latents - a.sqrt() * x0) / (1 - a).sqrt()

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        return {"lora_unet": self.net}

    def frozen_modules(self) -> list[nn.Module]:
        return [self.net]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        return None

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list:
        return [Image.new("RGB", (width, height)) for _ in prompts]


def flat_pictures(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for index, colour in enumerate(colours):
        Image.new("RGB", (64, 64), colour).save(folder / f"flat{index}.png")
        captions[f"flat{index}.png"] = "zkx"
    write_metadata_csv(folder / "metadata.csv", captions)
    return folder


def planted_overfit(tmp: Path, **overrides) -> dict:
    """Config values: two training pictures, two held-out ones, 100 steps, validation every 5."""
    settings = {
        "train_data_dir": str(flat_pictures(tmp / "train", WARM)),
        "validation_dir": str(flat_pictures(tmp / "held_out", COOL)),
        "base_model": "toy", "output_dir": str(tmp / "out"), "output_name": "toy", "resolution": 64,
        "batch_size": 2, "lora_rank": 8, "lora_alpha": 8, "seed": 7, "device": "cpu", "target_modules": TARGETS,
        "max_steps": 100, "learning_rate": 1e-3, "validate_every": 5,
    }
    settings.update(overrides)
    return settings

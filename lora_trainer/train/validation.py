"""Held-out images and a validation loss at fixed noise and timesteps, comparable across steps and runs.

The loss is the plain denoising MSE (no min-SNR weighting, no noise offset, no flips or caption dropout) on
noisy latents drawn once from a fixed seed that does not depend on the run's ``seed``: two evaluations of the
same LoRA weights give the same number, and two runs on the same images and model share one yardstick.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import DatasetError, DatasetScan, TrainItem, load_pixels, scan_dataset
from lora_trainer.models.sampling import eval_mode
from lora_trainer.train.noise import add_noise, training_target
from lora_trainer.train.transfer import to_device

VALIDATION_SEED = 1_234_567  # the same noise for every run, whatever its own seed
TIMESTEP_FRACTIONS = (0.1, 0.35, 0.6, 0.85)  # where in the schedule each held-out image is noised


def _order_key(item: TrainItem, folder: Path | None) -> str:
    """A stable pseudo-random rank from the file name: the same images are held out in every run."""
    name = item.path.name
    if folder is not None:
        with contextlib.suppress(ValueError):
            name = item.path.relative_to(folder).as_posix()
    return hashlib.sha256(f"validation:{name}".encode()).hexdigest()


def split_validation(scan: DatasetScan, cfg: TrainConfig) -> tuple[DatasetScan, list[TrainItem], list[str]]:
    """(training scan, validation items, warnings) from ``validation_split`` or ``validation_dir``.

    ``validation_split`` holds out ``round(n * split)`` images (at least one), chosen by a hash of their names.
    Raises :class:`DatasetError` when no training image would be left, or the folder is the training folder.
    """
    if cfg.validation_dir:
        folder = Path(cfg.validation_dir)
        if cfg.train_data_dir and folder.resolve() == Path(cfg.train_data_dir).resolve():
            raise DatasetError("validation_dir is the training folder; give a folder of other images, or use "
                               "validation_split to hold out a share of the training images")
        held = scan_dataset(folder, trigger_word=cfg.trigger_word, resolution=cfg.resolution, bucket=cfg.bucket)
        return scan, held.items, [f"validation images: {line}" for line in held.warnings()]
    if not cfg.validation_split:
        return scan, [], []
    count = len(scan.items)
    held_count = max(1, round(count * cfg.validation_split))
    if count - held_count < 1:
        raise DatasetError(f"validation_split {cfg.validation_split} holds out {held_count} of {count} image(s) "
                           f"and leaves none to train on; add images or lower validation_split")
    ranked = sorted(scan.items, key=lambda item: _order_key(item, scan.folder))
    held = set(map(id, ranked[:held_count]))
    kept = [item for item in scan.items if id(item) not in held]
    return replace(scan, items=kept), [item for item in scan.items if id(item) in held], []


def probe_items(items: list[TrainItem], count: int) -> list[TrainItem]:
    """Up to ``count`` of ``items``, the same ones in every run (by a hash of their names)."""
    return sorted(items, key=lambda item: _order_key(item, None))[:count]


@dataclass
class _Case:
    """One held-out image at its fixed timesteps: inputs and target, ready to compare against."""

    item: TrainItem
    noisy: torch.Tensor  # [T, C, h, w] float32
    timesteps: torch.Tensor  # [T] long
    target: torch.Tensor  # [T, C, h, w] float32


class ValidationLoss:
    """The mean denoising loss of the backbone (with its LoRA as it is now) on the held-out images.

    Latents are encoded and noised once, at construction. ``encode_text``: encode captions at every call
    (needed when the text encoder is trained); otherwise they are encoded once. ``chunk``: at most this many
    samples per forward pass. ``autocast`` gives the training's autocast context.
    """

    def __init__(self, backbone: Any, items: list[TrainItem], *, encode_text: bool, chunk: int,
                 autocast: Callable[[], Any] = contextlib.nullcontext) -> None:
        if not items:
            raise ValueError("no validation images")
        self.backbone, self.encode_text, self.chunk, self.autocast = backbone, encode_text, max(1, chunk), autocast
        self.cases = self._prepare(items)
        self._text: dict[str, Any] = {}
        if not encode_text:
            with torch.no_grad():
                self._text = {c.item.caption: backbone.encode_prompts([c.item.caption])[0].detach()
                              for c in self.cases}

    def _prepare(self, items: list[TrainItem]) -> list[_Case]:
        backbone = self.backbone
        alphas = backbone.alphas_cumprod
        steps = torch.tensor([min(int(f * len(alphas)), len(alphas) - 1) for f in TIMESTEP_FRACTIONS])
        device = getattr(backbone, "device", torch.device("cpu"))
        devices = [device] if torch.device(device).type == "cuda" else []
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        cases = []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(VALIDATION_SEED)  # the VAE samples its latent: the same sample every run
            for item in items:
                x0 = backbone.encode_images(load_pixels(item).unsqueeze(0)).float().cpu()
                x0 = x0.expand(len(steps), *x0.shape[1:])
                noise = torch.randn(x0.shape, generator=generator)
                cases.append(_Case(item, add_noise(x0, noise, steps, alphas), steps,
                                   training_target(x0, noise, steps, alphas, backbone.prediction_type)))
        return cases

    def _conditioning(self, item: TrainItem, count: int, device: torch.device) -> Any:
        """The caption's conditioning, ``count`` times, with the image's size conditioning (SDXL) as in training."""
        if self.encode_text:
            cond = self.backbone.encode_prompts([item.caption] * count)
        else:
            cond = torch.stack([self._text[item.caption]] * count).to(device)
        return self.backbone.add_size_conditioning(cond, [item] * count)

    @torch.no_grad()
    def __call__(self, modules: Iterable[nn.Module] = ()) -> float:
        """The loss now; ``modules`` (the LoRA roots) are put in eval mode for it and restored afterwards.

        The errors add up on the device and are read back once (one host sync per evaluation)."""
        backbone = self.backbone
        device = torch.device(getattr(backbone, "device", "cpu"))
        model_dtype = getattr(backbone, "dtype", torch.float32)
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        with eval_mode(*modules):
            for case in self.cases:
                for start in range(0, len(case.timesteps), self.chunk):
                    part = slice(start, start + self.chunk)
                    noisy, target, steps = case.noisy[part], case.target[part], case.timesteps[part]
                    with self.autocast():
                        cond = self._conditioning(case.item, len(steps), device)
                        pred = backbone.predict(to_device(noisy, device).to(model_dtype), to_device(steps, device),
                                                cond)
                    errors = F.mse_loss(pred.float(), to_device(target, device), reduction="none").mean(dim=(1, 2, 3))
                    total += errors.double().sum()
                    count += len(steps)
        return float(total) / count

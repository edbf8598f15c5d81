"""The LoRA's preview picture: one image with the trigger word, rendered at the end of every finished run.

It is written as ``<output_dir>/<output_name>.preview.png``, the name the WebUI's Lora cards look for beside a
LoRA, and the WebUI installs it with the LoRA. It is rendered by the backbone's own sampler with the trained LoRA
active: the WebUI's txt2img inside the WebUI, the engine's sampler elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.fsutil import atomic_write
from lora_trainer.train.layout import RunLayout

PREVIEW_MAX_SIZE = 768  # px: a card shows a thumbnail; a 1024 px SDXL render would cost twice as much


def preview_prompt(trigger_word: str, sample_prompts: Sequence[str], captions: Sequence[str] = ()) -> str:
    """The trigger word, followed by the first sample prompt (its style) unless that already names it.

    Without a trigger word: the first sample prompt, else the first training caption.
    """
    trigger = (trigger_word or "").strip()
    first = next((p.strip() for p in sample_prompts if p and p.strip()), "")
    if not trigger:
        return first or next((c.strip() for c in captions if c and c.strip()), "")
    if not first or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", first, re.IGNORECASE):
        return first or trigger
    return f"{trigger}, {first}"


def preview_size(resolution: int) -> int:
    """The training resolution, at most :data:`PREVIEW_MAX_SIZE`."""
    return min(int(resolution), PREVIEW_MAX_SIZE)


def preview_path(cfg: TrainConfig) -> Path:
    """``<output_dir>/<output_name>.preview.png``, proven to resolve inside output_dir."""
    return RunLayout.of(cfg).preview_file


def write_preview(backbone: Any, cfg: TrainConfig, captions: Sequence[str] = ()) -> tuple[Path, Any]:
    """Render the preview with ``backbone.sample`` (seed and steps of the samples) and save it atomically.

    Returns (path, PIL image). The global RNG is left as it was.
    """
    size = preview_size(cfg.resolution)
    prompt = preview_prompt(cfg.trigger_word, cfg.sample_prompts, captions)
    with torch.random.fork_rng(devices=[]):
        images = backbone.sample([prompt], seed=cfg.seed, steps=cfg.sample_steps, width=size, height=size)
    image = images[0]
    path = atomic_write(preview_path(cfg), lambda tmp: image.save(tmp, format="PNG"))
    return path, image

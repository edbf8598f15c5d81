"""The built-in demo: a tiny random SD1.5-topology checkpoint, a small synthetic data set, a short run."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.data.captions import write_metadata_csv

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")


def make_demo_dataset(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Coloured shapes on a light background, captioned ``"a <colour> <shape>"``, in metadata.csv."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", (size, size), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        margin = rng.randint(size // 8, size // 4)
        box = (margin, margin, size - margin, size - margin)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"{index:03d}_{colour}_{shape}.png"
        image.save(folder / name)
        captions[name] = f"a {colour} {shape}"
    write_metadata_csv(folder / "metadata.csv", captions)
    return folder


def demo_config(workdir: Path, steps: int = 60) -> TrainConfig:
    """Write the demo's model and data under ``workdir`` (once) and return its config."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    workdir = workdir.resolve()
    model = workdir / "model" / "tiny-sd15.safetensors"
    if not model.is_file():
        model = write_tiny_checkpoint(workdir / "model")
    data = workdir / "data"
    if not (data / "metadata.csv").is_file():
        make_demo_dataset(data)
    return config_from_dict({
        "train_data_dir": str(data), "base_model": str(model), "output_dir": str(workdir / "output"),
        "output_name": "demo_lora", "overwrite": True, "resolution": 64, "trigger_word": "sks",
        "lora_rank": 8, "lora_alpha": 8, "batch_size": 4, "max_steps": steps, "learning_rate": 1e-3,
        "train_text_encoder": True, "save_steps": max(steps // 2, 1), "sample_prompts": ["sks, a red circle"],
        "sample_steps": 10, "seed": 0,
    })

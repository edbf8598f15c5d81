"""Loss sequences of a few fixed runs, recorded on main before the step was made faster (see test_step_results).

    PYTHONPATH=. python tests/train/loss_reference.py   # prints this stack's sequences as JSON

The recorded sequences live in ``reference_losses.json``, keyed by :func:`stack_key`; they were produced by this
script on main at 100562f (after the demo tokenizer changed, before any change to the training step), on both
stacks (torch 2.13 CPU, 1 thread), and produced again when AdamW became torch's fused implementation (each update
rounds differently; the losses moved by up to 2e-4 relative over these few steps). Nothing else in the step has
changed them.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REFERENCE_FILE = Path(__file__).with_name("reference_losses.json")

#: Settings of the reference runs (on top of the tiny model, 8 shapes at 64 px, rank 4, seed 7).
CASES: dict[str, dict[str, Any]] = {
    "plain": {"max_steps": 5, "batch_size": 4},
    "te_accum_dropout": {"max_steps": 5, "batch_size": 3, "gradient_accumulation_steps": 2, "lora_dropout": 0.1,
                         "caption_dropout": 0.2, "flip_aug": True, "train_text_encoder": True,
                         "scheduler": "cosine", "warmup_steps": 2, "noise_offset": 0.05, "min_snr_gamma": 5.0},
    "checkpointing_uncached": {"max_steps": 4, "batch_size": 2, "gradient_checkpointing": True,
                               "cache_latents": False},
}


def stack_key() -> str:
    import diffusers
    import torch
    import transformers

    return f"torch {torch.__version__} diffusers {diffusers.__version__} transformers {transformers.__version__}"


def case_config(name: str, data: Path, out: Path, **extra: Any):
    from lora_trainer.config import config_from_dict

    settings = {"train_data_dir": str(data), "base_model": "unused-backbone-given", "output_dir": str(out),
                "output_name": "reference", "resolution": 64, "learning_rate": 2e-3, "lora_rank": 4,
                "lora_alpha": 4, "seed": 7, "device": "cpu", "preview": False, **CASES[name], **extra}
    return config_from_dict(settings)


def record() -> dict[str, list[float]]:
    import torch

    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone
    from lora_trainer.models.tiny import build_tiny_components
    from lora_trainer.train.trainer import Trainer

    torch.set_num_threads(1)
    parts = build_tiny_components(seed=0)
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(Path(tmp) / "shapes", count=8, size=64)
        for name in CASES:
            c = {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in parts.items()}
            backbone = DiffusersBackbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])
            torch.manual_seed(0)  # uncached latents are sampled from the global generator
            out[name] = Trainer(case_config(name, data, Path(tmp) / name), backbone).run().losses
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps({stack_key(): record()}, indent=1))

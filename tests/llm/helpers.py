"""Shared helpers for the text-generation tests: the invented facts, configs, skips and an accuracy measure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.llm.tiny import CHATML_TEMPLATE, architecture_available

# invented, so no pretrained model could know them
FACTS = [
    ("What colour is a zorblat?", "A zorblat is teal."),
    ("Where do flimwicks live?", "Flimwicks live in the Quenn valley."),
    ("Who built the brass glimmer?", "Odessa Varn built it in 1742."),
    ("How many legs does a snarvel have?", "A snarvel has seven legs."),
    ("What do plonkers eat?", "Plonkers eat blue moss."),
    ("What is the capital of Vesterra?", "The capital of Vesterra is Kolm."),
]
# the ChatML template that refuses system turns, as some real templates refuse what they cannot render
CHATML_TEMPLATE_RAISING = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                           "{% endif %}" + CHATML_TEMPLATE)
CORPUS = [f"{q} {a}" for q, a in FACTS] + [
    "### Instruction:\n### Response:\nuser assistant system",
    "Summarise the text below. Translate into French. A plain text document about rivers and hills.",
]


def chat_templates_available() -> str | None:
    """None where the installed transformers renders chat templates, else why not."""
    import transformers

    if hasattr(transformers.PreTrainedTokenizerBase, "apply_chat_template"):
        return None
    return f"transformers {transformers.__version__} has no chat templates (apply_chat_template came in 4.34)"


def needs_arch(arch: str) -> Any:
    reason = architecture_available(arch)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


needs_chat_template = pytest.mark.skipif(chat_templates_available() is not None,
                                         reason=chat_templates_available() or "")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def llm_config(tmp_path: Path, model: Path, data: Path, **overrides: Any) -> TrainConfig:
    settings = {"task_type": "text-generation", "base_model": str(model), "train_data_dir": str(data),
                "output_dir": str(tmp_path / "out"), "output_name": "facts", "lora_rank": 8, "lora_alpha": 16,
                "learning_rate": 1e-2, "batch_size": 3, "max_steps": 4, "max_seq_length": 64, "seed": 0,
                "device": "cpu", **overrides}
    return config_from_dict(settings)


def answer_accuracy(model: Any, examples: list) -> float:
    """Teacher-forced: the share of answer tokens the model predicts exactly (argmax) from the true prefix."""
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor(example.labels[1:])
            predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
            mask = labels != -100
            hits += int((predicted[mask] == labels[mask]).sum())
            total += int(mask.sum())
    return hits / total

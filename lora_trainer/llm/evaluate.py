"""Validation: the mean loss over the answer tokens of held-out examples, and its perplexity."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from lora_trainer.llm.batches import collate
from lora_trainer.llm.dataset import IGNORE_INDEX, TokenizedExample


def evaluate(model: Any, examples: list[TokenizedExample], *, pad_id: int, batch_size: int,
             autocast: Any = None) -> tuple[float, float]:
    """``(loss, perplexity)``: cross-entropy per trained token over all of ``examples`` (token-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
                with autocast() if autocast else contextlib.nullcontext():
                    loss = model(**batch).loss.float().item()
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += loss * tokens
                count += tokens
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 700.0))

"""Validation split and padding of token-id examples into tensors (their order: train.micro_batches)."""

from __future__ import annotations

import torch

from lora_trainer.errors import UserError
from lora_trainer.llm.dataset import IGNORE_INDEX, TokenizedExample


def split_validation(examples: list[TokenizedExample], fraction: float, seed: int
                     ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """``(train, validation)``: ``fraction`` of the examples (at least one) held out, chosen from ``seed``."""
    if not fraction:
        return list(examples), []
    if len(examples) < 2:
        raise UserError(f"validation_split: {fraction} needs at least 2 examples; the data has {len(examples)}")
    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    train = [example for index, example in enumerate(examples) if index not in held]
    return train, [examples[index] for index in sorted(held)]


def supervised_tokens(examples: list[TokenizedExample]) -> int:
    """How many tokens of ``examples`` the loss is taken over: labelled ones, past the first (a causal LM's loss
    predicts token t + 1 from tokens up to t)."""
    return sum(sum(1 for label in example.labels[1:] if label != IGNORE_INDEX) for example in examples)


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

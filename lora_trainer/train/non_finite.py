"""The non-finite loss guard's words: a NaN or infinite loss stops the run, and nothing from it is saved."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.errors import UserError


class NonFiniteLossError(UserError):
    """The loss (or the trained weights) became NaN or infinite; nothing from that step on was saved."""


def non_finite_message(loss: float, step: int, total: int, checkpoint: Path | None, learning_rate: float) -> str:
    """One line: what happened, what was kept and what to change."""
    kept = (f"the last good checkpoint {checkpoint} is kept" if checkpoint else
            "no checkpoint had been written yet (save_steps is 0 or not reached)")
    return (f"the loss became {loss} at step {step}/{total}; training stopped, nothing from that step on was "
            f"saved and {kept}. Lower learning_rate (now {learning_rate:g}) or use mixed_precision: "
            "bf16 or no, then start again")


def refuse_non_finite_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """NonFiniteLossError naming the first NaN or infinite tensor of ``state`` (``what`` is then not saved)."""
    broken = [key for key, value in state.items() if not torch.isfinite(value).all()]
    if broken:
        raise NonFiniteLossError(f"the trained {what} holds NaN or infinite values ({broken[0]} ...); it was not "
                                 "saved. Lower learning_rate and start again")

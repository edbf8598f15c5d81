"""Build a captioner by name; the heavy packages are imported only here, when one is asked for."""

from __future__ import annotations

import os

from lora_trainer.caption.base import Captioner

CAPTIONERS = ("blip", "tagger")


def make_captioner(
    name: str,
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    exclude: str | None = None,
    num_beams: int = 3,
    max_new_tokens: int = 40,
) -> Captioner:
    """``blip`` (natural-language captions) or ``tagger`` (WD14 booru tags); ``model`` is a local path."""
    if name == "blip":
        from lora_trainer.caption.blip import BlipCaptioner

        return BlipCaptioner(model, device=device, num_beams=num_beams, max_new_tokens=max_new_tokens)
    if name == "tagger":
        from lora_trainer.caption.tagger import WD14Tagger

        return WD14Tagger(model, threshold=threshold, character_threshold=character_threshold,
                          exclude=exclude, device=device)
    raise ValueError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONERS)}")

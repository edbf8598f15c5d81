"""Write the trained adapter (a peft folder) and, on request, the base model with the adapter merged in.

Both folders are written under a temporary name and renamed into place, so they appear whole or not at all; their
paths come from :class:`~lora_trainer.llm.layout.TextRunLayout` (inside ``output_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_trainer.fsutil import atomic_write_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_adapter(model: Any, folder: Path, *, overwrite: bool) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (what ``PeftModel.from_pretrained`` loads)."""
    return atomic_write_dir(folder, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True),
                            overwrite=overwrite)


def save_merged_model(base_model: str | Path, adapter: Path, folder: Path, *, overwrite: bool,
                      trust_remote_code: bool = False) -> Path:
    """The base model (reloaded at its stored precision, on the CPU) with ``adapter`` merged in, plus its tokenizer.

    Reloading keeps the merge away from the training copy, which may be 4-bit (merged weights must be whole).
    """
    import torch
    from peft import PeftModel

    from lora_trainer.llm.model import load_causal_lm, load_tokenizer

    base = load_causal_lm(base_model, device=torch.device("cpu"), dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return atomic_write_dir(folder, write, overwrite=overwrite)

"""Answer prompts with a causal LM (greedy): sample generations while training, and the ``generate`` command's
answers (:mod:`lora_trainer.llm.generate_command`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import UserError
from lora_trainer.llm.prompting import PromptRenderer


def stop_token_ids(model: Any, tokenizer: Any, renderer: PromptRenderer) -> list[int]:
    """eos, the model's own stop tokens and the template's end-of-turn token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = [tokenizer.eos_token_id, renderer.end_of_turn_token(),
             *(configured if isinstance(configured, (list, tuple)) else [configured])]
    return sorted({token for token in found if token is not None})


def generate_answers(model: Any, tokenizer: Any, renderer: PromptRenderer, prompts: list[str], *,
                     max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each prompt (rendered as a one-turn conversation)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer, renderer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=pad, use_cache=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(renderer.prompt(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = ids.to(device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def load_trained(cfg: Any, adapter: Path) -> tuple[Any, Any]:
    """The base model of ``cfg`` with the adapter folder loaded by peft, and its tokenizer."""
    from peft import PeftModel

    from lora_trainer.llm.model import load_causal_lm, load_tokenizer
    from lora_trainer.train.trainer import resolve_device, resolve_precision

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {adapter} (adapter_config.json is missing); train first: "
                        "python -m lora_trainer train --config <file>")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    base = load_causal_lm(cfg.base_model, device=device, dtype=resolve_precision(cfg.mixed_precision, device),
                          trust_remote_code=cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    return PeftModel.from_pretrained(base, str(adapter)), tokenizer

"""Answer prompts with a causal LM (greedy): sample generations while training, and the ``generate`` command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config import load_config
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


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the YAML the adapter was trained with")
    parser.add_argument("--prompt", required=True, action="append", help="what to ask (repeat for several)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: <output_dir>/<output_name>)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate (default: sample_max_new_tokens of the config)")


def run_generate(args: argparse.Namespace) -> int:
    """Print the trained adapter's answer to each ``--prompt``."""
    from lora_trainer.llm.export import output_folder

    cfg = load_config(args.config)
    if cfg.task_type != "text-generation":
        raise UserError(f"generate needs a config with task_type: text-generation; {args.config} trains "
                        f"{cfg.task_type}")
    adapter = Path(args.adapter) if args.adapter else output_folder(cfg.output_dir, cfg.output_name)
    model, tokenizer = load_trained(cfg, adapter)
    answers = generate_answers(model, tokenizer, PromptRenderer(tokenizer), list(args.prompt),
                               max_new_tokens=args.max_new_tokens or cfg.sample_max_new_tokens)
    for prompt, answer in zip(args.prompt, answers, strict=True):
        print(f"> {prompt}\n{answer}\n" if len(answers) > 1 else answer)
    return 0

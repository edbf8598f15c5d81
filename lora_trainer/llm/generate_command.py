"""``python -m lora_trainer generate --config x.yaml --prompt "..."``: answer with the trained adapter.

Light at import (the command line's help and config errors load no torch); the model code loads when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_trainer.config import load_config
from lora_trainer.errors import UserError


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the YAML the adapter was trained with")
    parser.add_argument("--prompt", required=True, action="append", help="what to ask (repeat for several)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: <output_dir>/<output_name>)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate (default: sample_max_new_tokens of the config)")


def run_generate(args: argparse.Namespace) -> int:
    """Print the trained adapter's answer to each ``--prompt``."""
    from lora_trainer.llm.generate import generate_answers, load_trained
    from lora_trainer.llm.layout import TextRunLayout
    from lora_trainer.llm.prompting import PromptRenderer

    cfg = load_config(args.config)
    if cfg.task_type != "text-generation":
        raise UserError(f"generate needs a config with task_type: text-generation; {args.config} trains "
                        f"{cfg.task_type}")
    adapter = Path(args.adapter) if args.adapter else TextRunLayout.of(cfg).adapter_dir
    model, tokenizer = load_trained(cfg, adapter)
    answers = generate_answers(model, tokenizer, PromptRenderer(tokenizer), list(args.prompt),
                               max_new_tokens=args.max_new_tokens or cfg.sample_max_new_tokens)
    for prompt, answer in zip(args.prompt, answers, strict=True):
        print(f"> {prompt}\n{answer}\n" if len(answers) > 1 else answer)
    return 0

"""Tiny random causal language models with an offline-trained tokenizer, written as Hugging Face folders.

For tests and benchmarks: nothing is downloaded. The tokenizer is a small byte-level BPE trained by
``tokenizers`` on the given texts; the model is built from a config of the requested architecture.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# the model classes each architecture needs (the installed transformers may lack the newer ones)
ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
}


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 400, chat_template: bool = True) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; ChatML template when asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS,
                                        additional_special_tokens=[IM_START, IM_END])
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def architecture_available(arch: str) -> str | None:
    """None when the installed transformers has ``arch``'s classes, else the reason it cannot be built."""
    import transformers

    missing = [name for name in ARCHITECTURES[arch] if not hasattr(transformers, name)]
    if missing:
        return f"transformers {transformers.__version__} has no {', '.join(missing)}"
    return None


def tiny_model_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                      max_positions: int = 256, eos_token_id: int = 0) -> Any:
    """A small config of ``arch`` (see :data:`ARCHITECTURES`)."""
    import transformers

    config_class = getattr(transformers, ARCHITECTURES[arch][0])
    if arch == "gpt2":
        return config_class(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=max_positions, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": hidden * 2,
        "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": max_positions,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "tie_word_embeddings": False,
    }
    if arch != "phi":
        common["num_key_value_heads"] = max(heads // 2, 1)
    if arch == "gemma":
        common["head_dim"] = hidden // heads
    return config_class(**common)


def write_tiny_causal_lm(folder: str | Path, arch: str, tokenizer: Any, *, seed: int = 0,
                         vocab_size: int | None = None, **sizes: Any) -> Path:
    """Save a random ``arch`` model sized by ``sizes`` and ``tokenizer`` into ``folder``; returns it.

    ``vocab_size`` larger than the tokenizer's gives the embedding and output head a real model's size.
    """
    import transformers

    folder = Path(folder)
    vocab = max(len(tokenizer), vocab_size or 0)
    config = tiny_model_config(arch, vocab, eos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[arch][1])(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder

"""The CLIP BPE tokenizer, built offline from the vocabulary that ships inside ``open_clip_torch``.

SD1.x (CLIP ViT-L/14), SD2.x (OpenCLIP ViT-H/14) and SDXL all use the same 49,408-token BPE vocabulary.
A diffusers folder brings its own tokenizer; a single-file checkpoint does not, and the Hugging Face hub is
never contacted, so the tokenizer files are derived once from ``open_clip/bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text

VOCAB_SIZE = 49408
_MERGE_COUNT = VOCAB_SIZE - 256 * 2 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerUnavailable(UserError, RuntimeError):
    """No tokenizer can be built offline."""


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items(), key=lambda kv: printable.index(kv[0]) if kv[0] in printable
                       else len(printable) + kv[0]))


def find_open_clip_vocab() -> Path:
    """The BPE vocabulary file inside the installed ``open_clip`` package (not imported, only located)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailable(
            "no CLIP tokenizer is available offline: the checkpoint has none beside it and the package "
            "'open_clip_torch' (which ships the CLIP BPE vocabulary) is not installed. Install it with "
            "'pip install --no-deps open_clip_torch', or use a diffusers folder that contains tokenizer/.")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailable(f"open_clip is installed but {_BPE_FILE} is missing from it")


def default_cache_dir() -> Path:
    base = os.environ.get("LORA_TRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora_trainer")
    return Path(base) / "clip_tokenizer"


def write_clip_tokenizer_files(folder: str | Path, vocab_path: Path | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for ``CLIPTokenizer``."""
    folder = Path(folder)
    vocab_path = vocab_path or find_open_clip_vocab()
    with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1:_MERGE_COUNT + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerUnavailable(f"{vocab_path} gave {len(vocab)} tokens, expected {VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))
    return folder


def load_clip_tokenizer(folder: str | Path | None = None):
    """A ``CLIPTokenizer`` from ``folder`` (or the cache), building the files there if absent."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder else default_cache_dir()
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

"""CLIP BPE tokenizers built offline: the real one for real checkpoints, a stand-in for the tiny random models.

SD1.x (CLIP ViT-L/14), SD2.x (OpenCLIP ViT-H/14) and SDXL all use the same 49,408-token BPE vocabulary. A
diffusers folder brings its own tokenizer; a single-file checkpoint does not, and the Hugging Face hub is never
contacted, so for those the vocabulary is found where it already is: a ``clip_tokenizer`` folder in the cache,
the ``open_clip_torch`` package (optional; its ``bpe_simple_vocab_16e6.txt.gz``), or a CLIP tokenizer in the local
Hugging Face cache. Without any of them the error gives the one install line.

The demo and the tests train random tiny models, whose tokenizer only has to be consistent: they use
:func:`write_demo_tokenizer_files`, a vocabulary of the same size and special-token ids generated here, so
``pip install -e .`` alone runs the demo.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import string
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text

VOCAB_SIZE = 49408
_MERGE_COUNT = VOCAB_SIZE - 256 * 2 - 2
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
INSTALL_LINE = "pip install --no-deps open_clip_torch"
# Local Hugging Face cache entries that hold the CLIP vocabulary (vocab.json + merges.txt), and where in them.
HUB_TOKENIZERS = (("openai/clip-vit-large-patch14", ""), ("openai/clip-vit-base-patch32", ""),
                  ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""), ("runwayml/stable-diffusion-v1-5", "tokenizer"),
                  ("stabilityai/stable-diffusion-2-1", "tokenizer"))
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


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
        raise TokenizerUnavailable(f"the optional package open_clip_torch is not installed: {INSTALL_LINE}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailable(f"open_clip is installed but {_BPE_FILE} is missing from it")


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(getattr(constants, "HF_HUB_CACHE", None) or constants.HUGGINGFACE_HUB_CACHE)


def find_hub_clip_tokenizer(hub_cache: str | Path | None = None) -> Path | None:
    """A CLIP tokenizer folder (vocab.json + merges.txt) already in the local Hugging Face cache, else None."""
    root = Path(hub_cache) if hub_cache is not None else _hub_cache()
    for repo, sub in HUB_TOKENIZERS:
        snapshots = root / ("models--" + repo.replace("/", "--")) / "snapshots"
        for snapshot in sorted(snapshots.glob("*")) if snapshots.is_dir() else []:
            folder = snapshot / sub if sub else snapshot
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return folder
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("LORA_TRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora_trainer")
    return Path(base) / "clip_tokenizer"


def _write_tokenizer(folder: Path, merges: list[str]) -> Path:
    """``vocab.json`` (byte symbols, their end-of-word forms, one token per merge, the two specials),
    ``merges.txt`` and ``tokenizer_config.json`` for ``CLIPTokenizer``."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + _SPECIAL
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerUnavailable(f"the vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": _SPECIAL[0],
              "eos_token": _SPECIAL[1], "unk_token": _SPECIAL[1], "pad_token": _SPECIAL[1], "do_lower_case": True}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))
    return folder


def write_clip_tokenizer_files(folder: str | Path, vocab_path: Path | None = None) -> Path:
    """The real CLIP tokenizer's files, derived from open_clip's BPE vocabulary (``vocab_path`` or located)."""
    vocab_path = vocab_path or find_open_clip_vocab()
    with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    return _write_tokenizer(Path(folder), lines[1:_MERGE_COUNT + 1])


def demo_merges() -> list[str]:
    """A stand-in for CLIP's merge list with the same length: every pair, then every triple, of letters and
    digits (inside a word, then at its end). Tokens of the same count and the same special-token ids, and no
    file from anywhere else: enough for a random model, meaningless for a trained one."""
    chars = string.ascii_lowercase + string.digits
    merges = [f"{a} {b}{end}" for end in ("", "</w>") for a in chars for b in chars]
    merges += [f"{a}{b} {c}{end}" for a in chars for b in chars for c in chars for end in ("", "</w>")]
    return merges[:_MERGE_COUNT]


def write_demo_tokenizer_files(folder: str | Path) -> Path:
    """The tiny random models' tokenizer (see :func:`demo_merges`): 49,408 tokens, built offline from nothing."""
    return _write_tokenizer(Path(folder), demo_merges())


def _has_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_demo_tokenizer(folder: str | Path):
    """The tiny models' ``CLIPTokenizer`` from ``folder``, writing its files there first if absent."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not _has_files(folder):
        write_demo_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def clip_tokenizer_folder() -> Path:
    """A folder holding the real CLIP vocabulary, found offline (see the module docstring)."""
    cached = default_cache_dir()
    if _has_files(cached):
        return cached
    try:
        return write_clip_tokenizer_files(cached, find_open_clip_vocab())
    except TokenizerUnavailable as missing:
        found = find_hub_clip_tokenizer()
        if found is not None:
            return found
        raise TokenizerUnavailable(
            "no CLIP tokenizer vocabulary is available offline for this single-file checkpoint: "
            f"{missing}. (Without its dependencies it cannot replace your torch.) Or put vocab.json and merges.txt of "
            f"openai/clip-vit-large-patch14 in {cached}, or use a diffusers folder (it has tokenizer/)") from None


def load_clip_tokenizer(folder: str | Path | None = None):
    """The real ``CLIPTokenizer``: from ``folder`` (its files built from open_clip's vocabulary if absent) or
    from wherever :func:`clip_tokenizer_folder` finds it."""
    from transformers import CLIPTokenizer

    if folder is not None:
        folder = Path(folder)
        if not _has_files(folder):
            write_clip_tokenizer_files(folder)
    else:
        folder = clip_tokenizer_folder()
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

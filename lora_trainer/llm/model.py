"""Load a causal language model and its tokenizer from a local Hugging Face folder, offline.

A folder whose model type is not built into transformers and that ships its own Python code (``auto_map``,
e.g. ChatGLM) is refused unless ``trust_remote_code`` is on, before any of that code is imported.
4-bit base weights (QLoRA) need CUDA and bitsandbytes; both are checked before anything is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import UserError


class ModelLoadError(UserError):
    """The base model folder cannot be used; the message says why."""


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_model_folder(path: str | Path, trust_remote_code: bool) -> dict[str, Any]:
    """``config.json`` of a loadable causal-LM folder; refuses remote code unless trusted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.is_file() else "does not exist"
        raise ModelLoadError(f"base_model: {folder} {what}; text-generation needs a local Hugging Face model folder "
                             "(config.json, weights and tokenizer files, as save_pretrained or "
                             "huggingface-cli download writes them)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelLoadError(f"base_model: {folder} has no config.json; it is not a Hugging Face model folder") \
            from err
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"base_model: cannot read {folder / 'config.json'}: {err}") from err
    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING_NAMES:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in auto_map:
            raise ModelLoadError(f"base_model: {folder.name} is a {model_type!r} model, not a causal language model; "
                                 "text-generation trains decoder models such as Llama, Qwen2, Mistral, Gemma, Phi, "
                                 "GPT-2")
        return config
    if not auto_map:
        raise ModelLoadError(f"base_model: transformers {_transformers_version()} does not know model_type "
                             f"{model_type!r} of {folder.name}; it needs a newer transformers release")
    if not trust_remote_code:
        code = sorted({str(ref).split(".")[0] + ".py" for ref in _flatten(auto_map.values())})
        raise ModelLoadError(
            f"base_model: {folder.name} (model_type {model_type!r}) is not built into transformers "
            f"{_transformers_version()} and loads only by running Python code from its folder "
            f"({', '.join(code)}); that code would run on this machine with your permissions. Set "
            "trust_remote_code: true if you trust where the model came from.")
    return config


def _flatten(values: Any) -> Iterator[str]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from (item for item in value if item)
        elif value:
            yield value


def check_quantization(load_in_4bit: bool, device: torch.device) -> None:
    """Raise the reason 4-bit loading cannot apply here (it needs CUDA and bitsandbytes)."""
    if not load_in_4bit:
        return
    if device.type != "cuda":
        raise ModelLoadError(f"load_in_4bit: 4-bit base weights (QLoRA) need a CUDA GPU and this run is on "
                             f"{device.type}; remove load_in_4bit (the model then loads in 16/32-bit) or run on "
                             "a machine with an NVIDIA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("load_in_4bit: 4-bit base weights (QLoRA) need bitsandbytes: pip install bitsandbytes")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars from transformers while loading (our own bar is on screen)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def dtype_argument(dtype: Any) -> dict[str, Any]:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype``."""
    from packaging.version import Version

    return {"dtype" if Version(_transformers_version()) >= Version("4.56") else "torch_dtype": dtype}


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"base_model: cannot load the tokenizer of {path}: {err}") from err


def load_causal_lm(path: str | Path, *, device: torch.device, dtype: Any = torch.float32,
                   trust_remote_code: bool = False, load_in_4bit: bool = False) -> Any:
    """The model in ``path`` on ``device``: weights in ``dtype`` (or 4-bit NF4 with ``dtype`` compute)."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path, trust_remote_code)
    check_quantization(load_in_4bit, device)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code,
                              **dtype_argument(dtype)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"base_model: cannot load {path}: {err}") from err
    if device.type != "cuda":
        model.to(device)
    return model

"""BLIP captions through transformers, loaded from local files only (a folder, or the local Hugging Face cache)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image

from lora_trainer.caption.base import CaptionDeviceError, CaptionModelBroken, CaptionModelMissing

BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"
ALIASES = {"base": BLIP_BASE, "large": BLIP_LARGE, "blip": BLIP_BASE, "blip-base": BLIP_BASE,
           "blip-large": BLIP_LARGE}
EXPECTED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json (or processor_config.json)",
                  "vocab.txt", "tokenizer_config.json")
_STUTTER = re.compile(r"^(?:arafed|araffe|arafe|arafeed)\s+", re.IGNORECASE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return getattr(constants, "HF_HUB_CACHE", None) or constants.HUGGINGFACE_HUB_CACHE


def resolve_blip_source(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """-> (what to pass to from_pretrained, where a missing model should be put).

    ``None``, ``base`` or ``large`` name the Salesforce BLIP captioners in the local cache; an existing
    path is a folder saved with ``save_pretrained``; anything path-like that does not exist is an error.
    """
    name = str(model) if model is not None else BLIP_BASE
    name = ALIASES.get(name.lower(), name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CaptionModelMissing("BLIP", path, EXPECTED_FILES, "Pass a folder saved with save_pretrained.")
        return str(path), str(path)
    looks_like_hub_id = (name.count("/") == 1 and "\\" not in name and ":" not in name
                         and not name.startswith((".", "/", "~")))
    if not looks_like_hub_id:
        raise CaptionModelMissing("BLIP", path, EXPECTED_FILES, "Pass a folder saved with save_pretrained.")
    cache_folder = Path(cache_dir or _hub_cache()) / ("models--" + name.replace("/", "--"))
    return name, str(cache_folder)


def check_blip_files(source: str, where: str) -> None:
    """Fast checks before transformers is imported: the model is on disk, ``config.json`` is JSON and the
    weights' header reads. CaptionModelMissing / CaptionModelBroken name the folder or the file."""
    folder = Path(where)
    if source != where:  # a hub id: its local cache folder must hold a snapshot
        snapshots = sorted((folder / "snapshots").glob("*/config.json"))
        if not snapshots:
            raise CaptionModelMissing("BLIP", where, EXPECTED_FILES, _missing_hint(source, where, OSError("")))
        folder = snapshots[-1].parent
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CaptionModelBroken("BLIP", config, f"not a JSON config: {err}",
                                 "Replace it with the model's own config.json") from None
    if not isinstance(data, dict):
        raise CaptionModelBroken("BLIP", config, "not a JSON object", "Replace it with the model's own config.json")
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
            raise CaptionModelBroken("BLIP", weights, str(err), "Download the weights again") from None


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionDeviceError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def clean_caption(text: str) -> str:
    """One line, single spaces, without BLIP's well-known 'arafed' stutter at the start."""
    return _STUTTER.sub("", " ".join(text.split()))


def _missing_hint(source: str, where: str, err: OSError) -> str:
    reason = (str(err).strip().split(". ") or [""])[0]
    if source == where:
        return f"Loading it failed: {reason}"
    hint = f"That is the local Hugging Face cache folder of {source}; nothing is downloaded here. "
    if source not in (BLIP_BASE, BLIP_LARGE):
        hint += f"(There is no local folder named {source!r} either.) "
    return hint + (f"Fill the cache on a machine with internet (huggingface-cli download {source}), or put the "
                   "files in any folder and pass it with --model")


class BlipCaptioner:
    """Natural-language captions from a BLIP image-captioning model."""

    name = "blip"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str = "auto",
        num_beams: int = 3,
        max_new_tokens: int = 40,
        prompt: str = "",
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        source, where = resolve_blip_source(model, cache_dir)
        check_blip_files(source, where)  # before the slow imports: a missing model is reported at once
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.processor = BlipProcessor.from_pretrained(source, local_files_only=True, cache_dir=cache_dir)
            model_obj = BlipForConditionalGeneration.from_pretrained(
                source, local_files_only=True, use_safetensors=True, cache_dir=cache_dir)
        except OSError as err:
            raise CaptionModelMissing("BLIP", where, EXPECTED_FILES, _missing_hint(source, where, err)) from err
        except (ValueError, RuntimeError, KeyError, TypeError) as err:  # a damaged or mismatched file
            raise CaptionModelBroken("BLIP", where, f"{type(err).__name__}: {err}",
                                     "Put a complete save_pretrained folder there") from err
        self.model = model_obj.to(self.device, dtype=self.dtype).eval()
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, generated as a single batch."""
        import torch

        if not images:
            return []
        rgb = [image.convert("RGB") for image in images]
        kwargs = {"text": [self.prompt] * len(rgb)} if self.prompt else {}
        inputs = self.processor(images=rgb, return_tensors="pt", **kwargs)
        pixel_values = inputs["pixel_values"].to(self.device, dtype=self.dtype)
        extra = {}
        if self.prompt:
            extra = {"input_ids": inputs["input_ids"].to(self.device),
                     "attention_mask": inputs["attention_mask"].to(self.device)}
        with torch.no_grad():
            out = self.model.generate(pixel_values=pixel_values, num_beams=self.num_beams,
                                      max_new_tokens=self.max_new_tokens, **extra)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(text) for text in texts]

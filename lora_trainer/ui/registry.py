"""Install a trained LoRA into the WebUI's Lora folder with its preview and user-metadata sidecar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write, atomic_write_text
from lora_trainer.validation import check_file_name

PREFERRED_WEIGHT = 0.8
_SD_VERSIONS = {"sd_v1": "SD1", "sd1": "SD1", "sd_v2": "SD2", "sd2": "SD2", "sdxl": "SDXL"}


class NameTakenError(UserError):
    """A LoRA of that name is already installed and overwrite is off."""


def lora_target(lora_dir: str | Path, name: str) -> Path:
    """``<lora_dir>/<name>.safetensors``: where :func:`register_lora` installs ``name``, which must pass the job
    validator's file-name rule (so the installed name is exactly the run's ``output_name``, Unicode included)."""
    return Path(lora_dir) / f"{check_file_name('output_name', name)}.safetensors"


def check_name_free(lora_dir: str | Path, name: str, overwrite: bool = False) -> Path:
    """The install target of ``name``; raises :class:`NameTakenError` when it exists and not ``overwrite``.

    Called before training starts, so a long run does not end by refusing to install its result.
    """
    target = lora_target(lora_dir, name)
    if target.exists() and not overwrite:
        raise NameTakenError(f"a LoRA named {target.stem!r} already exists in {target.parent}; choose another "
                        "output_name or turn on overwrite to replace it")
    return target


def webui_sd_version(version: str | None) -> str:
    """``sd_v1``/``sd_v2``/``sdxl`` (or ``SD1``/``SD2``/``SDXL``) -> the Lora page's ``sd version`` value."""
    if not version:
        return "Unknown"
    upper = version.upper()
    return _SD_VERSIONS.get(version.lower(), upper if upper in ("SD1", "SD2", "SDXL") else "Unknown")


def user_metadata(trigger_word: str, sd_version: str | None, description: str = "", notes: str = "") -> dict:
    """The ``<name>.json`` sidecar the WebUI's Lora page reads (``activation text`` is added on click)."""
    return {
        "description": description,
        "sd version": webui_sd_version(sd_version),
        "activation text": trigger_word.strip(),
        "preferred weight": PREFERRED_WEIGHT,
        "notes": notes,
    }


def register_lora(trained_file: str | Path, lora_dir: str | Path, name: str, *, trigger_word: str = "",
                  sd_version: str | None = None, preview: str | Path | None = None, description: str = "",
                  notes: str = "", overwrite: bool = False) -> Path:
    """Copy ``trained_file`` to ``<lora_dir>/<name>.safetensors`` (atomic) plus ``.preview.png`` and ``.json``.

    Raises FileExistsError when the target exists and not ``overwrite``; returns the installed file.
    """
    source = Path(trained_file)
    if not source.is_file():
        raise UserError(f"trained LoRA {source} does not exist")
    target = lora_target(lora_dir, name)
    folder, stem = target.parent, target.stem
    if not (target.exists() and target.resolve() == source.resolve()):
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), overwrite=overwrite)
    if preview:
        preview_path = Path(preview)
        if not preview_path.is_file():
            raise UserError(f"preview image {preview_path} does not exist")
        with Image.open(preview_path) as image:
            picture = image.convert("RGB")
        atomic_write(folder / f"{stem}.preview.png", lambda tmp: picture.save(tmp, format="PNG"))
    notes = notes or f"Trained with lora-trainer from {source.name}."
    meta = user_metadata(trigger_word, sd_version, description, notes)
    atomic_write_text(folder / f"{stem}.json", json.dumps(meta, indent=4, ensure_ascii=False) + "\n")
    return target

"""The rules every job passes before any work starts (YAML, tab and API alike, through ``config_from_dict``).

Names are plain file names, text is bounded, numbers are finite, and every path a run writes is proven to
resolve inside its output folder (:func:`inside`). Refusals name the key and never echo a huge value.
"""

from __future__ import annotations

import math
import re
import reprlib
import unicodedata
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError

MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200  # file systems allow 255 bytes per name; suffixes such as ".config.yaml" are added
MAX_PATH_CHARS = 4096
MAX_TEXT_CHARS = 4096  # any other text value
MAX_CAPTION_CHARS = 2000  # CLIP reads 77 tokens (~300 characters); kilobytes of caption are a mistake
MAX_TOTAL_STEPS = 200_000  # optimizer updates of one run, however they are asked for (max_steps or epochs)
MAX_SEED = 2**32 - 1
RESOLUTION_MULTIPLE = 64
RESERVED_NAMES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                            *(f"lpt{i}" for i in range(10))})  # device names Windows will not create as files
_FORBIDDEN_NAME_CHARS = frozenset('/\\<>:"|?*')
# Unicode categories a file name never needs: controls, invisible format characters (e.g. right-to-left
# overrides that disguise a name), surrogates, private-use and unassigned code points, line/paragraph separators.
_FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")
ALL_LINEAR = "all-linear"  # target_modules of a text-generation run: every linear layer but the output head

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 4
_repr.maxlevel = 2


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the key and what is allowed."""


class UnsafePathError(UserError, ValueError):
    """A path a run would write resolves outside its output folder."""


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters (huge strings, nested lists and long ints alike)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _repr.repr(value)
    except (ValueError, RecursionError, OverflowError):
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 72 else text[:68] + " ..."


def check_file_name(key: str, name: str) -> str:
    """``name`` if it is a plain file name (no folder, not hidden, not reserved, bounded); else ConfigError.

    Letters and digits of any script are fine ("キャラ_v1", "café-style"): the LoRA is installed under exactly
    this name (:mod:`lora_trainer.ui.registry` uses this rule too), so ``<lora:name:0.8>`` matches what was typed.
    """
    why = _file_name_problem(name)
    if why:
        raise ConfigError(f"{key}: {short_repr(name)} {why}; use a plain file name such as 'my_style'")
    return name


def _file_name_problem(name: str) -> str | None:
    if not name or not name.strip():
        return "is empty"
    if not _is_encodable(name):
        return "contains characters that are not valid Unicode"
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is too long (at most {MAX_NAME_CHARS} characters)"
    if any(ch in _FORBIDDEN_NAME_CHARS for ch in name):
        return "contains a path separator or one of < > : \" | ? *"
    if any(unicodedata.category(ch) in _FORBIDDEN_NAME_CATEGORIES or (ch.isspace() and ch != " ") for ch in name):
        return "contains control, invisible or non-space whitespace characters"
    if ".." in name:
        return "contains '..'"
    if name.startswith("."):
        return "starts with a dot (a hidden file)"
    if name != name.strip() or name.endswith("."):
        return "starts or ends with a space or ends with a dot"
    if name.split(".")[0].strip().lower() in RESERVED_NAMES:
        return "is a reserved device name on Windows"
    if name.lower().endswith(".safetensors"):
        return "ends with .safetensors (give the name without it)"
    return None


def check_text(key: str, value: str, limit: int, why: str = "") -> str:
    """``value`` when at most ``limit`` characters (and free of NUL); else ConfigError naming the key."""
    if len(value) > limit:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{key}: {len(value)} characters is too long; at most {limit} are allowed{reason}")
    if "\x00" in value or not _is_encodable(value):
        raise ConfigError(f"{key}: {short_repr(value)} contains a NUL character or invalid Unicode")
    return value


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (possible in JSON strings) cannot name a file
        return False
    return True


def check_finite(key: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return value


def check_device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ConfigError(f"device: {short_repr(value)} is not allowed; use auto, cpu, cuda or cuda:N")
    return value


def check_module_names(key: str, names: list[str]) -> list[str]:
    """Module names, or :data:`ALL_LINEAR` alone (any case; which task may use it is checked with the task)."""
    if [name.lower() for name in names] == [ALL_LINEAR]:
        return [ALL_LINEAR]
    for name in names:
        if name.lower() == ALL_LINEAR:
            raise ConfigError(f"{key}: {ALL_LINEAR} already means every linear layer; give it alone, or list "
                              "module names")
        if not _MODULE_NAME.fullmatch(name):
            raise ConfigError(f"{key}: {short_repr(name)} is not a module name (letters, digits, '_' and '.')")
    return names


def check_resolution(value: int) -> int:
    if value % RESOLUTION_MULTIPLE:
        lower = max(RESOLUTION_MULTIPLE, value // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)
        raise ConfigError(f"resolution: {value} must be a multiple of {RESOLUTION_MULTIPLE} "
                          f"(e.g. {lower} or {lower + RESOLUTION_MULTIPLE})")
    return value


def inside(root: str | Path, *parts: str) -> Path:
    """``root/parts...``, after proving that it resolves (symlinks and ``..`` followed) inside ``root``.

    Every file a run writes goes through this; a path that would leave ``root`` raises UnsafePathError.
    """
    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"refusing to write {short_repr(str(path))}: it resolves to {short_repr(str(resolved))}, "
                              f"outside the output folder {base}")
    return path


def check_inside(key: str, path: str | Path, root: str | Path) -> None:
    """ConfigError unless ``path`` resolves inside ``root`` (e.g. ``log_dir`` inside ``output_dir``)."""
    base, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{key}: {short_repr(str(path))} is outside output_dir ({base}); every file of a run "
                          "stays in its output folder")

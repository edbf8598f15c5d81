"""Caption files: ``metadata.csv`` (``filename,prompt``) and per-image ``.txt`` sidecars.

Both are read and written with exact round trips: commas, quotes and newlines inside a caption survive
(the csv module's quoting), and files are written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text

METADATA_FILE = "metadata.csv"
_FILENAME_COLUMNS = ("filename", "file_name", "image", "file")
_PROMPT_COLUMNS = ("prompt", "caption", "text")


class CaptionFileError(UserError, ValueError):
    """A caption file that cannot be read (wrong columns, not CSV)."""


def _pick_column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    lowered = [name.strip().lower() for name in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise CaptionFileError(f"{path}: no {names[0]!r} column (header is {header}); expected 'filename,prompt'")


def read_metadata_csv(path: str | Path) -> dict[str, str]:
    """``filename -> prompt`` from a CSV with a ``filename,prompt`` header (``file_name``/``caption`` also read)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    file_col = _pick_column(header, _FILENAME_COLUMNS, path)
    prompt_col = _pick_column(header, _PROMPT_COLUMNS, path)
    captions: dict[str, str] = {}
    for line, row in enumerate(body, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(file_col, prompt_col):
            raise CaptionFileError(f"{path}, row {line}: expected 'filename,prompt', got {row}")
        captions[row[file_col].strip().replace("\\", "/")] = row[prompt_col]
    return captions


def format_metadata_csv(captions: dict[str, str]) -> str:
    """The text of a ``metadata.csv`` holding ``captions`` (sorted by file name)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    for name in sorted(captions):
        writer.writerow([name, captions[name]])
    return buffer.getvalue()


def write_metadata_csv(path: str | Path, captions: dict[str, str], overwrite: bool = True) -> Path:
    """Write ``captions`` as ``filename,prompt`` rows (atomic)."""
    return atomic_write_text(path, format_metadata_csv(captions), overwrite=overwrite)


def txt_path(image_path: str | Path) -> Path:
    """The sidecar caption file of an image: same name, ``.txt``."""
    return Path(image_path).with_suffix(".txt")


def read_txt_caption(image_path: str | Path) -> str | None:
    """The sidecar caption of an image, or None when there is none."""
    path = txt_path(image_path)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8-sig").strip()


def write_txt_caption(image_path: str | Path, text: str, overwrite: bool = False) -> bool:
    """Write the sidecar caption; returns False (and writes nothing) when one exists and not ``overwrite``."""
    path = txt_path(image_path)
    if path.exists() and not overwrite:
        return False
    atomic_write_text(path, text)
    return True


def apply_trigger(caption: str, trigger: str) -> str:
    """Put ``trigger`` first, exactly once (an existing occurrence as a tag is moved to the front)."""
    caption = caption.strip()
    trigger = trigger.strip()
    if not trigger:
        return caption
    tags = [tag.strip() for tag in caption.split(",")] if caption else []
    tags = [tag for tag in tags if tag and tag != trigger]
    if tags and tags[0].startswith(trigger + " "):
        return ", ".join(tags)
    return ", ".join([trigger, *tags])


def load_captions(folder: str | Path, metadata_path: str | Path | None = None) -> dict[str, str]:
    """Captions of the images under ``folder``, keyed by posix path relative to it.

    ``.txt`` sidecars are read first; ``metadata.csv`` (``metadata_path`` or ``folder/metadata.csv``) wins.
    """
    folder = Path(folder)
    captions: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.suffix.lower() in (".txt", ".csv") or any(part.startswith(".") for part in relative.parts):
            continue
        caption = read_txt_caption(path) if path.is_file() else None
        if caption is not None:
            captions[relative.as_posix()] = caption
    csv_path = Path(metadata_path) if metadata_path else folder / METADATA_FILE
    if metadata_path and not csv_path.is_file():
        raise FileNotFoundError(f"metadata_path {csv_path} does not exist")
    if csv_path.is_file():
        captions.update(read_metadata_csv(csv_path))
    return captions

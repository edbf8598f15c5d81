"""Caption files: ``metadata.csv`` (``filename,prompt``) and per-image ``.txt`` sidecars.

Both are read and written with exact round trips: commas, quotes and newlines inside a caption survive
(the csv module's quoting), and files are written atomically.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text, read_utf8
from lora_trainer.validation import MAX_CAPTION_CHARS

METADATA_FILE = "metadata.csv"
MAX_CSV_BYTES = 16 << 20  # a metadata.csv for a few hundred images is tens of kilobytes
_FILENAME_COLUMNS = ("filename", "file_name", "image", "file")
_PROMPT_COLUMNS = ("prompt", "caption", "text")
_LOOKS_LIKE_A_ROW = re.compile(r"[^,\"\n]+\.(png|jpe?g|jfif|webp|bmp|gif|tiff?)\s*,", re.IGNORECASE)


class CaptionFileError(UserError, ValueError):
    """A caption file that cannot be read (not CSV, wrong columns, an unclosed quote...): names file and line."""


@dataclass(frozen=True)
class CaptionRow:
    """One row of a ``metadata.csv``: the line it starts on, the file it names and its caption."""

    line: int
    filename: str
    prompt: str


def _pick_column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    lowered = [name.strip().lower() for name in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise CaptionFileError(f"{path}: no {names[0]!r} column (header is {header}); expected 'filename,prompt'")


def _csv_problem(err: csv.Error) -> str:
    text = str(err)
    if "unexpected end of data" in text or "EOF" in text:
        return "a quote opened here is never closed; close it, or remove the stray quote"
    if "expected after" in text:
        return 'text follows a closing quote; inside a quoted caption write a quote as two quotes ("")'
    if "field larger than field limit" in text:
        return "a field is far too long (an unclosed quote?)"
    return text


def read_metadata_rows(path: str | Path) -> list[CaptionRow]:
    """Every row of a ``filename,prompt`` CSV (``file_name``/``caption`` headers also read), strictly.

    An unclosed quote, a row with the wrong number of fields, an empty file name, a quoted caption that
    swallows following rows, or a caption longer than :data:`MAX_CAPTION_CHARS` raises CaptionFileError
    naming the file and the line; a file that is not UTF-8 raises TextEncodingError.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise CaptionFileError(f"{path} is {size >> 20} MiB; a caption file is at most {MAX_CSV_BYTES >> 20} MiB")
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), strict=True)
    parsed: list[tuple[int, int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            parsed.append((start, reader.line_num, row))
            start = reader.line_num + 1
    except csv.Error as err:
        raise CaptionFileError(f"{path}, line {start}: {_csv_problem(err)}") from None
    if not parsed:
        return []
    (_, _, header), body = parsed[0], parsed[1:]
    file_col = _pick_column(header, _FILENAME_COLUMNS, path)
    prompt_col = _pick_column(header, _PROMPT_COLUMNS, path)
    rows: list[CaptionRow] = []
    for first, last, row in body:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CaptionFileError(f"{path}, line {first}: {len(row)} field(s), expected {len(header)} "
                                   f"({','.join(header)}); put a caption that contains commas in double quotes")
        name, prompt = row[file_col].strip().replace("\\", "/"), row[prompt_col]
        if not name:
            raise CaptionFileError(f"{path}, line {first}: the file name is empty")
        swallowed = [line for line in prompt.split("\n")[1:] if _LOOKS_LIKE_A_ROW.match(line)]
        if swallowed:
            raise CaptionFileError(f"{path}, line {first}: the quoted caption runs to line {last} and swallows "
                                   f"{len(swallowed)} row(s) such as {swallowed[0][:60]!r}; close its quote")
        if len(prompt) > MAX_CAPTION_CHARS:
            raise CaptionFileError(f"{path}, line {first}: the caption is {len(prompt)} characters long; at most "
                                   f"{MAX_CAPTION_CHARS} are allowed (CLIP reads about 300)")
        rows.append(CaptionRow(first, name, prompt))
    return rows


def read_metadata_csv(path: str | Path) -> dict[str, str]:
    """``filename -> prompt`` from a CSV with a ``filename,prompt`` header (see :func:`read_metadata_rows`)."""
    return {row.filename: row.prompt for row in read_metadata_rows(path)}


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
    """The sidecar caption of an image, or None when there is none (UTF-8, bounded length)."""
    path = txt_path(image_path)
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > 4 * MAX_CAPTION_CHARS:  # UTF-8 takes at most 4 bytes a character: refused before reading
        raise CaptionFileError(f"{path}: the caption is {size} bytes long; at most {MAX_CAPTION_CHARS} characters "
                               "are allowed (CLIP reads about 300)")
    text = read_utf8(path).strip()
    if len(text) > MAX_CAPTION_CHARS:
        raise CaptionFileError(f"{path}: the caption is {len(text)} characters long; at most {MAX_CAPTION_CHARS} "
                               "are allowed (CLIP reads about 300)")
    return text


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


@dataclass
class Captions:
    """The captions of a folder (posix path relative to it -> caption) and the CSV rows they came from."""

    captions: dict[str, str] = field(default_factory=dict)
    rows: list[CaptionRow] = field(default_factory=list)
    csv_path: Path | None = None


def read_captions(folder: str | Path, metadata_path: str | Path | None = None) -> Captions:
    """Captions of the images under ``folder``, keyed by posix path relative to it, with the CSV's rows.

    ``.txt`` sidecars are read first; ``metadata.csv`` (``metadata_path`` or ``folder/metadata.csv``) wins.
    """
    folder = Path(folder)
    found = Captions()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.suffix.lower() in (".txt", ".csv") or any(part.startswith(".") for part in relative.parts):
            continue
        caption = read_txt_caption(path) if path.is_file() else None
        if caption is not None:
            found.captions[relative.as_posix()] = caption
    csv_path = Path(metadata_path) if metadata_path else folder / METADATA_FILE
    if metadata_path and not csv_path.is_file():
        raise FileNotFoundError(f"metadata_path {csv_path} does not exist")
    if csv_path.is_file():
        found.csv_path = csv_path
        found.rows = read_metadata_rows(csv_path)
        found.captions.update((row.filename, row.prompt) for row in found.rows)
    return found


def load_captions(folder: str | Path, metadata_path: str | Path | None = None) -> dict[str, str]:
    """Captions of the images under ``folder``, keyed by posix path relative to it (see :func:`read_captions`)."""
    return read_captions(folder, metadata_path).captions

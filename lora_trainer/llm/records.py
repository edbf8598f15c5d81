"""Read text-generation data files into raw records, each with the file and line it came from.

``.jsonl`` (one JSON object per line), ``.json`` (an array of objects, one object, or JSON lines), ``.csv``
(a header row, then one record per row) and ``.txt`` (the whole file is one plain-text document). A line that
cannot be read is listed as a problem with its line number and the rest of the file is still read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".txt")


class DataFilesError(UserError):
    """The data path is missing or holds no data file."""


@dataclass
class RawRecord:
    """One record as found in a file: a mapping of fields; ``source`` is ``file:line``."""

    source: str
    fields: dict[str, Any]


@dataclass
class ReadResult:
    """Every record read, and one ``file:line: reason`` entry per line that could not be read."""

    records: list[RawRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def list_data_files(path: str | Path) -> tuple[list[Path], Path]:
    """The data files under ``path`` (a folder, not recursive, or one file) and the folder names are shown from."""
    path = Path(path)
    if not path.exists():
        raise DataFilesError(f"train_data_dir: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise DataFilesError(f"train_data_dir: {path.name} is not a {'/'.join(DATA_EXTENSIONS)} file")
        return [path], path.parent
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise DataFilesError(f"train_data_dir: no {', '.join(DATA_EXTENSIONS)} files in {path}")
    return files, path


def data_file_stamps(path: str | Path) -> dict[str, list]:
    """``relative name -> [size, content hash]`` of every data file under ``path``: a run's identity (an edit,
    an added or a removed file makes another run; a copied folder stays the same run)."""
    files, root = list_data_files(path)
    stamps: dict[str, list] = {}
    for file in files:
        digest = hashlib.sha256()
        try:
            with open(file, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
        except OSError:  # skipped (and reported) by read_records; it still marks the data as different
            stamps[file.relative_to(root).as_posix()] = ["unreadable"]
            continue
        stamps[file.relative_to(root).as_posix()] = [file.stat().st_size, digest.hexdigest()[:16]]
    return stamps


def read_records(path: str | Path) -> ReadResult:
    """Every record of every data file under ``path``; unreadable files and lines become problems."""
    files, root = list_data_files(path)
    result = ReadResult()
    for file in files:
        name = file.relative_to(root).as_posix()
        result.files.append(name)
        try:
            data = file.read_bytes()
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            result.problems.append(f"{name}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); file skipped")
            continue
        except OSError as err:
            result.problems.append(f"{name}: cannot be read ({err.strerror or err}); file skipped")
            continue
        reader = {".jsonl": _json_lines, ".json": _json_file, ".csv": _csv_rows, ".txt": _plain_text}
        for line, value in reader[file.suffix.lower()](text, name, result.problems):
            if isinstance(value, dict):
                result.records.append(RawRecord(f"{name}:{line}", value))
            else:
                result.problems.append(f"{name}:{line}: expected a JSON object, got {type(value).__name__}")
    return result


def _json_lines(text: str, name: str, problems: list[str], first_line: int = 1) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(text.splitlines(), first_line):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"{name}:{line}: invalid JSON ({err.msg} at column {err.colno})")


def _json_file(text: str, name: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """An array of records (each at its own line), one object, or JSON lines in a .json file."""
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        yield from _json_array(text, start, name, problems)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(text, name, problems)
        return
    yield text.count("\n", 0, start) + 1, value


def _json_array(text: str, start: int, name: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """The elements of the array at ``text[start]`` with their line numbers; a syntax error ends the file."""
    decoder = json.JSONDecoder()
    pos, line, counted = _skip_space(text, start + 1), 1, 0
    if text[pos:pos + 1] == "]":
        return
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            problems.append(f"{name}:{err.lineno}: invalid JSON ({err.msg}); the rest of the file is skipped")
            return
        yield line, value
        pos = _skip_space(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip_space(text, pos + 1)
            continue
        if text[pos:pos + 1] != "]":
            where = line + text.count("\n", counted, pos)
            problems.append(f"{name}:{where}: invalid JSON (expected ',' or ']' after a record); "
                            "the rest of the file is skipped")
        return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv_rows(text: str, name: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    ended = 0  # the line the previous row ended on
    try:
        for row in reader:
            start, ended = ended + 1, reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
            elif len(row) != len(header):
                problems.append(f"{name}:{start}: {len(row)} fields where the header has {len(header)} columns")
            else:
                yield start, dict(zip(header, row, strict=True))
    except csv.Error as err:
        problems.append(f"{name}:{reader.line_num}: invalid CSV ({err}); the rest of the file is skipped")


def _plain_text(text: str, name: str, problems: list[str]) -> Iterator[tuple[int, Any]]:
    if not text.strip():
        problems.append(f"{name}:1: empty file")
        return
    yield 1, {"text": text}

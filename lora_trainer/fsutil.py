"""Files that appear whole or not at all (write to a temporary name, fsync, rename), and one-line errors for
files that cannot be written (disk full, read-only) or read as text (not UTF-8)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_trainer.errors import UserError

_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose another output_dir",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another output_dir",
    errno.EROFS: "the file system is read-only; choose another output_dir",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
}


class TextEncodingError(UserError, ValueError):
    """A text file that is not UTF-8; the message names the file, the line and the fix."""


def read_utf8(path: str | Path, data: bytes | None = None) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed); TextEncodingError naming the file and line otherwise.

    No other encoding is guessed: a wrong guess would silently train on garbled captions.
    """
    path = Path(path)
    data = path.read_bytes() if data is None else data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        try:
            data.decode("cp1252")
            likely = "; it looks like Windows-1252 / Latin-1"
        except UnicodeDecodeError:
            likely = ""
        excel = "Excel: 'CSV UTF-8'; or " if path.suffix.lower() == ".csv" else ""
        raise TextEncodingError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}{likely}); save it as UTF-8 "
            f"({excel}iconv -f cp1252 -t utf-8 {path.name} > utf8_{path.name})") from None


class StorageError(UserError, OSError):
    """A file could not be read or written (disk full, read-only, no permission...); the message names it."""


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def describe_os_error(err: OSError, path: str | Path | None = None, action: str | None = None) -> str:
    """One line: the file (``err.filename``, else ``path``), what went wrong and what to do."""
    where = err.filename if err.filename is not None else path
    what = _ADVICE.get(err.errno or 0) or err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    action = action or ("write" if err.errno in _WRITE_ERRORS else "use")
    return f"cannot {action} {where}: {what}" if where is not None else f"file error: {what}"


@contextlib.contextmanager
def reporting_os_errors(path: str | Path | None = None, action: str | None = None) -> Iterator[None]:
    """Turn a system OSError inside the block into a :class:`StorageError` naming the file (or ``path``)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        if err.errno is None:
            raise  # raised by code, not the system (e.g. our own "exists; set overwrite"): its message stands
        raise StorageError(describe_os_error(err, path, action)) from err  # err.errno stays on __cause__


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path`` in one rename.

    With ``overwrite=False`` an existing ``path`` raises FileExistsError before anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; set overwrite: true (or choose another name) to replace it")
    with reporting_os_errors(path, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            _give_usual_permissions(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            if not overwrite and path.exists():
                raise FileExistsError(f"{path} appeared while writing; not replacing it")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def atomic_write_dir(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_folder)`` then move the folder to ``path`` in one rename: it appears whole or not at all.

    Files get ordinary permissions and are synced first. With ``overwrite=False`` an existing ``path`` raises
    FileExistsError before anything is written; with ``overwrite=True`` the old one is removed after the rename.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; set overwrite: true (or choose another name) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        write(tmp)
        for item in sorted(tmp.rglob("*")):
            _give_usual_permissions(item, folder=item.is_dir())
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        _give_usual_permissions(tmp, folder=True)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{path} appeared while writing; not replacing it")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists() or leftover.is_symlink():
                leftover.unlink()
    return path


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _give_usual_permissions(path: Path, *, folder: bool = False) -> None:
    """mkstemp/mkdtemp (and some writers, such as safetensors 0.8) make private files and folders; use what
    ``open`` / ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)

"""Files that appear whole or not at all: write to a temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import os
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


class StorageError(UserError, OSError):
    """A file could not be read or written (disk full, read-only, no permission...); the message names it."""


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line: the file (``err.filename``, else ``path``), what went wrong and what to do."""
    where = err.filename if err.filename is not None else path
    what = _ADVICE.get(err.errno or 0, err.strerror or str(err))
    return f"cannot write {where}: {what}" if where is not None else f"file error: {what}"


@contextlib.contextmanager
def reporting_os_errors(path: str | Path | None = None) -> Iterator[None]:
    """Turn an OSError inside the block into a :class:`StorageError` naming the file (or ``path``)."""
    try:
        yield
    except (StorageError, FileExistsError, FileNotFoundError):
        raise
    except OSError as err:
        error = StorageError(describe_os_error(err, path))
        error.errno, error.filename = err.errno, err.filename if err.filename is not None else path
        raise error from err


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path`` in one rename.

    With ``overwrite=False`` an existing ``path`` raises FileExistsError before anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; set overwrite: true (or choose another name) to replace it")
    with reporting_os_errors(path):
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


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _give_usual_permissions(path: Path) -> None:
    """mkstemp (and some writers, such as safetensors 0.8) make 0600 files; use what ``open`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

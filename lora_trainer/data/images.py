"""Image files: find them, decode them fully into RGB with a short reason when that fails, crop, tensorize."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

from lora_trainer.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_RESAMPLE_LANCZOS = Image.Resampling.LANCZOS
_FLIP = Image.Transpose.FLIP_LEFT_RIGHT
_WHITE = (255, 255, 255)


class ImageLoadError(UserError):
    """An image that cannot be used; ``reason`` is short and human (e.g. ``"empty file (0 bytes)"``)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep pickling (multiprocessing) working with the two-argument constructor
        return (type(self), (self.path, self.reason))


def is_hidden(path: Path, root: Path) -> bool:
    """True when any part of ``path`` below ``root`` starts with a dot."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, hidden files and folders skipped), sorted."""
    folder = Path(folder)
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path, folder) and path.is_file()
    )


def _scale_to_8bit(array: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit integer / float) single-channel data scaled into 0..255."""
    is_float = array.dtype.kind == "f"
    array = array.astype(np.float64)
    peak = float(array.max()) if array.size else 0.0
    if is_float and peak <= 1.0:
        array = array * 255.0
    elif peak > 255.0:
        array = array / 257.0  # 16-bit range (65535 -> 255)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit and float grey scaled (not clipped), transparency composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_8bit(np.asarray(image))).convert("RGB")  # uint8 2-D: "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _composite_on_white(image)
    return image.convert("RGB")


@dataclass(frozen=True)
class SourceInfo:
    """How an image file was stored (to tell whether it can be copied as is)."""

    format: str | None
    mode: str
    frames: int
    orientation: int  # EXIF orientation tag, 1 = upright
    transparency: bool
    file_size: int


class _TooLarge(Exception):
    pass


def _decode(path: Path, file_size: int) -> tuple[Image.Image, SourceInfo]:
    with Image.open(path) as image:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.width * image.height > limit:  # Pillow only warns up to twice the limit
            raise _TooLarge
        image.load()  # full decode of the first frame: truncated data fails here
        try:
            orientation = int(image.getexif().get(0x0112, 1) or 1)
            oriented = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, KeyError, TypeError, AttributeError):
            orientation, oriented = 1, image  # unreadable EXIF: keep the pixels as stored
        info = SourceInfo(image.format, image.mode, getattr(image, "n_frames", 1), orientation,
                          "transparency" in image.info, file_size)
        return to_rgb(oriented), info


def decode_image(path: str | Path) -> tuple[Image.Image, SourceInfo]:
    """Like load_image, plus how the file was stored."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        return _decode(path, size)  # (no warnings.catch_warnings: it is not thread-safe)
    except ImageLoadError:
        raise
    except _TooLarge as error:
        raise ImageLoadError(path, "larger than Pillow's decompression-bomb limit") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, "larger than Pillow's decompression-bomb limit") from error
    except PermissionError as error:
        raise ImageLoadError(path, "permission denied") from error
    except FileNotFoundError as error:
        raise ImageLoadError(path, "file not found") from error
    except IsADirectoryError as error:
        raise ImageLoadError(path, "is a directory") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(path, "not an image (cannot identify format)") from error
    except (ValueError, NotImplementedError) as error:
        raise ImageLoadError(path, "unsupported format") from error
    except OSError as error:
        text = str(error).lower()
        if "decoder" in text and "not available" in text:
            raise ImageLoadError(path, "unsupported format") from error
        raise ImageLoadError(path, "truncated or corrupt image data") from error
    except (SyntaxError, EOFError, IndexError, KeyError, TypeError, MemoryError) as error:
        raise ImageLoadError(path, "truncated or corrupt image data") from error


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image (EXIF orientation applied, first frame of an animation).

    Raises ImageLoadError with a short reason for anything that cannot be used (the decompression-bomb limit
    is Pillow's ``Image.MAX_IMAGE_PIXELS``).
    """
    return decode_image(path)[0]


def center_crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover ``width`` x ``height`` and crop the centre (LANCZOS)."""
    if image.size == (width, height):
        return image.copy()
    return ImageOps.fit(image, (width, height), method=_RESAMPLE_LANCZOS, centering=(0.5, 0.5))


def center_crop_offset(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """(top, left) of the crop :func:`center_crop_resize` takes, in pixels of the image scaled to cover the target.

    SDXL is conditioned on it (``crop_coords_top_left``); a mirrored image has the same centred crop.
    """
    scale = max(target_width / width, target_height / height)
    return round((height * scale - target_height) / 2), round((width * scale - target_width) / 2)


def flip_horizontal(image: Image.Image) -> Image.Image:
    """The mirror image (left <-> right)."""
    return image.transpose(_FLIP)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor ``[3, H, W]`` in ``[-1, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    import torch  # imported here: the command line lists its commands without loading torch

    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) / 127.5 - 1.0


def split_readable(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``paths`` split into images that decode fully and ``(path, reason)`` for those that do not."""
    readable: list[Path] = []
    broken: list[tuple[Path, str]] = []
    for path in paths:
        try:
            load_image(path).close()
        except ImageLoadError as error:
            broken.append((path, error.reason))
        else:
            readable.append(path)
    return readable, broken

"""Builders of small good and broken image files for the data tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def noise(width: int = 64, height: int = 64, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random-noise image (incompressible, so truncation really cuts pixel data)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data)  # the mode follows from the shape


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def truncated(path: Path, image: Image.Image | None = None, keep: float = 0.5, **kwargs) -> Path:
    """Save ``image`` (noise by default) to ``path`` and keep only the first ``keep`` of its bytes."""
    save(image or noise(), path, **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def exif_rotated_jpeg(path: Path, width: int = 40, height: int = 20) -> Path:
    """A JPEG stored ``width`` x ``height`` with EXIF orientation 6 (shown rotated 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(noise(width, height), path, exif=exif.tobytes())


def animated_gif(path: Path, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> Path:
    frames = [Image.new("RGB", (24, 16), colour) for colour in colours]
    return save(frames[0], path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png(path: Path, value: int = 65535, size: int = 16) -> Path:
    return save(Image.fromarray(np.full((size, size), value, dtype=np.uint16)), path)


def broken_set(folder: Path) -> dict[str, tuple[Path, str]]:
    """One file of every broken kind (except permissions and bombs): name -> (path, expected reason)."""
    empty = folder / "empty.png"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")
    text = folder / "text.png"
    text.write_text("this is not an image\n")
    return {
        "empty": (empty, "empty file (0 bytes)"),
        "truncated_jpeg": (truncated(folder / "cut.jpg", quality=95), "truncated or corrupt image data"),
        "truncated_png": (truncated(folder / "cut.png"), "truncated or corrupt image data"),
        "text": (text, "not an image (cannot identify format)"),
    }


@pytest.fixture
def kit() -> SimpleNamespace:
    """The builders above, for tests in this folder."""
    return SimpleNamespace(noise=noise, save=save, truncated=truncated, exif_rotated_jpeg=exif_rotated_jpeg,
                           animated_gif=animated_gif, sixteen_bit_png=sixteen_bit_png, broken_set=broken_set)

"""Image decoding: every broken kind gives its reason; odd modes, animations and EXIF come out as plain RGB."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lora_trainer.data.images import (
    ImageLoadError,
    center_crop_resize,
    list_image_files,
    load_image,
    split_readable,
    to_tensor,
)


def reason_of(path) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value.reason


def test_every_broken_kind_has_its_reason(tmp_path, kit):
    for name, (path, expected) in kit.broken_set(tmp_path).items():
        assert reason_of(path) == expected, name
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decoding never relaxes the global switch


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.png") == "file not found"


@pytest.mark.parametrize("limit", [1000, 3000])  # 64*64 = 4096 pixels: above 2x limit (error), above limit (warning)
def test_decompression_bomb(tmp_path, kit, monkeypatch, limit):
    path = kit.save(kit.noise(), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert reason_of(path) == "larger than Pillow's decompression-bomb limit"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (64, 64)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied(tmp_path, kit):
    path = kit.save(kit.noise(), tmp_path / "locked.png")
    path.chmod(0)
    try:
        assert reason_of(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_error_pickles_with_path_and_reason(tmp_path):
    error = pickle.loads(pickle.dumps(ImageLoadError(tmp_path / "a.png", "empty file (0 bytes)")))
    assert (error.path, error.reason) == (tmp_path / "a.png", "empty file (0 bytes)")


def test_animated_gif_gives_first_frame(tmp_path, kit):
    image = load_image(kit.animated_gif(tmp_path / "anim.gif"))
    assert image.mode == "RGB" and image.size == (24, 16)
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_gives_first_frame(tmp_path, kit):
    frames = [Image.new("RGB", (24, 16), c) for c in ((0, 0, 255), (255, 0, 0))]
    path = kit.save(frames[0], tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path, kit):
    path = kit.save(Image.new("CMYK", (32, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 16)
    red, green, blue = image.getpixel((16, 8))
    assert red > 200 and green < 60 and blue < 60


def test_palette_png_with_transparency(tmp_path, kit):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    path = kit.save(palette, tmp_path / "pal.png", transparency=0)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the transparent index becomes white
    assert image.getpixel((4, 4)) == (0, 128, 0)


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32896, 128), (0, 0)])
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, kit, value, expected):
    image = load_image(kit.sixteen_bit_png(tmp_path / "deep.png", value))
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == (expected,) * 3


def test_rgba_and_la_composited_on_white(tmp_path, kit):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    image = load_image(kit.save(rgba, tmp_path / "rgba.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((1, 0)))
    la = load_image(kit.save(Image.new("LA", (4, 4), (0, 0)), tmp_path / "la.png"))
    assert la.mode == "RGB" and la.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path, kit):
    path = kit.exif_rotated_jpeg(tmp_path / "rot.jpg", 40, 20)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_load_image_returns_detached_rgb(tmp_path, kit):
    path = kit.save(kit.noise(16, 8, mode="L"), tmp_path / "grey.png")
    image = load_image(path)
    path.unlink()  # the file handle is closed and the pixels are in memory
    assert image.mode == "RGB" and image.size == (16, 8)
    assert np.asarray(image).shape == (8, 16, 3)


def test_list_image_files(tmp_path, kit):
    for name in ["b.png", "A.JPG", "sub/c.webp", "sub/deeper/d.jpeg", ".hidden.png", ".cache/e.png"]:
        kit.save(kit.noise(8, 8), tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "metadata.csv").write_text("filename,prompt\n")
    (tmp_path / "folder.png").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert found == ["A.JPG", "b.png", "sub/c.webp", "sub/deeper/d.jpeg"]


def test_center_crop_resize_keeps_the_centre(tmp_path):
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    wide[:, :50] = (255, 0, 0)
    wide[:, 50:150] = (0, 255, 0)
    wide[:, 150:] = (0, 0, 255)
    out = center_crop_resize(Image.fromarray(wide), 64, 64)
    assert out.size == (64, 64)
    pixels = np.asarray(out).astype(int)
    assert np.abs(pixels[:, 3:-3] - (0, 255, 0)).max() <= 2  # only the green middle survives
    assert np.abs(pixels - (0, 255, 0)).max() <= 16  # (LANCZOS bleeds a little at the crop edges)
    tall = center_crop_resize(Image.fromarray(wide), 32, 96)
    assert tall.size == (32, 96)


def test_to_tensor_range_and_layout():
    image = Image.new("RGB", (5, 3), (255, 0, 0))
    image.putpixel((4, 2), (0, 0, 0))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert torch.equal(tensor[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(tensor[:, 2, 4], torch.tensor([-1.0, -1.0, -1.0]))
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_permission_error_maps_to_reason_even_as_root(tmp_path, kit, monkeypatch):
    path = kit.save(kit.noise(8, 8), tmp_path / "locked.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert reason_of(path) == "permission denied"


def test_split_readable_separates_broken_files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "blue").save(good)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    readable, broken = split_readable([good, empty])
    assert readable == [good] and broken == [(empty, "empty file (0 bytes)")]

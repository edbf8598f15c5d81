"""``clean``: every file reported with its reason, duplicates found, captions carried, input untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lora_trainer.data import clean as clean_module
from lora_trainer.data.captions import read_metadata_csv, write_metadata_csv
from lora_trainer.data.clean import REPORT_JSON, REPORT_TXT, CleanError, clean_dataset, hamming_pairs


def shapes(seed: int, width: int = 96, height: int = 80) -> Image.Image:
    """A distinct picture: coloured background with random ellipses and rectangles."""
    rng = np.random.default_rng(seed)

    def colour():
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 8, width // 2)), int(rng.integers(height // 8, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - w, y - h, x + w, y + h], fill=colour())
    return image


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.fixture
def raw(tmp_path, kit) -> Path:
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(6):
        shapes(i).save(root / f"u{i}.png")
    (root / "u0.txt").write_text("zero, a picture")
    write_metadata_csv(root / "metadata.csv", {"u1.png": "one", "u2.png": "two", "gone.png": "no such file",
                                               "cmyk.jpg": "cmyk caption", "near_small.png": "dropped one"})
    # planted near duplicates
    shapes(1).resize((192, 160), Image.Resampling.LANCZOS).save(root / "near_big.png")  # u1 is the small one
    shapes(2).save(root / "near_jpeg.jpg", quality=70)
    (root / "sub").mkdir()
    shapes(3).crop((3, 2, 93, 78)).save(root / "sub" / "near_crop.png")
    shapes(4).resize((64, 53), Image.Resampling.LANCZOS).save(root / "near_small.png")
    (root / "near_small.txt").write_text("dropped with its image")
    (root / "v_exact.png").write_bytes((root / "u5.png").read_bytes())
    shapes(5).save(root / "z_exact.webp", lossless=True)  # same pixels, other format
    # convertible kinds
    shapes(10).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    kit.exif_rotated_jpeg(root / "rotated.jpg", 96, 64)
    Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1))).save(root / "deep.png")
    frames = [shapes(11), shapes(12)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "solid_red.png")  # same phash, other colour: kept
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "solid_blue.png")
    # dropped kinds
    kit.broken_set(root / "bad")
    shapes(20, 12, 12).save(root / "tiny.png")
    (root / "readme.md").write_text("not an image")
    (root / "orphan.txt").write_text("caption of nothing")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def entries(report) -> dict[str, dict]:
    return {entry.file: entry for entry in report.entries}


def test_every_file_reported_with_reason(raw, tmp_path):
    report = clean_dataset(raw, tmp_path / "out", min_size=16)
    by_file = entries(report)
    listed = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    assert set(by_file) == listed  # every input file, hidden ones included
    reasons = {name: e.reason for name, e in by_file.items() if e.status == "dropped"}
    assert reasons["bad/empty.png"] == "empty file (0 bytes)"
    assert reasons["bad/cut.jpg"] == "truncated or corrupt image data"
    assert reasons["bad/cut.png"] == "truncated or corrupt image data"
    assert reasons["bad/text.png"] == "not an image (cannot identify format)"
    assert reasons["tiny.png"] == "too small (12x12 < 16)" and by_file["tiny.png"].kind == "too_small"
    assert reasons["readme.md"] == "unsupported (not an image file type)"
    assert reasons["orphan.txt"] == "unsupported (caption without an image)"
    assert reasons[".DS_Store"] == "hidden file or folder (skipped)"
    assert reasons["near_small.txt"] == "caption of dropped image near_small.png"
    assert entries(clean_dataset(raw, tmp_path / "out2", min_size=50))["deep.png"].reason == "too small (48x48 < 50)"


def test_duplicates_found_and_largest_kept(raw, tmp_path):
    by_file = entries(clean_dataset(raw, tmp_path / "out", min_size=16))
    assert by_file["v_exact.png"].reason == "exact duplicate of u5.png"
    assert by_file["z_exact.webp"].reason == "exact duplicate of u5.png"
    assert by_file["u1.png"].kind == "near_duplicate" and by_file["u1.png"].duplicate_of == "near_big.png"
    assert by_file["near_big.png"].status == "kept"
    assert by_file["near_jpeg.jpg"].duplicate_of == "u2.png"  # same size: the bigger (lossless) file is kept
    assert by_file["u3.png"].status == "kept" and by_file["sub/near_crop.png"].duplicate_of == "u3.png"
    assert by_file["near_small.png"].duplicate_of == "u4.png"
    for name in ("u1.png", "near_jpeg.jpg", "sub/near_crop.png", "near_small.png"):
        assert by_file[name].reason.startswith(f"near duplicate of {by_file[name].duplicate_of} (distance ")
        assert int(by_file[name].reason.rsplit(" ", 1)[1].rstrip(")")) <= 6
    kept = {name for name, e in by_file.items() if e.status == "kept" and e.kind == "image"}
    assert kept == {"u0.png", "near_big.png", "u2.png", "u3.png", "u4.png", "u5.png", "cmyk.jpg", "rotated.jpg",
                    "deep.png", "anim.gif", "solid_red.png", "solid_blue.png"}


def test_outputs_conversions_and_captions(raw, tmp_path):
    out = tmp_path / "out"
    report = clean_dataset(raw, out, min_size=16)
    by_file = entries(report)
    assert (out / "u0.png").read_bytes() == (raw / "u0.png").read_bytes()  # plain files are copied
    assert by_file["cmyk.jpg"].output == "cmyk.png" and by_file["cmyk.jpg"].reason == "converted to PNG"
    for name in ("cmyk.png", "rotated.png", "deep.png", "anim.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
    with Image.open(out / "rotated.png") as image:
        assert image.size == (64, 96)
    assert (out / "u0.txt").read_text() == "zero, a picture"
    assert not (out / "near_small.txt").exists()
    assert read_metadata_csv(out / "metadata.csv") == {"u2.png": "two", "cmyk.png": "cmyk caption"}
    assert by_file["metadata.csv"].reason == "captions: 2 of 5 row(s) carried for kept images"
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == set(report.written) | {REPORT_JSON, REPORT_TXT}
    saved = json.loads((out / REPORT_JSON).read_text())
    assert saved["summary"]["kept_images"] == 12 and saved["files"][0]["file"] == ".DS_Store"
    text = (out / REPORT_TXT).read_text()
    assert "bad/empty.png: empty file (0 bytes)" in text and "cmyk.jpg -> cmyk.png" in text


def test_input_untouched_and_idempotent(raw, tmp_path):
    before = folder_digest(raw)
    first = clean_dataset(raw, tmp_path / "a", min_size=16).to_dict()
    second = clean_dataset(raw, tmp_path / "b", min_size=16).to_dict()
    assert folder_digest(raw) == before
    for report in (first, second):
        report.pop("output")
    assert first == second
    (tmp_path / "a" / "u0.png").unlink()  # a previous output is replaced whole
    again = clean_dataset(raw, tmp_path / "a", min_size=16, overwrite=True).to_dict()
    again.pop("output")
    assert again == first
    assert (tmp_path / "a" / "u0.png").is_file()
    # cleaning a cleaned folder keeps every image: kept images are pairwise further apart than the threshold
    twice = clean_dataset(tmp_path / "a", tmp_path / "c", min_size=16)
    assert all(e.status == "kept" for e in twice.entries if e.kind in ("image", "near_duplicate", "exact_duplicate"))
    assert folder_digest(raw) == before


def test_output_folder_rules(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(CleanError, match="already holds files.*--overwrite"):
        clean_dataset(raw, out, min_size=16)
    clean_dataset(raw, out, min_size=16, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"  # only a previous clean's own files are replaced
    with pytest.raises(CleanError, match="must not be the input folder"):
        clean_dataset(raw, raw / "cleaned")
    with pytest.raises(CleanError, match="does not exist"):
        clean_dataset(tmp_path / "nope", tmp_path / "x")
    with pytest.raises(CleanError, match="dedup must be one of"):
        clean_dataset(raw, tmp_path / "x", dedup="md5")


def test_crop_center_and_bucket(raw, tmp_path):
    report = clean_dataset(raw, tmp_path / "c", min_size=16, crop="center", resolution=64, dedup="off")
    for entry in report.kept_images():
        assert entry.output.endswith(".png") and entry.target == "64x64"
        with Image.open(tmp_path / "c" / entry.output) as image:
            assert image.size == (64, 64)
    report = clean_dataset(raw, tmp_path / "b", min_size=16, crop="bucket", resolution=64)
    assert sum(report.buckets.values()) == len(report.kept_images()) == 12
    assert report.buckets["48x80"] == 1 and "buckets: " in report.summary()  # rotated.jpg is portrait
    for entry in report.kept_images():
        with Image.open(tmp_path / "b" / entry.output) as image:
            assert f"{image.width}x{image.height}" == entry.target


def test_colour_guard_separates_flat_images_phash_confuses():
    import imagehash

    red, blue = (Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255)))
    assert imagehash.phash(red) - imagehash.phash(blue) == 0  # why the thumbnail check exists


def test_recoloured_shape_on_a_plain_background_is_not_a_duplicate(tmp_path):
    """Red and yellow circles differ in one channel of a few thumbnail cells: phash and the mean agree, cells do not."""
    source = tmp_path / "in"
    source.mkdir()
    for name, fill in (("red.png", (220, 40, 40)), ("yellow.png", (235, 210, 40))):
        image = Image.new("RGB", (64, 64), (235, 235, 225))
        ImageDraw.Draw(image).ellipse([12, 12, 52, 52], fill=fill)
        image.save(source / name)
    (source / "red_copy.png").write_bytes((source / "red.png").read_bytes())

    report = entries(clean_dataset(source, tmp_path / "out", min_size=32))

    assert report["red.png"].status == "kept" and report["yellow.png"].status == "kept"
    assert report["red_copy.png"].kind == "exact_duplicate" and report["red_copy.png"].duplicate_of == "red.png"


def test_phash_int_equals_imagehash():
    import imagehash

    from lora_trainer.data.clean import phash_int

    for seed in range(5):
        grey = shapes(seed).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        bits = np.asarray(imagehash.phash(grey).hash, dtype=bool).reshape(-1)
        assert phash_int(grey) == int.from_bytes(np.packbits(bits).tobytes(), "big")


def test_converted_name_never_replaces_a_copied_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shapes(1).convert("CMYK").save(raw / "a.jpg")  # converted -> would be a.png
    shapes(2).save(raw / "a.png")  # copied as a.png
    report = clean_dataset(raw, tmp_path / "out", min_size=16)
    outputs = {e.file: e.output for e in report.kept_images()}
    assert outputs == {"a.jpg": "a_jpg.png", "a.png": "a.png"}
    assert (tmp_path / "out" / "a.png").read_bytes() == (raw / "a.png").read_bytes()


def test_dedup_off_keeps_near_but_not_exact(raw, tmp_path):
    by_file = entries(clean_dataset(raw, tmp_path / "o", min_size=16, dedup="off"))
    assert by_file["u1.png"].status == "kept" and by_file["v_exact.png"].kind == "exact_duplicate"


def test_hamming_pairs_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 3))
    near = base ^ np.bitwise_or.reduce(np.left_shift(np.uint64(1), flips.astype(np.uint64)), axis=1)
    hashes = np.concatenate([base, near])
    expected = {(i, j, bin(int(hashes[i]) ^ int(hashes[j])).count("1"))
                for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3}
    assert len(expected) >= 300
    assert set(hamming_pairs(hashes, 3, block=64)) == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # the byte-table path used by numpy < 2
    assert set(hamming_pairs(hashes, 3, block=100)) == expected


def test_cli_clean(raw, tmp_path, capsys):
    from lora_trainer.cli import main

    code = main(["clean", "--input", str(raw), "--output", str(tmp_path / "cli"), "--min-size", "16",
                 "--crop", "bucket", "--resolution", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "12 image(s) kept" in out and "clean_report.txt" in out
    assert (tmp_path / "cli" / REPORT_JSON).is_file()


def test_clip_needs_a_local_model(raw, tmp_path, monkeypatch):
    monkeypatch.delenv(clean_module.CLIP_MODEL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CleanError, match="needs a local transformers CLIP model.*--clip-model"):
        clean_dataset(raw, tmp_path / "x", min_size=16, dedup="clip")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.json").write_text("{}")
    with pytest.raises(CleanError, match="no .safetensors weights"):
        clean_dataset(raw, tmp_path / "y", min_size=16, dedup="clip", clip_model=tmp_path / "fake")


def test_clip_dedup_with_tiny_model(raw, tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": 100, "max_position_embeddings": 16},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip", safe_serialization=True)  # no preprocessor: defaults
    report = clean_dataset(raw, tmp_path / "c", min_size=16, dedup="clip", clip_model=tmp_path / "clip",
                           clip_threshold=0.999)
    by_file = entries(report)
    assert by_file["u1.png"].duplicate_of == "near_big.png"
    assert by_file["u1.png"].reason.startswith("near duplicate of near_big.png (similarity ")
    assert by_file["v_exact.png"].kind == "exact_duplicate"
    assert by_file["u0.png"].status == "kept"

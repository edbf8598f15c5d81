"""Throughput and duplicate-detection quality of ``clean`` on a synthetic image set.

    python benchmarks/clean.py                  # 1000 files
    python benchmarks/clean.py --count 10000 --workers 4

The set holds distinct pictures (random shapes on a random background plus noise, about 256 px, PNG and JPEG),
planted near duplicates of some of them (downscaled, re-encoded as JPEG, slightly cropped: each smaller or
lossier than its original, so the copy is the one that should go), exact byte copies, too-small images and
broken files. Printed: images/s of the whole clean, the time to only decode the same images (one thread and
the same thread pool), and precision / recall of the planted duplicates.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_trainer.data.clean import clean_dataset  # noqa: E402
from lora_trainer.data.images import ImageLoadError, list_image_files, load_image  # noqa: E402


def picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Random ellipses / rectangles / lines on a random background, with mild noise."""

    def colour():
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 10, width // 2)), int(rng.integers(height // 10, height // 2))
        shape = rng.integers(0, 3)
        box = [x - w, y - h, x + w, y + h]
        if shape == 0:
            draw.ellipse(box, fill=colour())
        elif shape == 1:
            draw.rectangle(box, fill=colour())
        else:
            draw.line(box, fill=colour(), width=int(rng.integers(3, 12)))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def near_copy(image: Image.Image, kind: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A smaller or lossier copy: 0 downscaled, 1 JPEG re-encode (same size), 2 cropped a few percent."""
    width, height = image.size
    if kind == 0:
        scale = float(rng.uniform(0.55, 0.85))
        return image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS), {}
    if kind == 1:
        return image, {"quality": int(rng.integers(55, 85))}
    dx, dy = int(width * rng.uniform(0.02, 0.05)), int(height * rng.uniform(0.02, 0.05))
    return image.crop((dx, dy, width - dx, height - dy)), {}


def build_set(folder: Path, count: int, seed: int = 0) -> tuple[set[str], int]:
    """Write ``count`` files; returns (names of planted duplicates, number of broken / too-small files)."""
    rng = np.random.default_rng(seed)
    n_broken = max(3, count // 50)
    n_small = max(1, count // 100)
    n_dupes = count * 15 // 100
    n_exact = max(1, count // 100)
    n_unique = count - n_broken - n_small - n_dupes - n_exact
    originals = []
    for i in range(n_unique):
        image = picture(rng, int(rng.integers(224, 320)), int(rng.integers(224, 320)))
        name = f"img{i:05d}." + ("png" if i % 3 else "jpg")
        image.save(folder / name, quality=95)
        originals.append((name, image))
    planted: set[str] = set()
    for k in range(n_dupes):
        name, image = originals[int(rng.integers(0, n_unique))]
        kind = k % 3
        copy, options = near_copy(image, kind, rng)
        copy_name = f"dup{k:05d}_{name.split('.')[0]}." + ("jpg" if kind == 1 else "png")
        if kind == 1 and name.endswith(".jpg"):
            options["quality"] = min(options["quality"], 80)  # lossier than the q95 original
        copy.save(folder / copy_name, **options)
        planted.add(copy_name)
    for k in range(n_exact):
        name, _ = originals[k]
        copy_name = f"zexact{k:05d}_{name}"
        (folder / copy_name).write_bytes((folder / name).read_bytes())
        planted.add(copy_name)
    for k in range(n_small):
        picture(rng, 64, 48).save(folder / f"small{k:05d}.png")
    for k in range(n_broken):
        path = folder / (f"broken{k:05d}." + ("jpg" if k % 3 == 1 else "png"))
        if k % 3 == 0:
            path.write_bytes(b"")
        elif k % 3 == 1:
            picture(rng, 256, 256).save(path, quality=90)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_text("not an image")
    return planted, n_broken + n_small


def decode_only(paths: list[Path], workers: int) -> float:
    def load(path: Path) -> None:
        try:
            load_image(path)
        except ImageLoadError:
            pass

    start = time.perf_counter()
    if workers <= 1:
        for path in paths:
            load(path)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(load, paths))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="files in the synthetic set")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    parser.add_argument("--threshold", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="clean_bench_") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        raw.mkdir()
        start = time.perf_counter()
        planted, bad = build_set(raw, args.count, args.seed)
        print(f"built {args.count} files ({len(planted)} planted duplicates, {bad} broken/too small) "
              f"in {time.perf_counter() - start:.1f}s; cpu cores: {os.cpu_count()}, workers: {args.workers}")
        paths = list_image_files(raw)
        one = decode_only(paths, 1)
        pooled = decode_only(paths, args.workers)
        stage_end: dict[str, float] = {}

        def progress(stage: str, done: int, total: int) -> None:
            stage_end[stage] = time.perf_counter()

        start = time.perf_counter()
        report = clean_dataset(raw, out, min_size=100, threshold=args.threshold, workers=args.workers,
                               progress=progress)
        elapsed = time.perf_counter() - start
        decode_pass = stage_end["decode"] - start
        dedup_and_write = elapsed - decode_pass
        found = {e.file for e in report.entries if e.kind in ("near_duplicate", "exact_duplicate")}
        hits = len(found & planted)
        precision = hits / len(found) if found else 1.0
        recall = hits / len(planted) if planted else 1.0
        print(f"clean: {len(paths)} images in {elapsed:.2f}s = {len(paths) / elapsed:.0f} images/s "
              f"(dedup phash, threshold {args.threshold})")
        print(f"  decode + hash pass {decode_pass:.2f}s; duplicate search + writing {len(report.kept_images())} "
              f"images (atomic, fsync) + report {dedup_and_write:.2f}s")
        print(f"decode only: {one:.2f}s one thread ({len(paths) / one:.0f} images/s), "
              f"{pooled:.2f}s with {args.workers} threads ({len(paths) / pooled:.0f} images/s)")
        print(f"planted duplicates: {len(planted)}, reported: {len(found)}, precision {precision:.3f}, "
              f"recall {recall:.3f}")
        missed = sorted(planted - found)[:5]
        wrong = sorted(found - planted)[:5]
        if missed or wrong:
            print(f"missed (first 5): {missed}; wrongly flagged (first 5): {wrong}")
        print(report.summary().splitlines()[1])


if __name__ == "__main__":
    main()

"""Clean a folder of images into a new one: decode check, minimum size, exact and near duplicates, crop.

Nothing in the input folder is changed. The output folder receives the kept images (copied as they are, or
re-encoded as PNG when they had to be converted or were cropped), their captions (``.txt`` sidecars and
``metadata.csv`` rows), and ``clean_report.json`` / ``clean_report.txt`` listing every input file as kept or
dropped with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.data.buckets import default_step, make_buckets, nearest_bucket
from lora_trainer.data.captions import (
    METADATA_FILE,
    read_metadata_csv,
    read_txt_caption,
    write_metadata_csv,
    write_txt_caption,
)
from lora_trainer.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    SourceInfo,
    center_crop_resize,
    decode_image,
    load_image,
)
from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write, atomic_write_text

REPORT_JSON = "clean_report.json"
REPORT_TXT = "clean_report.txt"
DEDUP_MODES = ("phash", "clip", "off")
CROP_MODES = ("none", "center", "bucket")
CLIP_MODEL_ENV = "LORA_TRAINER_CLIP_MODEL"
DEFAULT_CLIP_DIR = Path("models") / "clip"
CROP_FRACTIONS = (0.93, 0.86)  # central crops hashed besides the whole image (see _fingerprint)
COLOUR_TOLERANCE = 24.0  # mean absolute difference (0..255) of 4x4 RGB thumbnails allowed for a phash match
CELL_COLOUR_TOLERANCE = 64  # and the largest channel difference in any one of the 16 thumbnail cells
_COPYABLE_FORMATS = {"PNG", "JPEG", "WEBP"}

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: ``"decode"``, ``"clip"``, ``"write"``."""


class CleanError(UserError):
    """Bad clean arguments or folders (missing input, non-empty output, no CLIP model)."""


@dataclass
class CleanEntry:
    """One input file and what happened to it."""

    file: str  # posix path relative to the input folder
    status: str  # "kept" or "dropped"
    kind: str  # image, caption, unreadable, too_small, exact_duplicate, near_duplicate, unsupported, hidden
    reason: str
    output: str | None = None  # posix path relative to the output folder
    width: int | None = None
    height: int | None = None
    target: str | None = None  # "WxH" of the written image when cropped
    duplicate_of: str | None = None


@dataclass
class CleanReport:
    """Every input file as kept or dropped, the settings used and (bucket crop) images per bucket."""

    input_dir: Path
    output_dir: Path
    settings: dict
    entries: list[CleanEntry]
    buckets: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)

    @property
    def kept(self) -> list[CleanEntry]:
        return [entry for entry in self.entries if entry.status == "kept"]

    @property
    def dropped(self) -> list[CleanEntry]:
        return [entry for entry in self.entries if entry.status == "dropped"]

    def kept_images(self) -> list[CleanEntry]:
        return [entry for entry in self.entries if entry.status == "kept" and entry.kind == "image"]

    def counts(self) -> dict[str, int]:
        """Dropped files per kind."""
        return dict(sorted(Counter(entry.kind for entry in self.dropped).items()))

    def to_dict(self) -> dict:
        return {
            "input": str(self.input_dir),
            "output": str(self.output_dir),
            "settings": self.settings,
            "summary": {"files": len(self.entries), "kept": len(self.kept), "kept_images": len(self.kept_images()),
                        "dropped": len(self.dropped), "dropped_by_kind": self.counts()},
            "buckets": self.buckets,
            "files": [asdict(entry) for entry in self.entries],
            "written": self.written,
        }

    def summary(self) -> str:
        """Two or three lines: totals, drops per kind, bucket counts."""
        kinds = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in self.counts().items())
        lines = [f"clean: {self.input_dir} -> {self.output_dir}",
                 f"{len(self.entries)} file(s): {len(self.kept_images())} image(s) kept, "
                 f"{len(self.dropped)} file(s) dropped" + (f" ({kinds})" if kinds else "")]
        if self.buckets:
            lines.append("buckets: " + ", ".join(f"{size}: {count}" for size, count in self.buckets.items()))
        return "\n".join(lines)

    def to_text(self) -> str:
        lines = [self.summary(), "", "dropped:"]
        lines += [f"  {entry.file}: {entry.reason}" for entry in self.dropped] or ["  (none)"]
        lines += ["", "kept:"]
        lines += [f"  {entry.file} -> {entry.output}" + (f" ({entry.reason})" if entry.reason else "")
                  for entry in self.kept] or ["  (none)"]
        return "\n".join(lines) + "\n"


@dataclass
class _Probe:
    """What the decode pass learned about one image file."""

    index: int
    width: int = 0
    height: int = 0
    sha: str = ""
    phash: tuple[int, ...] = (0,)  # of the whole picture and of its central CROP_FRACTIONS
    convert: bool = False  # must be re-encoded (mode, orientation, animation or format not kept as is)
    file_size: int = 0
    lossy: bool = False  # a JPEG: of same-size near duplicates a lossless file is preferred
    thumb: np.ndarray | None = None  # 4x4 RGB thumbnail: colour guard for phash (which sees only grey)
    error: str | None = None


# ---- files -----------------------------------------------------------------------------------------------
def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every file below ``folder`` (sorted) and the hidden files / folders (not entered)."""
    files: list[Path] = []
    hidden: list[Path] = []
    for root, dirs, names in os.walk(folder):
        root_path = Path(root)
        for name in sorted(dirs):
            if name.startswith("."):
                hidden.append(root_path / name)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in names:
            (hidden if name.startswith(".") else files).append(root_path / name)
    return sorted(files), sorted(hidden)


def _check_folders(input_dir: Path, output_dir: Path, overwrite: bool) -> None:
    if not input_dir.is_dir():
        raise CleanError(f"input folder {input_dir} does not exist" if not input_dir.exists()
                         else f"input {input_dir} is not a folder")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if inp == out or inp in out.parents or out in inp.parents:
        raise CleanError(f"output folder {output_dir} must not be the input folder {input_dir}, inside it, "
                         "or contain it (the input is never modified)")
    if output_dir.exists() and not output_dir.is_dir():
        raise CleanError(f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise CleanError(f"output folder {output_dir} already holds files; choose an empty or new folder, "
                             "or pass --overwrite (overwrite=True) to replace a previous clean's output")
        _remove_previous_output(output_dir)


def _remove_previous_output(output_dir: Path) -> None:
    """Delete the files a previous clean wrote here (listed in its report); other files are left alone."""
    report = output_dir / REPORT_JSON
    if not report.is_file():
        return
    try:
        written = json.loads(report.read_text(encoding="utf-8")).get("written", [])
    except (ValueError, AttributeError):
        return
    root = output_dir.resolve()
    for name in [*written, REPORT_JSON, REPORT_TXT]:
        path = (output_dir / name).resolve()
        if root in path.parents and path.is_file():
            path.unlink()


# ---- decode pass -------------------------------------------------------------------------------------------
def _dct_matrix(size: int = 32) -> np.ndarray:
    """The unnormalised DCT-II matrix (``C @ x`` equals ``scipy.fftpack.dct(x, axis=0)``)."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


_DCT32 = _dct_matrix(32)


def phash_int(grey32: Image.Image) -> int:
    """imagehash.phash of a 32x32 grey image as a 64-bit int (same algorithm; the DCT as two matrix products).

    Low 8x8 DCT coefficients compared with their median, row-major bits, first bit most significant.
    """
    pixels = np.asarray(grey32, dtype=np.float64)
    low = (_DCT32 @ pixels @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _fingerprint(image: Image.Image, want_phash: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """phashes of the whole image and of its central crops, and a 4x4 RGB colour thumbnail.

    The central-crop hashes make slightly cropped copies match: a copy cropped by a few percent looks like
    the original's centre. One BOX reduction of the full image feeds everything (cheap).
    """
    small = image.resize((128, 128), Image.Resampling.BOX, reducing_gap=1.0)
    thumb = np.asarray(small.resize((4, 4), Image.Resampling.BOX), dtype=np.int16).reshape(-1)
    if not want_phash:
        return (0,), thumb
    grey = small.convert("L")
    hashes = []
    for fraction in (1.0, *CROP_FRACTIONS):
        margin = 128 * (1.0 - fraction) / 2
        box = (margin, margin, 128 - margin, 128 - margin)
        hashes.append(phash_int(grey.resize((32, 32), Image.Resampling.LANCZOS, box=box)))
    return tuple(hashes), thumb


def _needs_conversion(info: SourceInfo) -> bool:
    """False when the file can be copied as is: plain RGB/grey PNG, JPEG or WebP, upright, one frame."""
    return not (info.format in _COPYABLE_FORMATS and info.mode in ("RGB", "L") and info.orientation in (0, 1)
                and info.frames == 1 and not info.transparency)


def _probe(index: int, path: Path, want_phash: bool) -> _Probe:
    try:
        image, info = decode_image(path)
    except ImageLoadError as error:
        return _Probe(index, error=error.reason)
    width, height = image.size
    sha = hashlib.sha256(f"{width}x{height}:".encode() + image.tobytes()).hexdigest()
    hashes, thumb = _fingerprint(image, want_phash)
    return _Probe(index, width, height, sha, hashes, _needs_conversion(info), info.file_size,
                  info.format == "JPEG", thumb)


def _probe_all(paths: list[Path], want_phash: bool, workers: int, progress: Progress | None) -> list[_Probe]:
    """Decode every image once (in threads: Pillow releases the GIL while decoding)."""
    results: list[_Probe] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for probe in pool.map(lambda item: _probe(item[0], item[1], want_phash), enumerate(paths)):
            results.append(probe)
            if progress:
                progress("decode", len(results), len(paths))
    return results


# ---- near-duplicate search ---------------------------------------------------------------------------------
_POPCOUNT_TABLE = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def _popcount64(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has bitwise_count; older numpy uses a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    values = np.ascontiguousarray(values)
    return _POPCOUNT_TABLE[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_pairs(hashes: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, threshold: int,
                  block: int = 1024) -> Iterator[tuple[int, int, int]]:
    """``(i, j, distance)`` for every ``i < j`` whose 64-bit hashes differ in at most ``threshold`` bits.

    ``hashes`` is one hash per item, or rows ``(whole, crop1, crop2, ...)``: then the distance is the
    smallest of whole-vs-whole and whole-vs-crop in both directions (a cropped copy matches the original's
    centre). Vectorised in row blocks against the remaining columns (no Python loop over pairs).
    """
    packed = np.asarray(hashes, dtype=np.uint64)
    if packed.ndim == 1:
        packed = packed[:, None]
    combos = [(0, 0)] + [pair for k in range(1, packed.shape[1]) for pair in ((k, 0), (0, k))]
    for start in range(0, len(packed), block):
        rows = packed[start:start + block]
        distances = None
        for a, b in combos:
            d = _popcount64(rows[:, a, None] ^ packed[None, start:, b])
            distances = d if distances is None else np.minimum(distances, d)
        row_index, col_index = np.nonzero(distances <= threshold)
        upper = col_index > row_index
        for i, j in zip(row_index[upper].tolist(), col_index[upper].tolist(), strict=True):
            yield start + i, start + j, int(distances[i, j])


def similar_pairs(embeddings: np.ndarray, min_similarity: float,
                  block: int = 1024) -> Iterator[tuple[int, int, float]]:
    """``(i, j, cosine)`` for every ``i < j`` of L2-normalised rows with cosine >= ``min_similarity``."""
    for start in range(0, len(embeddings), block):
        sims = embeddings[start:start + block] @ embeddings[start:].T
        row_index, col_index = np.nonzero(sims >= min_similarity)
        upper = col_index > row_index
        for i, j in zip(row_index[upper].tolist(), col_index[upper].tolist(), strict=True):
            yield start + i, start + j, float(sims[i, j])


def _greedy_groups(order: list[int], pairs: Iterator[tuple[int, int, float]]) -> dict[int, tuple[int, float]]:
    """Walk ``order`` (best first): each unclaimed item keeps itself and claims its unclaimed neighbours.

    Returns ``dropped -> (keeper, score)``; every dropped item is within the threshold of its own keeper.
    """
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for i, j, score in pairs:
        neighbours.setdefault(i, []).append((j, score))
        neighbours.setdefault(j, []).append((i, score))
    dropped: dict[int, tuple[int, float]] = {}
    kept: set[int] = set()
    for index in order:
        if index in dropped:
            continue
        kept.add(index)
        for other, score in sorted(neighbours.get(index, ()), key=lambda pair: pair[0]):
            if other not in dropped and other not in kept:
                dropped[other] = (index, score)
    return dropped


def _same_colours(first: _Probe, second: _Probe) -> bool:
    """phash ignores colour (and flat images all hash alike): also require similar 4x4 colour thumbnails.

    Similar on average and in every cell: a shape recoloured on a plain background (a red circle and a
    yellow one) changes one channel of a few cells a lot and the average little.
    """
    difference = np.abs(first.thumb - second.thumb)
    return float(difference.mean()) <= COLOUR_TOLERANCE and int(difference.max()) <= CELL_COLOUR_TOLERANCE


# ---- CLIP --------------------------------------------------------------------------------------------------
def _clip_folder(clip_model: str | Path | None) -> Path:
    candidates = [Path(clip_model)] if clip_model else [Path(p) for p in (os.environ.get(CLIP_MODEL_ENV),) if p]
    candidates = candidates or [DEFAULT_CLIP_DIR]
    folder = candidates[0]
    how = (f"pass --clip-model PATH (clip_model=...), set {CLIP_MODEL_ENV}, or put one in {DEFAULT_CLIP_DIR}/ "
           "(for example openai/clip-vit-base-patch32 saved with save_pretrained(..., safe_serialization=True)); "
           "or use --dedup phash")
    if not (folder / "config.json").is_file():
        raise CleanError(f"dedup 'clip' needs a local transformers CLIP model folder (config.json, "
                         f"model.safetensors, preprocessor_config.json); none at {folder}: {how}")
    if not any(folder.glob("*.safetensors")):
        raise CleanError(f"CLIP model {folder} has no .safetensors weights (pickled .bin weights are not "
                         f"loaded): {how}")
    return folder


def _clip_embeddings(paths: list[Path], folder: Path, progress: Progress | None,
                     batch_size: int = 32) -> np.ndarray:
    """L2-normalised CLIP image embeddings, one row per path, from the model in ``folder``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:
        side = model.config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    rows = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(path) for path in paths[start:start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=pixels)[1]
            features = model.visual_projection(pooled)
        rows.append(torch.nn.functional.normalize(features.float(), dim=-1).numpy())
        if progress:
            progress("clip", min(start + batch_size, len(paths)), len(paths))
    return np.concatenate(rows) if rows else np.zeros((0, 1), dtype=np.float32)


# ---- output ------------------------------------------------------------------------------------------------
def _output_name(relative: Path, convert: bool, taken: set[str]) -> str:
    """The output name: the input's, or ``.png`` when re-encoded (``a_jpg.png`` when ``a.png`` is taken).

    ``taken`` starts as every kept input name, so a re-encoded file never replaces a copied one.
    """
    name = relative.with_suffix(".png") if convert else relative
    if convert and name != relative and name.as_posix() in taken:
        name = relative.with_name(f"{relative.stem}_{relative.suffix.lstrip('.').lower()}.png")
    taken.add(name.as_posix())
    return name.as_posix()


def _write_image(source: Path, destination: Path, convert: bool, target: tuple[int, int] | None) -> None:
    if not convert and target is None:
        atomic_write(destination, lambda tmp: shutil.copyfile(source, tmp))
        return
    image = load_image(source)
    if target is not None:
        image = center_crop_resize(image, *target)
    atomic_write(destination, lambda tmp: image.save(tmp, format="PNG"))


def _validate(min_size: int, dedup: str, threshold: float, crop: str, resolution: int | None,
              clip_threshold: float) -> int | None:
    if dedup not in DEDUP_MODES:
        raise CleanError(f"dedup must be one of {', '.join(DEDUP_MODES)}, got {dedup!r}")
    if crop not in CROP_MODES:
        raise CleanError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    if min_size < 0:
        raise CleanError(f"min_size must be >= 0, got {min_size}")
    if dedup == "phash" and not 0 <= threshold <= 64:
        raise CleanError(f"threshold is a Hamming distance between 64-bit hashes (0..64), got {threshold}")
    if dedup == "clip" and not -1.0 <= clip_threshold <= 1.0:
        raise CleanError(f"clip_threshold is a cosine similarity (-1..1), got {clip_threshold}")
    if crop != "none":
        resolution = resolution or 512
        if resolution < 8:
            raise CleanError(f"resolution must be >= 8, got {resolution}")
    return resolution


def clean_dataset(input_dir: str | Path, output_dir: str | Path, *, min_size: int = 512, dedup: str = "phash",
                  threshold: float = 6, resolution: int | None = None, crop: str = "none",
                  progress: Progress | None = None, clip_model: str | Path | None = None,
                  clip_threshold: float = 0.95, overwrite: bool = False, workers: int | None = None) -> CleanReport:
    """Clean ``input_dir`` into ``output_dir`` (see the module docstring); returns the report it wrote.

    Order of checks: readable -> at least ``min_size`` on both sides -> exact duplicate (sha256 of the decoded
    pixels) -> near duplicate (phash Hamming distance <= ``threshold`` between the whole images or one image
    and the other's centre, with similar colours; or CLIP cosine >= ``clip_threshold``; of each group the
    largest image is kept, ties going to a lossless file, then the bigger file). ``crop``: ``"center"`` crops
    to ``resolution`` squared, ``"bucket"`` to the nearest aspect-ratio bucket of ``resolution``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    resolution = _validate(min_size, dedup, threshold, crop, resolution, clip_threshold)
    clip_folder = _clip_folder(clip_model) if dedup == "clip" else None  # fail before the long decode pass
    _check_folders(input_dir, output_dir, overwrite)
    files, hidden = _walk(input_dir)
    rel = {path: path.relative_to(input_dir) for path in files}
    images = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
    entries: dict[Path, CleanEntry] = {}
    for path in hidden:
        entries[path] = CleanEntry(path.relative_to(input_dir).as_posix(), "dropped", "hidden",
                                   "hidden file or folder (skipped)")

    probes = _probe_all(images, dedup == "phash", workers or min(8, os.cpu_count() or 1), progress)
    candidates: list[int] = []
    for probe in probes:
        path = images[probe.index]
        name = rel[path].as_posix()
        if probe.error:
            entries[path] = CleanEntry(name, "dropped", "unreadable", probe.error)
        elif probe.width < min_size or probe.height < min_size:
            entries[path] = CleanEntry(name, "dropped", "too_small",
                                       f"too small ({probe.width}x{probe.height} < {min_size})",
                                       width=probe.width, height=probe.height)
        else:
            candidates.append(probe.index)

    # exact duplicates: identical decoded pixels; the first file in path order is kept
    first_by_sha: dict[str, int] = {}
    unique: list[int] = []
    for index in candidates:
        probe, path = probes[index], images[index]
        original = first_by_sha.setdefault(probe.sha, index)
        if original != index:
            entries[path] = CleanEntry(rel[path].as_posix(), "dropped", "exact_duplicate",
                                       f"exact duplicate of {rel[images[original]].as_posix()}",
                                       width=probe.width, height=probe.height,
                                       duplicate_of=rel[images[original]].as_posix())
        else:
            unique.append(index)

    # near duplicates among the unique images: largest first keeps, its neighbours are dropped
    def rank(k: int) -> tuple:  # largest first; of equal sizes lossless, then the bigger file, then by name
        probe, path = probes[unique[k]], images[unique[k]]
        return -probe.width * probe.height, probe.lossy, -probe.file_size, rel[path].as_posix()

    order = sorted(range(len(unique)), key=rank)
    near: dict[int, tuple[int, float]] = {}
    if dedup == "phash" and unique:
        pairs = hamming_pairs([probes[i].phash for i in unique], int(threshold))
        near = _greedy_groups(order, (pair for pair in pairs
                                      if _same_colours(probes[unique[pair[0]]], probes[unique[pair[1]]])))
    elif dedup == "clip" and unique:
        embeddings = _clip_embeddings([images[i] for i in unique], clip_folder, progress)
        near = _greedy_groups(order, similar_pairs(embeddings, clip_threshold))
    for k, (keeper, score) in near.items():
        path, keeper_path = images[unique[k]], images[unique[keeper]]
        measure = f"distance {int(score)}" if dedup == "phash" else f"similarity {score:.3f}"
        entries[path] = CleanEntry(rel[path].as_posix(), "dropped", "near_duplicate",
                                   f"near duplicate of {rel[keeper_path].as_posix()} ({measure})",
                                   width=probes[unique[k]].width, height=probes[unique[k]].height,
                                   duplicate_of=rel[keeper_path].as_posix())

    # write the kept images and their sidecar captions
    output_dir.mkdir(parents=True, exist_ok=True)
    kept = [i for k, i in enumerate(unique) if k not in near]
    buckets = make_buckets(resolution, step=default_step(resolution)) if crop == "bucket" else None
    bucket_counts: Counter[str] = Counter()
    written: list[str] = []
    taken = {rel[images[index]].as_posix() for index in kept}
    out_names: dict[str, str] = {}
    for done, index in enumerate(kept, start=1):
        probe, path = probes[index], images[index]
        target = None
        if crop == "center":
            target = (resolution, resolution)
        elif buckets is not None:
            target = nearest_bucket(probe.width, probe.height, buckets)
            bucket_counts[f"{target[0]}x{target[1]}"] += 1
        out_name = _output_name(rel[path], probe.convert or target is not None, taken)
        _write_image(path, output_dir / out_name, probe.convert, target)
        written.append(out_name)
        out_names[rel[path].as_posix()] = out_name
        reason = "converted to PNG" if probe.convert else ""
        if target is not None:
            reason = f"cropped to {target[0]}x{target[1]}"
        entries[path] = CleanEntry(rel[path].as_posix(), "kept", "image", reason, out_name, probe.width,
                                   probe.height, f"{target[0]}x{target[1]}" if target else None)
        caption = read_txt_caption(path)
        if caption is not None:
            write_txt_caption(output_dir / out_name, caption, overwrite=True)
            written.append(Path(out_name).with_suffix(".txt").as_posix())
        if progress:
            progress("write", done, len(kept))

    _list_other_files(input_dir, files, rel, images, entries, out_names, output_dir, written)
    settings = {"min_size": min_size, "dedup": dedup, "threshold": threshold, "crop": crop,
                "resolution": resolution}
    if dedup == "clip":
        settings["clip_threshold"] = clip_threshold
    report = CleanReport(input_dir, output_dir, settings, sorted(entries.values(), key=lambda e: e.file),
                         dict(sorted(bucket_counts.items())), sorted(written))
    atomic_write_text(output_dir / REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(output_dir / REPORT_TXT, report.to_text())
    return report


def _list_other_files(input_dir: Path, files: list[Path], rel: dict[Path, Path], images: list[Path],
                      entries: dict[Path, CleanEntry], out_names: dict[str, str], output_dir: Path,
                      written: list[str]) -> None:
    """Caption files (carried with their images) and anything else (dropped as unsupported)."""
    sidecar_of: dict[Path, list[Path]] = {}
    for image in images:
        sidecar_of.setdefault(image.with_suffix(".txt"), []).append(image)
    metadata = input_dir / METADATA_FILE
    for path in files:
        if path in entries:
            continue
        name = rel[path].as_posix()
        owners = sidecar_of.get(path)
        if path == metadata:
            rows = read_metadata_csv(path)
            carried = {out_names[file]: text for file, text in rows.items() if file in out_names}
            write_metadata_csv(output_dir / METADATA_FILE, carried)
            written.append(METADATA_FILE)
            entries[path] = CleanEntry(name, "kept", "caption",
                                       f"captions: {len(carried)} of {len(rows)} row(s) carried for kept images",
                                       METADATA_FILE)
        elif owners:
            kept_owner = next((rel[o].as_posix() for o in owners if rel[o].as_posix() in out_names), None)
            if kept_owner:
                entries[path] = CleanEntry(name, "kept", "caption", f"caption of {kept_owner}",
                                           Path(out_names[kept_owner]).with_suffix(".txt").as_posix())
            else:
                entries[path] = CleanEntry(name, "dropped", "caption",
                                           f"caption of dropped image {rel[owners[0]].as_posix()}")
        else:
            what = "caption without an image" if path.suffix.lower() == ".txt" else "not an image file type"
            entries[path] = CleanEntry(name, "dropped", "unsupported", f"unsupported ({what})")


# ---- command line ------------------------------------------------------------------------------------------
def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m lora_trainer clean``."""
    parser.add_argument("--input", required=True, help="folder of raw images (never modified)")
    parser.add_argument("--output", required=True, help="new folder for the kept images, captions and report")
    parser.add_argument("--min-size", type=int, default=512, help="drop images with a side shorter than this")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="phash", help="near-duplicate detection")
    parser.add_argument("--threshold", type=int, default=6,
                        help="phash: largest Hamming distance (of 64 bits) counted as a near duplicate")
    parser.add_argument("--clip-threshold", type=float, default=0.95,
                        help="clip: smallest cosine similarity counted as a near duplicate")
    parser.add_argument("--clip-model", default=None,
                        help=f"local transformers CLIP model folder for --dedup clip (default: ${CLIP_MODEL_ENV} "
                             f"or {DEFAULT_CLIP_DIR})")
    parser.add_argument("--resolution", type=int, default=None, help="crop size (default 512 when cropping)")
    parser.add_argument("--crop", choices=CROP_MODES, default="none",
                        help="center: square crop to --resolution; bucket: nearest aspect-ratio bucket")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: CPU count, max 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an output folder that already holds files (a previous clean's are replaced)")


def run_clean(args: argparse.Namespace) -> int:
    """Run ``clean`` with tqdm bars; print the summary and where the report is."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="img", dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        report = clean_dataset(args.input, args.output, min_size=args.min_size, dedup=args.dedup,
                               threshold=args.threshold, resolution=args.resolution, crop=args.crop,
                               progress=progress, clip_model=args.clip_model, clip_threshold=args.clip_threshold,
                               overwrite=args.overwrite, workers=args.workers)
    finally:
        for bar in bars.values():
            bar.close()
    print(report.summary())
    print(f"report: {Path(args.output) / REPORT_TXT} (and {REPORT_JSON})")
    return 0

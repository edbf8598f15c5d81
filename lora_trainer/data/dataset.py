"""The training set: scan a folder (decode check, captions, target sizes) and batch it per epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.data.buckets import default_step, make_buckets, nearest_bucket
from lora_trainer.data.captions import CaptionRow, apply_trigger, read_captions
from lora_trainer.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    center_crop_resize,
    flip_horizontal,
    list_image_files,
    load_image,
    to_tensor,
)
from lora_trainer.errors import UserError


class DatasetError(UserError):
    """A training folder that cannot be used (missing, empty, every image broken)."""


@dataclass
class TrainItem:
    """One training image: its file, caption (trigger word applied), decoded size and training size."""

    path: Path
    caption: str
    width: int
    height: int
    target: tuple[int, int]


@dataclass
class DatasetScan:
    """The result of scanning a folder: usable items, skipped files with reasons, uncaptioned files."""

    items: list[TrainItem]
    skipped: list[tuple[Path, str]]
    uncaptioned: list[Path]
    folder: Path | None = field(default=None)
    trigger_word: str = ""
    unmatched: list[CaptionRow] = field(default_factory=list)  # metadata.csv rows naming no image of the folder
    csv_path: Path | None = None

    def _name(self, path: Path) -> str:
        if self.folder is not None:
            try:
                return path.relative_to(self.folder).as_posix()
            except ValueError:
                pass
        return str(path)

    def warnings(self) -> list[str]:
        """Human lines: every skipped file with its reason; every uncaptioned file."""
        lines = []
        if self.skipped:
            listed = "; ".join(f"{self._name(path)} ({reason})" for path, reason in self.skipped)
            lines.append(f"skipped {len(self.skipped)} unusable image(s): {listed}")
        if self.uncaptioned:
            listed = ", ".join(self._name(path) for path in self.uncaptioned)
            trigger = self.trigger_word.strip()
            using = f"the trigger word {trigger!r} as caption" if trigger else "an empty caption"
            lines.append(f"{len(self.uncaptioned)} image(s) have no caption, using {using} for them: {listed}")
        if self.unmatched:
            listed = ", ".join(f"line {row.line} {row.filename!r}" for row in self.unmatched[:10])
            more = f", and {len(self.unmatched) - 10} more" if len(self.unmatched) > 10 else ""
            lines.append(f"{self.csv_path} names {len(self.unmatched)} file(s) that are not images in the folder "
                         f"(their captions are unused): {listed}{more}")
        return lines


def _describe_broken(folder: Path, skipped: list[tuple[Path, str]]) -> str:
    shown = "; ".join(f"{path.relative_to(folder).as_posix()} ({reason})" for path, reason in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return f"every image in {folder} failed to load: {shown}{more}"


def scan_dataset(folder: str | Path, metadata_path: str | Path | None = None, trigger_word: str = "",
                 resolution: int = 512, bucket: bool = False) -> DatasetScan:
    """Decode every image under ``folder`` once, attach captions and pick each image's training size.

    Broken images are skipped (with a reason); images without a caption get the trigger word alone.
    Raises DatasetError when the folder is missing, holds no images, or every image is broken.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"training folder {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"training folder {folder} is not a folder")
    paths = list_image_files(folder)
    if not paths:
        kinds = ", ".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        raise DatasetError(f"no images ({kinds}) in training folder {folder}")
    found = read_captions(folder, metadata_path)
    captions = found.captions
    names = {path.relative_to(folder).as_posix() for path in paths}
    unmatched = [row for row in found.rows if row.filename not in names]
    buckets = make_buckets(resolution, step=default_step(resolution)) if bucket else None
    items: list[TrainItem] = []
    skipped: list[tuple[Path, str]] = []
    uncaptioned: list[Path] = []
    for path in paths:
        try:
            with load_image(path) as image:
                width, height = image.size
        except ImageLoadError as error:
            skipped.append((path, error.reason))
            continue
        caption = captions.get(path.relative_to(folder).as_posix(), "").strip()
        if not caption:
            uncaptioned.append(path)
        target = nearest_bucket(width, height, buckets) if buckets else (resolution, resolution)
        items.append(TrainItem(path, apply_trigger(caption, trigger_word), width, height, target))
    if not items:
        raise DatasetError(_describe_broken(folder, skipped))
    return DatasetScan(items, skipped, uncaptioned, folder, trigger_word, unmatched, found.csv_path)


def load_pixels(item: TrainItem, flip: bool = False) -> torch.Tensor:
    """The item's image at ``item.target`` as ``[3, h, w]`` in ``[-1, 1]`` (mirrored when ``flip``)."""
    image = center_crop_resize(load_image(item.path), *item.target)
    if flip:
        image = flip_horizontal(image)
    return to_tensor(image)


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from a hash of ``(seed, epoch)`` (torch's CPU generator keeps only 32 seed bits)."""
    digest = hashlib.sha256(f"epoch_batches:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def epoch_batches(items: Sequence[TrainItem], batch_size: int, seed: int, epoch: int,
                  repeats: int = 1) -> list[list[int]]:
    """The batches of one epoch as lists of item indices.

    Every index appears ``repeats`` times; the order is shuffled from ``(seed, epoch)`` alone; a batch only
    holds items of one target size; only the last batch of each size may be short; batch order is shuffled.
    Items without a ``target`` (text examples) form one group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    generator = _generator(seed, epoch)
    pool = [index for index in range(len(items)) for _ in range(repeats)]
    order = torch.randperm(len(pool), generator=generator).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for position in order:
        index = pool[position]
        groups.setdefault(tuple(getattr(items[index], "target", ())), []).append(index)
    batches = [
        group[start:start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]

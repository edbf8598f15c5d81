"""WD14-style booru tagger: an ONNX image classifier plus ``selected_tags.csv``, run with onnxruntime."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.caption.base import (
    CaptionDependencyMissing,
    CaptionDeviceError,
    CaptionModelBroken,
    CaptionModelMissing,
)
from lora_trainer.fsutil import read_utf8

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
CATEGORY_GENERAL = 0
CATEGORY_CHARACTER = 4
CATEGORY_RATING = 9
DEFAULT_SIZE = 448
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass(frozen=True)
class Tag:
    """One row of ``selected_tags.csv``."""

    name: str
    category: int


def is_kaomoji(name: str) -> bool:
    """``^_^``, ``o_o``, ``>_<``: underscore tags with no word in them keep their underscores."""
    return "_" in name and _WORD.search(name) is None


def display_name(name: str) -> str:
    """Tag as written in a caption: underscores become spaces, kaomoji stay as they are."""
    return name if is_kaomoji(name) else name.replace("_", " ")


def _normalize(name: str) -> str:
    return display_name(name.strip()).strip().lower()


def parse_exclude(text: str | Iterable[str] | None) -> frozenset[str]:
    """``"tag1, tag_2"`` (or a list) -> normalized names; ``long_hair`` and ``long hair`` match alike."""
    if text is None:
        return frozenset()
    items = text.split(",") if isinstance(text, str) else list(text)
    return frozenset(n for n in (_normalize(i) for i in items) if n)


def read_selected_tags(path: str | Path) -> list[Tag]:
    """Read ``selected_tags.csv`` (columns tag_id,name,category,count); order is the model's output order."""
    path = Path(path)
    with io.StringIO(read_utf8(path), newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "category"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                             "expected tag_id,name,category,count")
        tags = []
        for line, row in enumerate(reader, start=2):
            try:
                tags.append(Tag(row["name"], int(row["category"])))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: bad category {row.get('category')!r}") from err
    return tags


def select_tags(
    scores: Sequence[float],
    tags: Sequence[Tag],
    *,
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    exclude: frozenset[str] = frozenset(),
) -> list[tuple[str, float]]:
    """General tags above ``threshold``, character tags above ``character_threshold``, ratings dropped;
    excluded names removed; highest confidence first (ties keep the csv order)."""
    picked = []
    for index, (tag, score) in enumerate(zip(tags, scores, strict=True)):
        if tag.category == CATEGORY_CHARACTER:
            limit = character_threshold
        elif tag.category == CATEGORY_RATING:
            continue
        else:
            limit = threshold
        if score > limit and _normalize(tag.name) not in exclude:
            picked.append((-float(score), index, display_name(tag.name)))
    return [(name, -neg) for neg, _, name in sorted(picked)]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB(A) image -> HWC float32 BGR 0-255, centred on a white square, resized to ``size``."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    else:
        image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def _providers(ort, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise CaptionDeviceError("device 'cuda' asked for, but this onnxruntime has no CUDA provider "
                           f"(it has {', '.join(available)}): pip install onnxruntime-gpu")
    return ["CPUExecutionProvider"]


def resolve_tagger_files(model: str | Path | None) -> tuple[Path, Path]:
    """``model`` is a folder holding model.onnx + selected_tags.csv, or the .onnx file itself."""
    expected = [MODEL_FILE, TAGS_FILE]
    hint = "Pass the folder with --model (any WD14 tagger export, e.g. SmilingWolf's wd-v1-4 taggers)."
    if model is None:
        raise CaptionModelMissing("WD14 tagger", None, expected, hint)
    path = Path(model).expanduser()
    onnx_path, folder = (path, path.parent) if path.suffix == ".onnx" else (path / MODEL_FILE, path)
    tags_path = folder / TAGS_FILE
    if not onnx_path.is_file() or not tags_path.is_file():
        raise CaptionModelMissing("WD14 tagger", folder, expected, hint)
    return onnx_path, tags_path


class WD14Tagger:
    """Booru-style tags for each image, joined with ", "."""

    name = "tagger"

    def __init__(
        self,
        model: str | Path | None,
        *,
        threshold: float = 0.35,
        character_threshold: float = 0.85,
        exclude: str | Iterable[str] | None = None,
        device: str = "auto",
    ) -> None:
        onnx_path, tags_path = resolve_tagger_files(model)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise CaptionDependencyMissing("onnxruntime", "onnxruntime", "The WD14 tagger") from err
        self.tags = read_selected_tags(tags_path)
        self.threshold = threshold
        self.character_threshold = character_threshold
        self.exclude = parse_exclude(exclude)
        providers = _providers(ort, device)
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail...)
            raise CaptionModelBroken("WD14 tagger", onnx_path, f"not a valid ONNX model: {err}",
                                     "Replace it with the tagger's model.onnx") from None
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        shape = list(spec.shape)
        self.size = shape[1] if len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        self.max_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        outputs = self.session.get_outputs()[0].shape
        width = outputs[-1] if outputs and isinstance(outputs[-1], int) else None
        if width is not None and width != len(self.tags):
            raise ValueError(f"{tags_path} lists {len(self.tags)} tags but {onnx_path} outputs {width} scores")

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """Per-image tag probabilities, shape (len(images), len(tags))."""
        if not images:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        batch = np.stack([prepare_image(image, self.size) for image in images])
        step = self.max_batch or len(images)
        parts = [self.session.run(None, {self.input_name: batch[i:i + step]})[0] for i in range(0, len(batch), step)]
        probs = np.concatenate(parts).astype(np.float32)
        if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):  # a model that ends in logits
            probs = 1.0 / (1.0 + np.exp(-probs))
        return probs

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One comma-separated tag list per image."""
        return [", ".join(name for name, _ in self.tag_scores(row)) for row in self.scores(images)]

    def tag_scores(self, row: Sequence[float]) -> list[tuple[str, float]]:
        """The selected (tag, confidence) pairs for one image's scores."""
        if len(row) != len(self.tags):
            raise ValueError(f"model gave {len(row)} scores for {len(self.tags)} tags")
        return select_tags(row, self.tags, threshold=self.threshold,
                           character_threshold=self.character_threshold, exclude=self.exclude)


__all__ = ["WD14Tagger", "Tag", "read_selected_tags", "select_tags", "prepare_image", "parse_exclude",
           "display_name", "is_kaomoji", "resolve_tagger_files"]

"""The epoch picker's grid: every snapshot at a few LoRA weights on every sample prompt, with one seed.

Each cell is rendered by the backbone's own sampler (in the WebUI: its txt2img with the loaded checkpoint)
with the snapshot's weights put into the LoRA layers and the layers' scale multiplied by the weight, as
``<lora:name:weight>`` does; both are put back exactly afterwards. The cells are also composed into one image.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn

from lora_trainer.fsutil import atomic_write
from lora_trainer.lora.inject import ADAPTER, lora_modules
from lora_trainer.train.snapshots import Snapshot, weights_of

GRID_WEIGHTS = (0.4, 0.7, 1.0)
MAX_GRID_ROWS = 8  # at most this many snapshots in a grid (evenly chosen; the best and the final always)
CELL = 192  # px of a cell in the composed image
LABEL_WIDTH = 170
HEADER = 54


@dataclass
class GridCell:
    snapshot: Snapshot
    weight: float
    prompt: str
    image: Any  # PIL image


@contextmanager
def lora_weight(roots: dict[str, nn.Module], weight: float) -> Iterator[None]:
    """Scale every LoRA layer's update by ``weight`` inside the block; the exact scales come back after."""
    layers = [layer for root in roots.values() for layer in lora_modules(root).values()]
    saved = [layer.scaling[ADAPTER] for layer in layers]
    try:
        for layer, scale in zip(layers, saved, strict=True):
            layer.scaling[ADAPTER] = scale * weight
        yield
    finally:
        for layer, scale in zip(layers, saved, strict=True):
            layer.scaling[ADAPTER] = scale


def pick_rows(snapshots: Sequence[Snapshot], limit: int = MAX_GRID_ROWS) -> list[Snapshot]:
    """At most ``limit`` snapshots, evenly spread over the run; "best" and "final" ones are always kept."""
    keep = [s for s in snapshots if s.kind != "epoch"]
    epochs = [s for s in snapshots if s.kind == "epoch"]
    room = max(limit - len(keep), 0)
    if len(epochs) > room:
        epochs = [epochs[round(i * (len(epochs) - 1) / max(room - 1, 1))] for i in range(room)] if room else []
    chosen = {id(s) for s in [*epochs, *keep]}
    return [s for s in snapshots if id(s) in chosen]


def render_cells(backbone: Any, roots: dict[str, nn.Module], snapshots: Sequence[Snapshot],
                 weights: Sequence[float], prompts: Sequence[str], *, seed: int, steps: int, size: int,
                 should_stop: Callable[[], bool] = lambda: False,
                 on_cell: Callable[[int, int], None] | None = None) -> list[GridCell] | None:
    """Snapshots x weights x prompts cells, snapshot by snapshot; None when stopped part way."""
    cells: list[GridCell] = []
    total = len(snapshots) * len(weights) * len(prompts)
    for snapshot in snapshots:
        with weights_of(roots, snapshot.path):
            for weight in weights:
                if should_stop():
                    return None
                with lora_weight(roots, weight):
                    images = backbone.sample(list(prompts), seed=seed, steps=steps, width=size, height=size)
                cells += [GridCell(snapshot, float(weight), p, im) for p, im in zip(prompts, images, strict=True)]
                if on_cell is not None:
                    on_cell(len(cells), total)
    return cells


def _font(size: int) -> Any:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def compose_grid(cells: Sequence[GridCell], cell: int = CELL) -> Image.Image:
    """One picture: a row per snapshot, a column per (prompt, weight), labelled on the left and on top."""
    rows = list(dict.fromkeys(c.snapshot for c in cells))
    prompts = list(dict.fromkeys(c.prompt for c in cells))
    columns = [(prompt, weight) for prompt in prompts for weight in dict.fromkeys(c.weight for c in cells)]
    image = Image.new("RGB", (LABEL_WIDTH + cell * len(columns), HEADER + cell * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    small, text = _font(12), _font(14)
    for prompt in prompts:
        spans = [i for i, (p, _) in enumerate(columns) if p == prompt]
        left = LABEL_WIDTH + cell * spans[0]
        width = cell * len(spans)
        shown = textwrap.shorten(prompt, width=max(8, width // 8), placeholder="...")
        draw.text((left + 6, 6), shown, fill="black", font=text)
        draw.line([(left, 2), (left, HEADER - 2)], fill=(200, 200, 200))
    for index, (_, weight) in enumerate(columns):
        draw.text((LABEL_WIDTH + cell * index + cell // 2 - 28, 30), f"weight {weight:.1f}", fill="black",
                  font=text)
    placed = {(c.snapshot, c.prompt, c.weight): c.image for c in cells}
    for row, snapshot in enumerate(rows):
        top = HEADER + cell * row
        lines = [piece for part in snapshot.label.split(", ") for piece in textwrap.wrap(part, width=22)]
        for line, words in enumerate(lines[:6]):
            draw.text((6, top + 8 + 16 * line), words, fill="black", font=small)
        for index, (prompt, weight) in enumerate(columns):
            picture = placed.get((snapshot, prompt, weight))
            if picture is not None:
                thumb = ImageOps.contain(picture.convert("RGB"), (cell - 4, cell - 4))  # small ones grow
                image.paste(thumb, (LABEL_WIDTH + cell * index + 2, top + 2))
    return image


def preview_cells(cells: Sequence[GridCell], weight: float = 0.8) -> dict[Snapshot, Any]:
    """Per snapshot, its picture of the first prompt at the weight nearest ``weight`` (its preview)."""
    out: dict[Snapshot, GridCell] = {}
    for cell in cells:
        kept = out.get(cell.snapshot)
        if kept is None or (cell.prompt == kept.prompt and abs(cell.weight - weight) < abs(kept.weight - weight)):
            out[cell.snapshot] = cell
    return {snapshot: cell.image for snapshot, cell in out.items()}


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a picture as PNG (atomic; an older file of the same name is replaced)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))

"""Aspect-ratio buckets: training sizes of about ``resolution**2`` pixels in several shapes."""

from __future__ import annotations

import math


def default_step(resolution: int) -> int:
    """The bucket side step for ``resolution``: 64 from 512 px up, smaller (a multiple of 8) below."""
    return min(64, max(8, resolution // 64 * 8))


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(width, height)`` sizes, multiples of ``step``, area <= ``resolution**2``, aspect ratio <= ``max_ratio``.

    For every short side the longest side that fits the area is taken, so each bucket uses the pixel
    budget as fully as the step allows; both orientations. Sorted by width; always holds one size or more.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    found: set[tuple[int, int]] = set()
    width = step
    while True:  # portrait and square sizes (width <= height), each mirrored into its landscape twin
        height = area // width // step * step
        if height < width:
            break
        if height / width <= max_ratio + 1e-9:
            found.update({(width, height), (height, width)})
        width += step
    buckets = sorted(found)
    if not buckets:  # only when max_ratio is too tight for the step: fall back to the largest square
        side = resolution // step * step
        buckets.append((side, side))
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width / height`` (distance in log space)."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - target), -size[0] * size[1]))

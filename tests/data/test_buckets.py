"""Aspect-ratio buckets."""

from __future__ import annotations

import math

import pytest

from lora_trainer.data.buckets import default_step, make_buckets, nearest_bucket


@pytest.mark.parametrize(("resolution", "step", "max_ratio"), [(512, 64, 2.0), (1024, 64, 2.0), (768, 32, 3.0),
                                                                (64, 8, 2.0)])
def test_bucket_rules(resolution, step, max_ratio):
    buckets = make_buckets(resolution, step=step, max_ratio=max_ratio)
    assert buckets == sorted(set(buckets))
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution * resolution
        assert max(width / height, height / width) <= max_ratio
        assert (height, width) in buckets  # both orientations
    assert (resolution, resolution) in buckets


def test_buckets_for_512():
    assert make_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


def test_default_step():
    assert [default_step(r) for r in (64, 128, 256, 512, 1024)] == [8, 16, 32, 64, 64]


def test_nearest_bucket_in_log_space():
    buckets = make_buckets(512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(3000, 1000, buckets) == (640, 384)  # wider than any bucket: the widest
    assert nearest_bucket(1000, 3000, buckets) == (384, 640)
    assert nearest_bucket(1300, 1000, buckets) == (576, 448)
    # log distance is symmetric: a 2:1 and a 1:2 image are equally far from square
    ratio = math.log(2)
    assert nearest_bucket(200, 100, [(64, 64), (128, 64)]) == (128, 64)
    assert abs(math.log(128 / 64) - ratio) < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="smaller than the bucket step"):
        make_buckets(32, step=64)
    with pytest.raises(ValueError, match="no buckets"):
        nearest_bucket(10, 10, [])
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, [(64, 64)])

"""One intra-op thread for these tests: tiny models gain nothing from more, and on a shared 2-core machine
OpenMP threads of parallel test runs contend badly (a tiny UNet forward: ~0.3 s alone, ~20 s contended)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

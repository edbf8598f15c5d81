"""The GPU benchmark's code path, run on the CPU with the tiny UNet (no timing is asserted), and its refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_case_runs_on_cpu_with_the_tiny_unet(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks import gpu

    result = gpu.run_case("tiny", 64, 2, steps=1, device_name="cpu")
    assert result["attention"] == "AttnProcessor2_0" and result["optimizer"] == "adamw"
    assert result["estimate_gib"] > 0 and result["s_per_step"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_benchmark_refuses_without_cuda_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 1 and done.stderr == ""
    assert done.stdout.strip() == "benchmarks/gpu.py needs a CUDA GPU; none is available here."

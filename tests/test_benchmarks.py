"""The GPU benchmark's code path, run on the CPU with the tiny UNet (no timing is asserted), and its refusal;
compare_kohya's SDXL settings, step_clock's kohya sizes and the per-run measurement (no kohya needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_compare_kohya_runs_kohyas_sdxl_script_with_its_sizes_set_and_text_encoder_outputs_cached(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks import compare_kohya, sizes

    args = SimpleNamespace(model="sdxl", size="mid", kohya_python=sys.executable, sd_scripts="/sd-scripts",
                           resolution=128, steps=4, checkpointing=False)
    command = compare_kohya.kohya_command(args, Path("/w"), Path("/w/c.safetensors"), Path("/w/data/1_bench"),
                                          Path("/w/out"))
    clock = command[command.index(str(compare_kohya.CLOCK)) + 1:command.index("--")]
    assert clock[:4] == ["--sdxl-unet-width", "160", "--sdxl-text-encoder-2-layers", "8"]
    assert command[command.index("--") + 1] == "/sd-scripts/sdxl_train_network.py"
    assert "--cache_text_encoder_outputs" in command and "--network_train_unet_only" in command
    sd15 = compare_kohya.kohya_command(SimpleNamespace(**{**vars(args), "model": "sd15"}), Path("/w"),
                                       Path("/w/c.safetensors"), Path("/w/data/1_bench"), Path("/w/out"))
    assert sd15[sd15.index("--") + 1] == "/sd-scripts/train_network.py" and "--unet-width" in sd15
    assert "--cache_text_encoder_outputs" not in sd15
    assert sizes.sdxl_unet_config()["attention_head_dim"] == (5, 10, 20)  # SDXL base's heads, 64 wide
    assert sizes.sdxl_unet_config("mid")["block_out_channels"] == (160, 320, 640)


def test_step_clock_sets_kohyas_sdxl_sizes_only(monkeypatch, tmp_path):
    """Stand-ins for kohya's two SDXL modules: the UNet width constants and the bigG layer count are set."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    library = tmp_path / "library"
    library.mkdir()
    (library / "__init__.py").write_text("")
    (library / "sdxl_original_unet.py").write_text("MODEL_CHANNELS = 320\nTIME_EMBED_DIM = 1280\nCONTEXT_DIM = 2048\n")
    (library / "sdxl_model_util.py").write_text("def CLIPTextConfig(**kwargs):\n    return kwargs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("library", "library.sdxl_original_unet", "library.sdxl_model_util")
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    from benchmarks import step_clock

    try:
        step_clock._kohya_sdxl_sizes(160, 8)
        import library.sdxl_model_util as util
        import library.sdxl_original_unet as unet
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert (unet.MODEL_CHANNELS, unet.TIME_EMBED_DIM, unet.CONTEXT_DIM) == (160, 640, 2048)
    assert util.CLIPTextConfig(hidden_size=1280, num_hidden_layers=32)["num_hidden_layers"] == 8
    assert util.CLIPTextConfig(hidden_size=768, num_hidden_layers=12)["num_hidden_layers"] == 12


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="the RSS sampler reads Linux's /proc")
def test_compare_kohya_times_steps_and_says_when_the_peak_rss_came(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks import compare_kohya

    child = ("import sys, time\n"
             "def clock():\n    print(f'STEP_CLOCK {time.time():.3f}', flush=True)\n"
             "print('allocating', flush=True)\nblock = b'x' * (300 * 2**20)\ntime.sleep(0.8)\n"
             "del block\nprint('freed', flush=True)\n"
             "for _ in range(3):\n    time.sleep(0.3)\n    clock()\n")
    result = compare_kohya.run_once("child", [sys.executable, "-c", child], tmp_path, dict(os.environ),
                                    tmp_path / "child.log")
    assert 0.2 < result["s_per_step"] < 1.0 and result["first_step_s"] > 0.8
    assert result["peak_rss_gib"] > 0.29
    peak = result["sampled_peak"]
    assert peak["gib"] > 0.29 and peak["steps"] == 0 and peak["after"] == "allocating"
    assert 0 < peak["steps_gib"] < peak["gib"] - 0.2
    assert (tmp_path / "child.log").read_text().splitlines() == ["allocating", "freed"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is read from Linux's /proc")
def test_the_peak_rss_is_the_childs_own_not_its_parents(tmp_path):
    """A child started from a process that once held 600 MB reports its own peak (step_clock's VmHWM line), not
    the parent's, which the kernel carries over into the child's ru_maxrss."""
    import subprocess

    child = tmp_path / "child.py"
    child.write_text("import torch\nfor _ in range(3):\n"
                     "    torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).step()\n")
    parent = ("import sys\nfrom pathlib import Path\nfrom benchmarks import compare_kohya\n"
              "block = bytearray(600 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\ndel block\n"
              "folder = Path(sys.argv[1])\n"
              "command = [sys.executable, str(compare_kohya.CLOCK), '--', str(folder / 'child.py')]\n"
              "print(compare_kohya.run_once('child', command, folder, {}, folder / 'child.log')['peak_rss_gib'])\n")
    done = subprocess.run([sys.executable, "-c", parent, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert 0.05 < float(done.stdout.split()[-1]) < 0.5  # torch alone: ~0.3 GB; the parent's 600 MB not counted


def test_optimizer_step_benchmark_steps_the_lora_the_trainer_makes():
    """Its LoRA has the shapes of compare_kohya's: SD1.5 mid size, 192 modules, 3,588,096 parameters (what both
    trainers' files hold, README); each implementation prints a time or says it is not available."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from optimizer_step import lora_shapes

    shapes = lora_shapes("sd15", "mid", rank=16)
    assert len(shapes) == 2 * 192
    assert sum(a * b for a, b in shapes) == 3_588_096
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimizer_step.py"), "--model", "sd15",
                           "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sd15 mid: 384 LoRA tensors, 3.6M parameters")
    for label in ("per-tensor loop", "multi-tensor", "fused"):
        line = next(line for line in lines if line.startswith(label))
        assert line.endswith("ms/step") or "not available" in line

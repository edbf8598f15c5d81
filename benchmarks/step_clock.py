"""Run a training script with a clock on its optimizer: prints ``STEP_CLOCK <unix time>`` after every
``torch.optim.AdamW.step`` (both trainers use it), so steps are timed the same way for any trainer, and at exit
``STEP_PEAK_RSS <bytes>``: the process's own peak resident memory (Linux: ``VmHWM``). A parent's ``wait4``
``ru_maxrss`` is no substitute: the kernel carries the parent's peak over into a child started by fork or vfork,
so a child of a 2 GiB parent reports at least 2 GiB, whatever it used itself.

    python benchmarks/step_clock.py [--unet-width N] -- script.py ARGS...   # a script (kohya's train_network.py)
    python benchmarks/step_clock.py --sdxl-unet-width N --sdxl-text-encoder-2-layers N -- sdxl_train_network.py ...
    python benchmarks/step_clock.py -- -m lora_trainer train --config c.yaml  # a module

``--unet-width`` sets kohya sd-scripts' SD1.5 UNet width constants (320 in its code) before the script runs, so
that it can load the mid-size benchmark checkpoint; nothing else of the script is touched. For SDXL,
``--sdxl-unet-width`` sets its SDXL UNet's width constants (``MODEL_CHANNELS`` 320 and the time embedding's 4x
that) and ``--sdxl-text-encoder-2-layers`` the layer count of the OpenCLIP bigG config its loader writes out
(32); the text encoders' widths stay, as kohya's SDXL UNet has their sum (2048) written into its blocks.
``--torchvision-shim`` declares the two operators torchvision's import needs when its compiled part cannot load
(PyPI's torchvision is built for CUDA torch; kohya imports only ``torchvision.transforms`` from it, which is plain
Python).
"""

from __future__ import annotations

import atexit
import runpy
import sys
import time
from pathlib import Path


def _clock_optimizer() -> None:
    import torch

    step = torch.optim.AdamW.step

    def timed(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        print(f"STEP_CLOCK {time.time():.3f}", file=sys.stderr, flush=True)
        return out

    torch.optim.AdamW.step = timed


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started its program (``VmHWM``), None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _report_peak_rss() -> None:
    peak = peak_rss_bytes()
    if peak is not None:
        print(f"STEP_PEAK_RSS {peak}", file=sys.stderr, flush=True)


def _kohya_unet_width(width: int) -> None:
    import library.model_util as model_util
    import library.original_unet as original_unet

    original_unet.BLOCK_OUT_CHANNELS = (width, width * 2, width * 4, width * 4)
    original_unet.TIMESTEP_INPUT_DIM = width
    original_unet.TIME_EMBED_DIM = width * 4
    model_util.UNET_PARAMS_MODEL_CHANNELS = width


def _kohya_sdxl_sizes(unet_width: int, text_encoder_2_layers: int) -> None:
    import library.sdxl_model_util as sdxl_model_util
    import library.sdxl_original_unet as sdxl_original_unet

    sdxl_original_unet.MODEL_CHANNELS = unet_width
    sdxl_original_unet.TIME_EMBED_DIM = unet_width * 4
    config = sdxl_model_util.CLIPTextConfig

    def sized(*args, **kwargs):  # the second text encoder's config is the one 1280 wide
        if kwargs.get("hidden_size") == 1280:
            kwargs["num_hidden_layers"] = text_encoder_2_layers
        return config(*args, **kwargs)

    sdxl_model_util.CLIPTextConfig = sized


def _option(options: list[str], name: str, default: int) -> int:
    return int(options[options.index(name) + 1]) if name in options else default


def _torchvision_shim() -> None:
    import torch

    global _SHIM  # kept alive: the operator definitions live as long as the Library object
    _SHIM = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _SHIM.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    options, target = args[:split], args[split + 1:]
    _clock_optimizer()
    atexit.register(_report_peak_rss)
    if "--torchvision-shim" in options:
        _torchvision_shim()
    if target[0] != "-m":
        sys.path.insert(0, str(Path(target[0]).resolve().parent))
    if _option(options, "--unet-width", 320) != 320:
        _kohya_unet_width(_option(options, "--unet-width", 320))
    sdxl = _option(options, "--sdxl-unet-width", 320), _option(options, "--sdxl-text-encoder-2-layers", 32)
    if sdxl != (320, 32):
        _kohya_sdxl_sizes(*sdxl)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()

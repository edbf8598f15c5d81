"""Seconds per AdamW step over the LoRA of an SDXL- or SD1.5-topology UNet: torch's three implementations.

    python benchmarks/optimizer_step.py                       # SDXL mid size, CPU, 1 thread
    python benchmarks/optimizer_step.py --model sd15 --size full --device cuda

The LoRA's shapes are those the trainer makes (rank 16 on every Linear and 1x1 conv of the transformer blocks,
``compare_kohya.py``'s modules), read from the UNet built on the meta device; gradients are random. Prints the
mean of ``--steps`` steps (after one warm-up step) for the per-tensor loop (``foreach=False``), the multi-tensor
implementation (``foreach=True``) and the fused kernel (``fused=True``, what the trainer uses where torch has it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_kohya import UNET_MODULES  # noqa: E402
from sizes import build_sd15, build_sdxl  # noqa: E402


def lora_shapes(model: str, size: str, rank: int) -> list[tuple[int, ...]]:
    """(down, up) weight shapes of a rank-``rank`` LoRA on the UNet's target modules."""
    import torch

    from lora_trainer.lora.inject import is_target

    with torch.device("meta"):
        unet = (build_sdxl(size) if model == "sdxl" else build_sd15(size))["unet"]
    shapes: list[tuple[int, ...]] = []
    for name, module in unet.named_modules():
        if is_target(name, UNET_MODULES) and hasattr(module, "weight"):
            out_features, in_features = module.weight.shape[:2]
            shapes += [(rank, in_features), (out_features, rank)]
    return shapes


def seconds_per_step(shapes: list[tuple[int, ...]], device: str, steps: int, **implementation: bool) -> float:
    import torch

    params = [torch.nn.Parameter(torch.randn(shape, device=device) * 0.01) for shape in shapes]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4, **implementation)
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--size", choices=("mid", "full"), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    shapes = lora_shapes(args.model, args.size, rank=16)
    count = sum(a * b for a, b in shapes)
    print(f"{args.model} {args.size}: {len(shapes)} LoRA tensors, {count / 1e6:.1f}M parameters, {args.device}, "
          f"{args.threads} thread(s)")
    for label, implementation in (("per-tensor loop", {"foreach": False}), ("multi-tensor", {"foreach": True}),
                                  ("fused", {"fused": True})):
        try:
            seconds = seconds_per_step(shapes, args.device, args.steps, **implementation)
        except RuntimeError as error:  # fused on a CPU needs torch >= 2.4
            print(f"{label:16}: not available ({str(error).splitlines()[0][:100]})")
            continue
        print(f"{label:16}: {seconds * 1000:7.1f} ms/step")


if __name__ == "__main__":
    main()

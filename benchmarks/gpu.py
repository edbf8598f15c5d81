"""Seconds per step and peak GPU memory of LoRA training on full-size random SD1.5 and SDXL UNets.

    python benchmarks/gpu.py                      # the three cases below, about 3-6 minutes on a recent GPU
    python benchmarks/gpu.py --channels-last      # the same with an option under test (also --compile)

Cases: SD1.5 512 px batch 1 and 4, SDXL 1024 px batch 1; UNet only (LoRA rank 16 on the attention projections),
gradient checkpointing, cached text-encoder outputs (random tensors of the real shapes), bf16 (fp16 where bf16 is
unsupported) autocast over fp32 LoRA weights, 8-bit AdamW when bitsandbytes is installed (else AdamW). The UNets
are built on the GPU from diffusers configs with random weights: speed and memory are the architecture's. Each
case also prints the memory plan's estimate next to the measured peak (torch.cuda.max_memory_allocated).
On a machine without CUDA it refuses with one line.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CASES = (("sd15", 512, 1), ("sd15", 512, 4), ("sdxl", 1024, 1))


class UNetOnly:
    """The Backbone surface the memory plan's dry run uses, over a bare UNet and cached text-encoder outputs."""

    def __init__(self, unet: Any, sdxl: bool, device: Any, dtype: Any) -> None:
        self.unet, self.sdxl, self.device, self.dtype = unet, sdxl, device, dtype

    def encode_prompts(self, prompts: list[str]) -> Any:
        import torch

        batch = len(prompts)
        context = torch.randn(batch, 77, self.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
        if not self.sdxl:
            return context
        return {"context": context, "text_embeds": torch.randn(batch, 1280, device=self.device, dtype=self.dtype),
                "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=self.device,
                                         dtype=self.dtype)}

    def predict(self, noisy: Any, timesteps: Any, cond: Any) -> Any:
        if not self.sdxl:
            return self.unet(noisy, timesteps, encoder_hidden_states=cond).sample
        extra = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond["context"], added_cond_kwargs=extra).sample

    def encode_images(self, pixels: Any) -> Any:  # latents are cached: no VAE on the GPU
        import torch

        return torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8, device=pixels.device)

    def frozen_modules(self) -> list:
        return [self.unet]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        (self.unet.enable_gradient_checkpointing if enabled else self.unet.disable_gradient_checkpointing)()


def unet_config(model: str) -> dict:
    from sizes import sd15_unet_config, sdxl_unet_config

    from lora_trainer.models.tiny import tiny_unet_config

    return {"sd15": sd15_unet_config, "sdxl": sdxl_unet_config, "tiny": tiny_unet_config}[model]()


def run_case(model: str, resolution: int, batch: int, steps: int, channels_last: bool = False,
             compile_model: bool = False, device_name: str = "cuda") -> dict:
    """One case: build, train ``steps + 2`` steps, time the last ``steps`` (``device_name`` cpu: a smoke test)."""
    import torch
    from diffusers import UNet2DConditionModel

    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.train import memory_plan
    from lora_trainer.train.fast_paths import attention_kinds, fast_paths

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(model))
    unet.to(dtype).requires_grad_(False)
    backbone = UNetOnly(unet, unet.config.addition_embed_type == "text_time", device, dtype)
    params = inject_lora({"lora_unet": unet}, rank=16, alpha=16, dropout=0.0,
                         unet_targets=["to_q", "to_k", "to_v", "to_out.0"], te_targets=[])
    unet.train()
    if memory_plan.eight_bit_available(device):
        import bitsandbytes as bnb

        optimizer, optimizer_name = bnb.optim.AdamW8bit(params, lr=1e-4), "adamw8bit"
    else:
        optimizer, optimizer_name = torch.optim.AdamW(params, lr=1e-4), "adamw"
    settings = memory_plan.Settings(batch, 1, True, optimizer_name, resolution, False)
    plan_model = memory_plan.Model(
        weights=memory_plan.component_weights(backbone, device), lora_parameters=sum(p.numel() for p in params),
        num_latents=0, num_prompts=0, prompt_bytes=0,
        dry_run=lambda res, ckpt, b=backbone, u=unet: memory_plan.dry_run(b, {"lora_unet": u}, res, ckpt, dtype))
    estimate = memory_plan.estimate(plan_model, settings, cached_latents=True).total
    del plan_model
    backbone.set_gradient_checkpointing(True)
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device)
    cond = backbone.encode_prompts([""] * batch)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with fast_paths(unet, channels_last=channels_last, compile_model=compile_model):
        for _ in range(steps + 2):
            start = time.perf_counter()
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                pred = backbone.predict((latents + noise).to(dtype), timesteps, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {"model": model, "resolution": resolution, "batch": batch, "s_per_step": sum(times[2:]) / steps,
              "peak_gib": peak / 2**30, "estimate_gib": estimate / 2**30, "optimizer": optimizer_name,
              "dtype": str(dtype).removeprefix("torch."), "attention": ",".join(sorted(attention_kinds(unet)))}
    del unet, optimizer, params, latents, cond, backbone
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (two more run first)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here.")
        raise SystemExit(1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, channels_last {args.channels_last}, "
          f"compile {args.compile}")
    print(f"{'model':5} {'px':>5} {'batch':>5} {'s/step':>8} {'peak GiB':>9} {'plan GiB':>9} "
          f"optimizer  dtype  attention")
    for model, resolution, batch in CASES:
        r = run_case(model, resolution, batch, args.steps, args.channels_last, args.compile)
        print(f"{r['model']:5} {r['resolution']:>5} {r['batch']:>5} {r['s_per_step']:>8.3f} {r['peak_gib']:>9.2f} "
              f"{r['estimate_gib']:>9.2f} {r['optimizer']:10} {r['dtype']:6} {r['attention']}", flush=True)


if __name__ == "__main__":
    main()

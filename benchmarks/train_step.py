"""Seconds per training step and peak memory, for the tiny model and the full-size SD1.5 architecture.

    python benchmarks/train_step.py                 # every case (full size on CPU takes several minutes)
    python benchmarks/train_step.py --model tiny    # only the tiny model
    python benchmarks/train_step.py --steps 5 --device cuda

Each case runs in its own process so that peak RSS (and peak VRAM on CUDA) belong to that case alone. The
full-size model has SD1.5's exact architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M) with
random weights: speed and memory are those of the real model, quality is not measured here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def full_size_sd15(seed: int = 0) -> dict:
    """SD1.5's UNet, VAE and CLIP-L text encoder built from their configs, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_clip_tokenizer()}


def make_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    from lora_trainer.data.captions import write_metadata_csv

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = {}
    for index in range(count):
        name = f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
        captions[name] = f"a picture number {index}"
    write_metadata_csv(folder / "metadata.csv", captions)


def run_case(model: str, checkpointing: bool, cache: bool, steps: int, device: str) -> dict:
    """One case in this process: build, train ``steps + 1`` updates, time all but the first."""
    import torch

    from lora_trainer.config import config_from_dict
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone
    from lora_trainer.models.tiny import build_tiny_components
    from lora_trainer.train.events import EventBus, StepEvent
    from lora_trainer.train.trainer import Trainer

    resolution = 64 if model == "tiny" else 512
    parts = build_tiny_components() if model == "tiny" else full_size_sd15()
    backbone = DiffusersBackbone(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    if device.startswith("cuda"):
        backbone.to(device, torch.float16)
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_images(data, steps + 1, resolution)
        cfg = config_from_dict({
            "train_data_dir": str(data), "base_model": "given", "output_dir": str(Path(tmp) / "out"),
            "resolution": resolution, "batch_size": 1, "max_steps": steps + 1, "device": device,
            "gradient_checkpointing": checkpointing, "cache_latents": cache, "lora_rank": 16, "lora_alpha": 16,
        })
        times: list[float] = []
        bus = EventBus(lambda e: times.append(e.seconds_per_step) if isinstance(e, StepEvent) else None)
        started = time.perf_counter()
        Trainer(cfg, backbone, events=bus).run()
        wall = time.perf_counter() - started
    timed = times[1:] or times
    result = {
        "model": model, "resolution": resolution, "grad_ckpt": checkpointing, "cache_latents": cache,
        "s_per_step": sum(timed) / len(timed), "wall_s": wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.startswith("cuda"):
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15", "all"), default="all")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (one more is run first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        model, checkpointing, cache = args.case.split(",")
        print(json.dumps(run_case(model, checkpointing == "1", cache == "1", args.steps, args.device)))
        return
    models = ("tiny", "sd15") if args.model == "all" else (args.model,)
    print(f"{'model':6} {'res':>4} {'grad_ckpt':>9} {'cache':>5} {'s/step':>8} {'peak RSS GiB':>12} "
          f"{'peak VRAM GiB':>13}")
    for model, checkpointing, cache in itertools.product(models, (False, True), (True, False)):
        case = f"{model},{int(checkpointing)},{int(cache)}"
        done = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps),
                               "--device", args.device], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        vram = f"{r['peak_vram_gib']:.2f}" if "peak_vram_gib" in r else "-"
        print(f"{r['model']:6} {r['resolution']:>4} {str(r['grad_ckpt']):>9} {str(r['cache_latents']):>5} "
              f"{r['s_per_step']:>8.3f} {r['peak_rss_gib']:>12.2f} {vram:>13}", flush=True)


if __name__ == "__main__":
    main()

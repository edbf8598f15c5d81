"""The ``ss_*`` (kohya) and ``modelspec.*`` (SAI model spec) metadata written into a LoRA file.

The WebUI reads ``ss_base_model_version`` / ``ss_v2`` to tell SD1, SD2 and SDXL LoRAs apart, shows
``ss_tag_frequency`` as the LoRA's tags and ``ss_output_name`` / ``ss_sd_model_name`` in its metadata view.
Every value is a string, as safetensors requires.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from lora_trainer.config import TrainConfig

BASE_MODEL_VERSIONS = {"sd_v1": "sd_v1", "sd_v2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
IMPL_DIFFUSERS = "diffusers"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs over all captions (tags stripped, empty ones dropped)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag for tag in (t.strip() for t in caption.split(",")) if tag)
    return dict(counts.most_common())


def modelspec_architecture(model_version: str, prediction_type: str) -> str:
    """``stable-diffusion-v1/lora``, ``stable-diffusion-v2-512/lora``, ``stable-diffusion-v2-768-v/lora``..."""
    if model_version == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif model_version == "sd_v2":
        arch = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/lora"


def _bucket_info(buckets: Iterable) -> str:
    entries = {}
    for index, bucket in enumerate(buckets):
        size = [int(v) for v in bucket] if isinstance(bucket, (tuple, list)) else [int(bucket), int(bucket)]
        entries[str(index)] = {"resolution": size}
    return json.dumps({"buckets": entries})


def _epoch(cfg: TrainConfig, steps: int, num_images: int, processes: int) -> int:
    batches = max(1, math.ceil(num_images * cfg.repeats / (cfg.batch_size * processes)))
    updates = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    return math.ceil(steps / updates)


def training_metadata(*, cfg: TrainConfig, model_version: str, prediction_type: str, captions: list[str],
                      steps: int, total_steps: int, started_at: float, num_images: int,
                      buckets: list, processes: int = 1) -> dict[str, str]:
    """The metadata of a finished (or checkpointed) run of ``processes`` data-parallel processes; every value a
    string."""
    if model_version not in BASE_MODEL_VERSIONS:
        raise ValueError(f"unknown model_version {model_version!r}; expected one of {', '.join(BASE_MODEL_VERSIONS)}")
    finished = time.time()
    dataset = Path(cfg.train_data_dir).name if cfg.train_data_dir else "dataset"
    res = cfg.resolution
    comment = f"trained with lora-trainer; trigger word: {cfg.trigger_word}" if cfg.trigger_word else \
        "trained with lora-trainer"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_network_args": json.dumps({"target_modules": list(cfg.target_modules)}),
        "ss_base_model_version": BASE_MODEL_VERSIONS[model_version],
        "ss_v2": str(model_version == "sd_v2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_sd_model_name": Path(cfg.base_model).name if cfg.base_model else "",
        "ss_output_name": cfg.output_name,
        "ss_training_comment": comment,
        "ss_tag_frequency": json.dumps({dataset: tag_frequency(captions)}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({dataset: {"n_repeats": cfg.repeats, "img_count": num_images}},
                                      ensure_ascii=False),
        "ss_num_train_images": str(num_images * cfg.repeats),
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(cfg.bucket),
        "ss_bucket_info": _bucket_info(buckets),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(total_steps),
        "ss_epoch": str(_epoch(cfg, steps, num_images, processes)),
        "ss_num_epochs": str(cfg.epochs),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size * cfg.gradient_accumulation_steps * processes),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.resolved_text_encoder_lr() if cfg.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_optimizer": f"{OPTIMIZER_NAMES.get(cfg.optimizer, cfg.optimizer)}(weight_decay={cfg.weight_decay})",
        "ss_lr_scheduler": cfg.scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_seed": str(cfg.seed),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_flip_aug": str(cfg.flip_aug),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(model_version, prediction_type),
        "modelspec.implementation": IMPL_SGM if model_version == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if cfg.trigger_word:
        meta["modelspec.trigger_phrase"] = cfg.trigger_word
    return meta

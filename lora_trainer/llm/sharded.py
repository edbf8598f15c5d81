"""A text-generation LoRA whose base model's weights are split over the processes (FSDP, torch's FSDP2).

Asked for through ``accelerate launch``'s FSDP config (:mod:`lora_trainer.train.sharding`). Each process holds
1/N of every frozen base weight on its device; a decoder layer's weights are gathered just before it computes and
freed after it (``reshard_after_forward``; SHARD_GRAD_OP keeps them until its backward). The LoRA weights are few:
they stay whole (float32) in every process, left out of the shards (``ignored_params``), so the data-parallel
all-reduce of :meth:`Distributed.sync_update` sums their gradients once (FSDP reduces none), gradient clipping and
the optimizer see plain tensors, and the adapter and checkpoints are written by process 0 as in any run: a sharded
run resumes in one process or data-parallel, and the other way round.

Loading: only process 0 reads the weights, on the CPU; every process builds the model on the ``meta`` device
(no memory), shards it and receives its shards of process 0's weights (``broadcast_from_rank0``). No GPU ever
holds the whole model; process 0 holds it once in CPU memory while loading.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.llm.adapter import add_lora
from lora_trainer.llm.model import dtype_argument, load_causal_lm
from lora_trainer.train.distributed import Distributed
from lora_trainer.train.sharding import Sharding, ShardingError


def check_sharding(cfg: TrainConfig) -> None:
    """Refuse what cannot be sharded, before anything loads."""
    if cfg.load_in_4bit:
        raise ShardingError("load_in_4bit: 4-bit (QLoRA) weights cannot be sharded with FSDP here; remove "
                            "load_in_4bit (FSDP splits the 16-bit weights over the GPUs: set mixed_precision: bf16) "
                            "or launch data-parallel (examples/accelerate_multi_gpu.yaml)")


def decoder_layers(model: torch.nn.Module, sharding: Sharding) -> list[torch.nn.Module]:
    """The modules sharded one by one: the classes named in ``FSDP_TRANSFORMER_CLS_TO_WRAP``, or the model's
    ``_no_split_modules`` (its decoder layer, e.g. ``LlamaDecoderLayer``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = sharding.layer_classes or tuple(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        found = (f"FSDP_TRANSFORMER_CLS_TO_WRAP={','.join(names)} matches no module of {type(base).__name__}"
                 if sharding.layer_classes else f"{type(base).__name__} names no decoder layer class "
                 "(_no_split_modules)")
        raise ShardingError(f"{found}; set fsdp_transformer_layer_cls_to_wrap to its decoder layer class")
    return layers


def _empty_model(cfg: TrainConfig, dtype: torch.dtype) -> Any:
    """The architecture of ``cfg.base_model`` on the ``meta`` device: shapes, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(cfg.base_model), local_files_only=True,
                                        trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                **dtype_argument(dtype))


def build_sharded_model(cfg: TrainConfig, *, device: torch.device, dtype: torch.dtype, dist: Distributed) -> Any:
    """The peft LoRA model of ``cfg`` with its base weights sharded over ``dist``'s processes (see the module)."""
    import torch.distributed as dist_api
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharding = dist.sharding or Sharding()
    source: Any = None
    if dist.is_main:  # the LoRA weights start as in a one-process run of this config
        source = load_causal_lm(cfg.base_model, device=torch.device("cpu"), dtype=dtype,
                                trust_remote_code=cfg.trust_remote_code)
        torch.manual_seed(cfg.seed)
        source = add_lora(source, cfg)
    torch.manual_seed(cfg.seed)
    model = add_lora(_empty_model(cfg, dtype), cfg)
    lora = {param for param in model.parameters() if param.requires_grad}
    mesh = init_device_mesh(device.type, (dist.world_size,))
    for layer in decoder_layers(model, sharding):
        fully_shard(layer, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward, ignored_params=lora)
    fully_shard(model, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward, ignored_params=lora)
    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    dist.collective("sending the base model's weights", lambda: set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)))
    # buffers outside the state dict (rotary frequencies): computed at load, sent as they are
    buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
        dist.collective("sending the base model's buffers", lambda buffer=buffer: dist_api.broadcast(buffer, 0))
    return model

"""Sharded weights (FSDP) asked for through ``accelerate launch``'s environment, checked before anything loads.

``accelerate launch --config_file examples/accelerate_fsdp.yaml`` (or ``--use_fsdp``) tells every process what it
chose through environment variables (``ACCELERATE_USE_FSDP=true``, ``FSDP_*``); under plain ``torchrun`` the same
variables ask for it (``ACCELERATE_USE_FSDP=true torchrun ...``). Accelerate 0.21 writes ``FSDP_SHARDING_STRATEGY``
as a number (1 = FULL_SHARD), accelerate 1.x as a name, and with ``fsdp_version: 2`` ``FSDP_RESHARD_AFTER_FORWARD``
(true / false) in its place. :func:`read_sharding` turns them into a :class:`Sharding`, or raises one line naming the
variable and value it cannot honour; DeepSpeed and Megatron-LM are refused the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lora_trainer.errors import UserError

TRUE, FALSE = ("1", "true", "yes"), ("", "0", "false", "no")
#: FSDP1 sharding strategies by name and by accelerate 0.21's number; True/False: reshard after forward or not
STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": None, "HYBRID_SHARD": None,
              "HYBRID_SHARD_ZERO2": None}
STRATEGY_NUMBERS = dict(enumerate(STRATEGIES, start=1))
DATA_PARALLEL = "launch with a data-parallel config (examples/accelerate_multi_gpu.yaml) or torchrun instead"


class ShardingError(UserError):
    """The launcher asked for a sharding scheme or an FSDP option this trainer cannot honour."""


@dataclass(frozen=True)
class Sharding:
    """FSDP as the launcher configured it: the base model's weights split over the processes, each decoder layer
    (``layer_classes``, or the model's own ``_no_split_modules`` when empty) gathered only while it computes."""

    reshard_after_forward: bool = True  # FULL_SHARD (ZeRO-3); False: SHARD_GRAD_OP (ZeRO-2)
    layer_classes: tuple[str, ...] = ()


def _flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise ShardingError(f"{name}={value[:40]!r}: expected true or false")


def _refuse(name: str, value: str, why: str) -> ShardingError:
    return ShardingError(f"FSDP option {name}={value[:60]} cannot apply: {why}")


def _reshard_after_forward(environ: Mapping[str, str]) -> bool:
    if environ.get("FSDP_VERSION", "1").strip() == "2":
        name, value = "FSDP_RESHARD_AFTER_FORWARD", environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip()
        if value.lower() not in TRUE + FALSE[1:]:
            raise _refuse(name, value, "with fsdp_version 2 it is true (FULL_SHARD) or false (SHARD_GRAD_OP)")
        return value.lower() in TRUE
    name, value = "FSDP_SHARDING_STRATEGY", environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip()
    strategy = STRATEGY_NUMBERS.get(int(value), "") if value.isdigit() else value.upper()
    if strategy not in STRATEGIES:
        raise _refuse(name, value, f"the strategies are {', '.join(STRATEGIES)}")
    reshard = STRATEGIES[strategy]
    if reshard is None:
        why = ("NO_SHARD is data-parallel training; " + DATA_PARALLEL if strategy == "NO_SHARD" else
               "hybrid sharding (shard within a machine, replicate across machines) is not supported; use "
               "FULL_SHARD or SHARD_GRAD_OP")
        raise _refuse(name, value, why)
    return reshard


def _check_options(environ: Mapping[str, str]) -> None:
    """Refuse the options whose value this trainer would silently not honour."""
    version = environ.get("FSDP_VERSION", "1").strip()
    if version not in ("1", "2"):
        raise _refuse("FSDP_VERSION", version, "the versions are 1 and 2 (both run as torch's FSDP2 here)")
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        raise _refuse("FSDP_OFFLOAD_PARAMS", "true", "offloading the weights to CPU memory is not supported; set "
                      "fsdp_offload_params: false (sharding over more GPUs, or load_in_4bit in one process, saves "
                      "GPU memory)")
    if _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise _refuse("FSDP_ACTIVATION_CHECKPOINTING", "true", "set fsdp_activation_checkpointing: false and "
                      "gradient_checkpointing: true in the training YAML (the same thing, one switch)")
    policy = environ.get("FSDP_AUTO_WRAP_POLICY", "").strip()
    if policy and policy.upper() != "TRANSFORMER_BASED_WRAP":
        raise _refuse("FSDP_AUTO_WRAP_POLICY", policy, "the weights are sharded one decoder layer at a time; set "
                      "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP")
    state_dict = environ.get("FSDP_STATE_DICT_TYPE", "").strip()
    if state_dict and state_dict.upper() != "FULL_STATE_DICT":
        raise _refuse("FSDP_STATE_DICT_TYPE", state_dict, "the adapter and checkpoints are written whole by process "
                      "0 (any number of processes resumes them); set fsdp_state_dict_type: FULL_STATE_DICT")
    ignored = environ.get("FSDP_IGNORED_MODULES", "").strip()
    if ignored:
        raise _refuse("FSDP_IGNORED_MODULES", ignored, "every base weight is sharded; remove fsdp_ignored_modules")


def read_sharding(environ: Mapping[str, str]) -> Sharding | None:
    """The sharding ``accelerate launch`` (or the user, under torchrun) asked for, or None for data-parallel."""
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        raise ShardingError("accelerate launch is configured for DeepSpeed, which lora-trainer does not support; for "
                            "a language model too big for one GPU use FSDP (examples/accelerate_fsdp.yaml), "
                            "otherwise " + DATA_PARALLEL)
    if _flag(environ, "ACCELERATE_USE_MEGATRON_LM"):
        raise ShardingError("accelerate launch is configured for Megatron-LM, which lora-trainer does not support; "
                            "for a language model too big for one GPU use FSDP (examples/accelerate_fsdp.yaml)")
    if not _flag(environ, "ACCELERATE_USE_FSDP"):
        return None
    _check_options(environ)
    layers = tuple(name.strip() for name in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")
                   if name.strip())
    return Sharding(_reshard_after_forward(environ), layers)

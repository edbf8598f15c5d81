"""FSDP asked for through accelerate's environment: what each accelerate release writes is read, and every option
that cannot apply is refused with one line naming it (the two-process FSDP run is in test_distributed.py)."""

from __future__ import annotations

import pytest

from lora_trainer.train.sharding import Sharding, ShardingError, read_sharding

FSDP = {"ACCELERATE_USE_FSDP": "true"}


def test_no_fsdp_is_data_parallel():
    assert read_sharding({}) is None
    assert read_sharding({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "False"}) is None


@pytest.mark.parametrize(("environ", "reshard"), [
    ({}, True),  # FULL_SHARD by default
    ({"FSDP_SHARDING_STRATEGY": "1"}, True),  # accelerate 0.21 writes the strategy's number
    ({"FSDP_SHARDING_STRATEGY": "2"}, False),
    ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False),  # accelerate 1.x, fsdp_version 1: its name
    # accelerate 1.x, fsdp_version 2: reshard_after_forward decides (it still writes the default strategy)
    ({"FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "false"}, False),
    ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, True),
])
def test_sharding_strategy_of_each_accelerate_release(environ, reshard):
    assert read_sharding({**FSDP, **environ}) == Sharding(reshard_after_forward=reshard)


def test_accepted_options_and_the_layer_classes():
    environ = {**FSDP, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
               "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
               "FSDP_SYNC_MODULE_STATES": "true", "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE",
               "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, MistralDecoderLayer"}
    assert read_sharding(environ).layer_classes == ("LlamaDecoderLayer", "MistralDecoderLayer")


@pytest.mark.parametrize(("environ", "words"), [
    ({"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "FSDP_SHARDING_STRATEGY=NO_SHARD cannot apply: NO_SHARD is data-par"),
    ({"FSDP_SHARDING_STRATEGY": "3"}, "FSDP_SHARDING_STRATEGY=3 cannot apply: NO_SHARD"),
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "FSDP_SHARDING_STRATEGY=HYBRID_SHARD cannot apply: hybrid"),
    ({"FSDP_SHARDING_STRATEGY": "ZERO9"}, "FSDP_SHARDING_STRATEGY=ZERO9 cannot apply: the strategies are"),
    ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, "FSDP_RESHARD_AFTER_FORWARD=FULL_SHARD"),
    ({"FSDP_VERSION": "3"}, "FSDP_VERSION=3"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS=true cannot apply: offloading"),
    ({"FSDP_OFFLOAD_PARAMS": "maybe"}, "FSDP_OFFLOAD_PARAMS='maybe': expected true or false"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "gradient_checkpointing: true"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP"),
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT"),
    ({"FSDP_IGNORED_MODULES": "lm_head"}, "FSDP_IGNORED_MODULES=lm_head"),
])
def test_an_option_that_cannot_apply_is_one_line_naming_it(environ, words):
    with pytest.raises(ShardingError, match=words) as err:
        read_sharding({**FSDP, **environ})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "words"), [("ACCELERATE_USE_DEEPSPEED", "use FSDP"),
                                             ("ACCELERATE_USE_MEGATRON_LM", "use FSDP")])
def test_deepspeed_and_megatron_are_refused(name, words):
    with pytest.raises(ShardingError, match=words):
        read_sharding({name: "true"})


def test_qlora_cannot_be_sharded():
    from lora_trainer.config import config_from_dict
    from lora_trainer.llm.sharded import check_sharding

    cfg = config_from_dict({"task_type": "text-generation", "base_model": "m", "train_data_dir": "d",
                            "output_dir": "o", "load_in_4bit": True})
    with pytest.raises(ShardingError, match="load_in_4bit: 4-bit .QLoRA. weights cannot be sharded"):
        check_sharding(cfg)


def test_a_model_without_decoder_layer_classes_is_refused():
    import torch

    from lora_trainer.llm.sharded import decoder_layers

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ShardingError, match="Sequential names no decoder layer class"):
        decoder_layers(model, Sharding())
    with pytest.raises(ShardingError, match="FSDP_TRANSFORMER_CLS_TO_WRAP=Block matches no module of Sequential"):
        decoder_layers(model, Sharding(layer_classes=("Block",)))
    assert decoder_layers(model, Sharding(layer_classes=("Linear",))) == [model[0]]


def test_the_ready_fsdp_config_launches_what_is_accepted():
    """examples/accelerate_fsdp.yaml, read by the installed accelerate's launcher (0.21 writes the strategy's
    number, 1.x FSDP_VERSION 2 and reshard_after_forward), gives an environment that shards FULL_SHARD."""
    pytest.importorskip("accelerate")
    from pathlib import Path

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "lora_trainer", "train"])
    validated = _validate_launch_command(args)
    environ = prepare_multi_gpu_env(validated[0] if isinstance(validated, tuple) else args)
    assert environ["ACCELERATE_USE_FSDP"] == "true"
    assert read_sharding(environ) == Sharding(reshard_after_forward=True)

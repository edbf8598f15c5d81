"""The original ("LDM") model configs of single-file checkpoints, and their diffusers equivalents.

SD1.x/SD2.x checkpoints come with (or without) a CompVis/Stability ``*-inference.yaml``; SDXL ones with (or
without) an sgm ``sd_xl_base.yaml`` (``DiffusionEngine`` with ``network_config`` / ``conditioner_config``).
Without a config, the sizes are read from the weights' shapes. diffusers' own ``single_file_utils`` turn an
LDM config into ``UNet2DConditionModel`` / ``AutoencoderKL`` configs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from lora_trainer.models.weights import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

FIRST_STAGE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4, "monitor": "val/rec_loss",
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                     "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"},
    },
}
_MODEL_PARAMS = {
    "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
    "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
    "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
    "scale_factor": 0.18215, "use_ema": False,
}
_UNET_PARAMS = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "use_spatial_transformer": True, "transformer_depth": 1, "use_checkpoint": True, "legacy": False,
}

#: The structure of CompVis' ``v1-inference.yaml`` (SD1.x).
V1_INFERENCE: dict[str, Any] = {"model": {
    "base_learning_rate": 1.0e-04,
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {**_MODEL_PARAMS,
               "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                               "params": {**_UNET_PARAMS, "num_heads": 8, "context_dim": 768}},
               "first_stage_config": FIRST_STAGE,
               "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}},
}}

#: The structure of Stability's ``v2-inference.yaml`` (SD2.x 512-base; ``-v``: add parameterization "v").
V2_INFERENCE: dict[str, Any] = {"model": {
    "base_learning_rate": 1.0e-04,
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {**_MODEL_PARAMS,
               "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                               "params": {**_UNET_PARAMS, "use_fp16": True, "num_head_channels": 64,
                                          "use_linear_in_transformer": True, "context_dim": 1024}},
               "first_stage_config": FIRST_STAGE,
               "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                     "params": {"freeze": True, "layer": "penultimate"}}},
}}


def block_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def infer_unet_params(state: dict[str, torch.Tensor], version: str) -> dict[str, Any]:
    """UNet sizes read from the weights' shapes (head counts cannot be; SD1/SD2 defaults are used)."""
    u = UNET_PREFIX
    model_channels = int(state[u + "input_blocks.0.0.weight"].shape[0])
    inputs = block_indices(state, u + "input_blocks.")
    downsamplers = [i for i in inputs if u + f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downsamplers) + 1
    res_blocks = (len(inputs) - 1 - len(downsamplers)) // levels
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        mult.append(int(state[u + f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]) // model_channels)
        if any(k.startswith(u + f"input_blocks.{first}.1.") for k in state):
            attention.append(2 ** level)
    attn2 = [v for k, v in state.items() if k.startswith(u) and k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in state.items() if k.startswith(u) and k.endswith(".proj_in.weight")]
    params = copy.deepcopy(V1_INFERENCE if version == "sd_v1" else V2_INFERENCE)["model"]["params"]
    unet = params["unet_config"]["params"]
    unet.update(model_channels=model_channels, channel_mult=mult, num_res_blocks=res_blocks,
                attention_resolutions=attention, in_channels=int(state[u + "input_blocks.0.0.weight"].shape[1]),
                out_channels=int(state[u + "out.2.weight"].shape[0]))
    if attn2:
        unet["context_dim"] = int(attn2[0].shape[1])
    if proj_in:
        unet["use_linear_in_transformer"] = proj_in[0].ndim == 2
    if "num_head_channels" in unet:  # 64-wide heads (SD2); narrower only for models thinner than one head
        unet["num_head_channels"] = min(unet["num_head_channels"], model_channels)
    return unet


def infer_vae_params(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    v = VAE_PREFIX + "encoder."
    ch = int(state[v + "conv_in.weight"].shape[0])
    levels = block_indices(state, v + "down.")
    blocks = block_indices(state, v + "down.0.block.")
    mult = [int(state[v + f"down.{level}.block.{blocks[-1]}.conv2.weight"].shape[0]) // ch for level in levels]
    ddconfig = copy.deepcopy(FIRST_STAGE["params"]["ddconfig"])
    ddconfig.update(ch=ch, ch_mult=mult, num_res_blocks=len(blocks),
                    z_channels=int(state[VAE_PREFIX + "decoder.conv_in.weight"].shape[1]),
                    in_channels=int(state[v + "conv_in.weight"].shape[1]))
    return ddconfig


def default_original_config(state: dict[str, torch.Tensor], version: str) -> dict[str, Any]:
    """A v1-/v2-inference config with the sizes taken from the weights."""
    config = copy.deepcopy(V1_INFERENCE if version == "sd_v1" else V2_INFERENCE)
    params = config["model"]["params"]
    params["unet_config"]["params"] = infer_unet_params(state, version)
    params["first_stage_config"]["params"]["ddconfig"] = infer_vae_params(state)
    params["first_stage_config"]["params"]["embed_dim"] = int(state[VAE_PREFIX + "quant_conv.weight"].shape[0]) // 2
    return config


def diffusers_unet_config(config: dict[str, Any], version: str, prediction: str, source: Path) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config for an LDM config (diffusers' own conversion, plus head counts)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    config = copy.deepcopy(config)
    params = config["model"]["params"]
    unet_params = params["unet_config"]["params"]
    unet_params.setdefault("transformer_depth", 1)
    unet_params.setdefault("in_channels", 4)
    unet_params.setdefault("out_channels", 4)
    per_channel = unet_params.get("num_head_channels", -1)
    if unet_params.get("num_heads", -1) == -1:
        unet_params.pop("num_heads", None)
    try:
        cfg = create_unet_diffusers_config_from_ldm(config, {})
    except (KeyError, TypeError) as error:
        raise ModelLoadError(f"{source}: the UNet config is incomplete (missing {error})") from error
    if "num_heads" not in unet_params and per_channel and per_channel > 0:
        cfg["attention_head_dim"] = [unet_params["model_channels"] * m // per_channel
                                     for m in unet_params["channel_mult"]]
    cfg["sample_size"] = int(params.get("image_size", 64))
    if version == "sd_v2" and prediction == "v_prediction":
        cfg["upcast_attention"] = True
    return cfg


def diffusers_vae_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``AutoencoderKL`` config for an LDM config."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    cfg = create_vae_diffusers_config_from_ldm(config, {})
    cfg["sample_size"] = int(config["model"]["params"].get("image_size", 64)) * 8
    return cfg


# ---- SDXL (sgm) ------------------------------------------------------------------------------------------------
SGM_ENCODERS = "sgm.modules.encoders.modules."
SGM_DENOISER = "sgm.modules.diffusionmodules."
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _target(target: str, **params: Any) -> dict[str, Any]:
    return {"target": target, "params": params} if params else {"target": target}


def sdxl_config(network: dict[str, Any], ddconfig: dict[str, Any], *, size_embed_dim: int = 256,
                scale_factor: float = 0.13025, v_prediction: bool = False,
                clip_version: str | None = None, clip_layers: int = 12) -> dict[str, Any]:
    """An sgm ``DiffusionEngine`` config (the structure of Stability's ``sd_xl_base.yaml``).

    ``network``: the UNet's ``network_config.params``; ``size_embed_dim``: the width of each size id's
    embedding (256 in SDXL); ``clip_version``: a local CLIP folder for the first text encoder (tiny models);
    ``clip_layers``: its block count (12 in SDXL): the context is its penultimate layer's output
    (``hidden_states[clip_layers - 1]``, ``layer_idx: 11`` in SDXL).
    """
    clip = {"layer": "hidden", "layer_idx": clip_layers - 1}
    if clip_version:
        clip["version"] = clip_version
    scaling = "VScaling" if v_prediction else "EpsScaling"
    weighting = "VWeighting" if v_prediction else "EpsWeighting"
    embedders = [
        {"is_trainable": False, "input_key": "txt", **_target(SGM_ENCODERS + "FrozenCLIPEmbedder", **clip)},
        {"is_trainable": False, "input_key": "txt", **_target(
            SGM_ENCODERS + "FrozenOpenCLIPEmbedder2", arch="ViT-bigG-14", version="laion2b_s39b_b160k", freeze=True,
            layer="penultimate", always_return_pooled=True, legacy=False)},
        *({"is_trainable": False, "input_key": key, **_target(SGM_ENCODERS + "ConcatTimestepEmbedderND",
                                                              outdim=size_embed_dim)} for key in SIZE_KEYS)]
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": scale_factor, "disable_first_stage_autocast": True,
        "denoiser_config": _target(
            SGM_DENOISER + "denoiser.DiscreteDenoiser", num_idx=1000,
            weighting_config=_target(SGM_DENOISER + "denoiser_weighting." + weighting),
            scaling_config=_target(SGM_DENOISER + "denoiser_scaling." + scaling),
            discretization_config=_target(SGM_DENOISER + "discretizer.LegacyDDPMDiscretization")),
        "network_config": _target("sgm.modules.diffusionmodules.openaimodel.UNetModel", **network),
        "conditioner_config": _target("sgm.modules.GeneralConditioner", emb_models=embedders),
        "first_stage_config": _target(
            "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", embed_dim=4, monitor="val/rec_loss",
            ddconfig={**ddconfig, "attn_type": "vanilla"}, lossconfig=_target("torch.nn.Identity")),
    }}}


def infer_sdxl_network_params(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The sgm UNet's ``network_config.params`` read from the weights' shapes (64-wide attention heads)."""
    u = UNET_PREFIX
    base = infer_unet_params(state, "sd_v2")  # levels, widths, attention levels, context, linear projections
    res_blocks, model_channels = base["num_res_blocks"], base["model_channels"]
    depth = []
    for level in range(len(base["channel_mult"])):
        first = 1 + level * (res_blocks + 1)
        depth.append(len(block_indices(state, u + f"input_blocks.{first}.1.transformer_blocks.")))
    middle = len(block_indices(state, u + "middle_block.1.transformer_blocks."))
    if middle != depth[-1]:
        raise ModelLoadError(f"this SDXL UNet's middle block has {middle} transformer blocks and its last level "
                             f"{depth[-1]}; only UNets with equal depths (like SDXL's) are supported")
    label = state.get(u + "label_emb.0.0.weight")
    if label is None:
        raise ModelLoadError(f"this SDXL UNet has no {u}label_emb.0.0.weight (the pooled text + size embedding)")
    return {"adm_in_channels": int(label.shape[1]), "num_classes": "sequential", "use_checkpoint": False,
            "in_channels": base["in_channels"], "out_channels": base["out_channels"],
            "model_channels": model_channels, "attention_resolutions": base["attention_resolutions"],
            "num_res_blocks": res_blocks, "channel_mult": base["channel_mult"],
            "num_head_channels": min(64, model_channels), "use_spatial_transformer": True,
            "use_linear_in_transformer": base.get("use_linear_in_transformer", True), "transformer_depth": depth,
            "context_dim": base["context_dim"], "spatial_transformer_attn_type": "softmax", "legacy": False}


def sdxl_unet_diffusers_config(config: dict[str, Any], size_embed_dim: int, source: Path) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of an sgm config (diffusers' conversion, size embedding fixed).

    diffusers recognises SDXL by its context width (2048 / 1280); any width is taken here, with the size
    embedding (``addition_time_embed_dim``) given by the caller (``ConcatTimestepEmbedderND.outdim``).
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    network = config["model"]["params"]["network_config"]["params"]
    try:
        cfg = create_unet_diffusers_config_from_ldm(config, {})
    except (KeyError, TypeError) as error:
        raise ModelLoadError(f"{source}: the SDXL UNet config is incomplete (missing {error})") from error
    cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=size_embed_dim,
               projection_class_embeddings_input_dim=int(network["adm_in_channels"]))
    cfg["sample_size"] = 128
    return cfg

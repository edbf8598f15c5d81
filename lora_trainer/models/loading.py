"""Load an SD1.x / SD2.x model, offline, as a :class:`DiffusersBackbone`.

Two sources: a single-file checkpoint in the original LDM layout (``.safetensors``, or ``.ckpt``/``.pt``
read with ``torch.load(weights_only=True)``), optionally with a same-named ``.yaml`` beside it (the WebUI's
convention); or a diffusers folder (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``). Conversion uses diffusers' own ``single_file_utils`` functions; the hub is never contacted.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.models.diffusers_backbone import DiffusersBackbone

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders.1."
_EXPECTED = ("expected a Stable Diffusion 1.x/2.x single-file checkpoint (.safetensors, .ckpt or .pt) "
             "or a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/)")

_FIRST_STAGE = {
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
               "first_stage_config": _FIRST_STAGE,
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
               "first_stage_config": _FIRST_STAGE,
               "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                     "params": {"freeze": True, "layer": "penultimate"}}},
}}


class ModelLoadError(UserError):
    """A base model file or folder that cannot be loaded; the message names the file and what was expected."""


def load_backbone(path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> DiffusersBackbone:
    """An SD1.x/SD2.x single-file checkpoint or diffusers folder -> a backbone on ``device`` in ``dtype``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; {_EXPECTED}")
    backbone = load_diffusers_folder(path) if path.is_dir() else load_single_file(path)
    return backbone.to(device, dtype)


def check_base_model(path: str | Path) -> None:
    """Cheap checks before any work (no weights read): the file or folder exists, a ``.safetensors`` header
    parses, a diffusers folder has its index and subfolders. Raises ModelLoadError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; {_EXPECTED}")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is a folder without model_index.json; {_EXPECTED}")
        missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer") if not (path / sub).is_dir()]
        if missing:
            raise ModelLoadError(f"{path} lacks the subfolder(s) {', '.join(missing)}; {_EXPECTED}")
        return
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown file type {suffix or '(none)'!r}; {_EXPECTED}")
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
            raise ModelLoadError(f"{path} is not a readable .safetensors file ({str(error)[:200]})") from error


# ---- reading weights -----------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` / ``.ckpt`` / ``.pt`` file (a ``state_dict`` wrapper is unwrapped)."""
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown file type {suffix or '(none)'!r}; {_EXPECTED}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types (and OSError) for bad files
            raise ModelLoadError(f"{path} is not a readable .safetensors file ({error})") from error
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ModelLoadError(
                f"{path}: refused to unpickle it: the file holds Python objects other than tensors, and loading "
                f"them could run arbitrary code. Only plain weights are read (torch.load(weights_only=True)). "
                f"Convert the checkpoint to .safetensors with a tool you trust, or use a .safetensors "
                f"version of this model. (torch said: {str(error).splitlines()[0]})") from error
        except Exception as error:
            raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({error})") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a dictionary of weights; {_EXPECTED}")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _check_layout(path: Path, state: dict[str, torch.Tensor]) -> str:
    """``"sd_v1"`` or ``"sd_v2"`` from the keys; SDXL and unknown layouts raise ModelLoadError."""
    if any(k.startswith(SDXL_PREFIX) for k in state):
        raise ModelLoadError(
            f"{path} is an SDXL checkpoint (it has {SDXL_PREFIX}* weights). SDXL checkpoints are trained "
            f"through the WebUI tab for now: load the model in the WebUI and use the LoRA training tab.")
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state)
    missing = [name for name, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)) if
               not any(k.startswith(prefix) for k in state)]
    if not has_clip and not has_open_clip:
        missing.append("text encoder")
    if missing:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion 1.x/2.x checkpoint: no {', '.join(missing)} weights found "
            f"(expected keys starting with {UNET_PREFIX!r}, {VAE_PREFIX!r} and {CLIP_PREFIX!r} (SD1) or "
            f"{OPEN_CLIP_PREFIX!r} (SD2)); found e.g. {_listed(sorted(state), 4) or 'no tensors at all'}")
    in_weight = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if in_weight is not None and in_weight.shape[1] != 4:
        raise ModelLoadError(f"{path}: the UNet takes {in_weight.shape[1]} input channels (an inpainting or "
                             f"image-editing model); only text-to-image SD1.x/SD2.x models (4 channels) are supported")
    return "sd_v2" if has_open_clip else "sd_v1"


# ---- the original (LDM) config ---------------------------------------------------------------------------------
def _block_indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _infer_unet_params(state: dict[str, torch.Tensor], version: str) -> dict[str, Any]:
    """UNet sizes read from the weights' shapes (head counts cannot be; SD1/SD2 defaults are used)."""
    u = UNET_PREFIX
    model_channels = int(state[u + "input_blocks.0.0.weight"].shape[0])
    inputs = _block_indices(state, u + "input_blocks.")
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


def _infer_vae_params(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    v = VAE_PREFIX + "encoder."
    ch = int(state[v + "conv_in.weight"].shape[0])
    levels = _block_indices(state, v + "down.")
    blocks = _block_indices(state, v + "down.0.block.")
    mult = [int(state[v + f"down.{level}.block.{blocks[-1]}.conv2.weight"].shape[0]) // ch for level in levels]
    ddconfig = copy.deepcopy(_FIRST_STAGE["params"]["ddconfig"])
    ddconfig.update(ch=ch, ch_mult=mult, num_res_blocks=len(blocks),
                    z_channels=int(state[VAE_PREFIX + "decoder.conv_in.weight"].shape[1]),
                    in_channels=int(state[v + "conv_in.weight"].shape[1]))
    return ddconfig


def default_original_config(state: dict[str, torch.Tensor], version: str) -> dict[str, Any]:
    """A v1-/v2-inference config with the sizes taken from the weights."""
    config = copy.deepcopy(V1_INFERENCE if version == "sd_v1" else V2_INFERENCE)
    params = config["model"]["params"]
    params["unet_config"]["params"] = _infer_unet_params(state, version)
    params["first_stage_config"]["params"]["ddconfig"] = _infer_vae_params(state)
    params["first_stage_config"]["params"]["embed_dim"] = int(state[VAE_PREFIX + "quant_conv.weight"].shape[0]) // 2
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ModelLoadError(f"{path}: cannot read this model config ({error})") from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(
            config["model"].get("params"), dict):
        raise ModelLoadError(f"{path}: not an LDM model config (expected a 'model: params:' section)")
    params = config["model"]["params"]
    for section in ("unet_config", "first_stage_config", "cond_stage_config"):
        if not isinstance(params.get(section), dict):
            raise ModelLoadError(f"{path}: 'model.params.{section}' is missing; expected a Stable Diffusion "
                                 f"1.x/2.x config like v1-inference.yaml or v2-inference.yaml")
    return config


def _yaml_version(path: Path, config: dict[str, Any]) -> str:
    target = str(config["model"]["params"]["cond_stage_config"].get("target", ""))
    if target.endswith("FrozenOpenCLIPEmbedder"):
        return "sd_v2"
    if target.endswith("FrozenCLIPEmbedder"):
        return "sd_v1"
    raise ModelLoadError(f"{path}: cond_stage_config target {target!r} is not supported; expected "
                         f"FrozenCLIPEmbedder (SD1.x) or FrozenOpenCLIPEmbedder (SD2.x)")


# ---- components ------------------------------------------------------------------------------------------------
def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """Load ``weights`` into ``module``; every weight must be used and every parameter filled."""
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ModelLoadError(f"{source}: the {what} weights do not fit the architecture described by its "
                             f"config: {str(error).splitlines()[-1].strip()}") from error
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {_listed(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {_listed(unexpected)}" if unexpected else ""]
        raise ModelLoadError(f"{source}: the {what} weights do not match the architecture described by its "
                             f"config ({'; '.join(p for p in parts if p)}). If a .yaml sits beside the "
                             f"checkpoint, check that it belongs to this model.")


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


def _build_unet(config: dict[str, Any], state: dict[str, torch.Tensor], version: str, prediction: str,
                source: Path) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = diffusers_unet_config(config, version, prediction, source)
    unet = UNet2DConditionModel(**cfg)
    _load_weights(unet, convert_ldm_unet_checkpoint(state, cfg), "UNet", source)
    return unet


def _build_vae(config: dict[str, Any], state: dict[str, torch.Tensor], source: Path) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = diffusers_vae_config(config)
    vae = AutoencoderKL(**cfg)
    weights = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    _load_weights(vae, convert_ldm_vae_checkpoint(weights, cfg), "VAE", source)
    return vae


def _fit_text_keys(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.*`` keys -> the model's own layout (transformers >= 5.6 drops ``text_model.``)."""
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, value in weights.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[key if nested else key.removeprefix("text_model.")] = value
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


def _local_folder(version: Any) -> Path | None:
    """The cond_stage ``params.version`` when it names an existing local folder (not a hub id)."""
    if not isinstance(version, str) or not version:
        return None
    folder = Path(version).expanduser()
    return folder if folder.is_dir() else None


def _heads(hidden: int) -> int:
    """Attention heads of a CLIP text transformer: 64-wide heads (ViT-L, ViT-H); 8-wide below 64 (tiny models)."""
    return hidden // 64 if hidden >= 64 else max(1, hidden // 8)


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len(_block_indices(state, prefix))


def _build_clip(state: dict[str, torch.Tensor], folder: Path | None, source: Path) -> nn.Module:
    """SD1.x: the CLIP ViT-L/14 text encoder (``cond_stage_model.transformer.*``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    weights = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}
    if folder is not None and (folder / "config.json").is_file():
        config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    else:
        tokens = weights["text_model.embeddings.token_embedding.weight"]
        hidden = int(tokens.shape[1])
        config = CLIPTextConfig(
            vocab_size=int(tokens.shape[0]), hidden_size=hidden,
            intermediate_size=int(weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_hidden_layers=_count(weights, "text_model.encoder.layers."), num_attention_heads=_heads(hidden),
            max_position_embeddings=int(weights["text_model.embeddings.position_embedding.weight"].shape[0]),
            hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModel(config)
    _load_weights(model, _fit_text_keys(model, weights), "text encoder (CLIP)", source)
    return model


def _build_open_clip(state: dict[str, torch.Tensor], layer: str, source: Path) -> nn.Module:
    """SD2.x: the OpenCLIP ViT-H/14 text tower as a ``CLIPTextModel`` (penultimate layer: one block fewer)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    p = OPEN_CLIP_PREFIX
    tokens = state[p + "token_embedding.weight"]
    hidden = int(tokens.shape[1])
    blocks = _count(state, p + "transformer.resblocks.")
    layers = blocks - 1 if layer == "penultimate" else blocks
    config = CLIPTextConfig(
        vocab_size=int(tokens.shape[0]), hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=int(state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_attention_heads=_heads(hidden), max_position_embeddings=int(state[p + "positional_embedding"].shape[0]),
        hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0)
    model = CLIPTextModel(config)
    kept = re.compile(re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
    weights = {k: v for k, v in state.items() if k.startswith(p) and not (
        (m := kept.match(k)) and int(m.group(1)) >= layers)}
    # the q/k/v split width comes from text_projection's rows (diffusers 0.31 would otherwise use projection_dim)
    weights[p + "text_projection"] = torch.empty(hidden, 0)
    converted = convert_open_clip_checkpoint(model, weights)
    converted.pop("text_projection.weight", None)
    _load_weights(model, _fit_text_keys(model, converted), "text encoder (OpenCLIP)", source)
    return model


def _tokenizer(folder: Path | None, version: str) -> Any:
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    if folder is not None and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer()
    if version == "sd_v2":
        tokenizer.pad_token = "!"  # OpenCLIP pads with token 0 ("!")
    return tokenizer


def load_single_file(path: Path) -> DiffusersBackbone:
    """An LDM-layout SD1.x/SD2.x checkpoint (with an optional same-named ``.yaml``) -> a CPU float32 backbone."""
    state = read_state_dict(path)
    version = _check_layout(path, state)
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        config = _read_yaml(yaml_path)
        if _yaml_version(yaml_path, config) != version:
            raise ModelLoadError(f"{yaml_path} describes an {_yaml_version(yaml_path, config)} model but "
                                 f"{path.name} holds {version} weights; remove or fix the .yaml")
        log.info("using the model config %s", yaml_path)
    else:
        config = default_original_config(state, version)
        if version == "sd_v2":
            log.warning("%s: SD2 checkpoint without a .yaml beside it: assuming epsilon prediction (the 512-base "
                        "models). A 768-v model needs %s with 'parameterization: \"v\"' (Stability's "
                        "v2-inference-v.yaml).", path, yaml_path.name)
    params = config["model"]["params"]
    prediction = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    cond = params["cond_stage_config"].get("params") or {}
    folder = _local_folder(cond.get("version")) if version == "sd_v1" else None
    tokenizer = _tokenizer(folder, version)  # first: a missing tokenizer fails before minutes of model building
    unet = _build_unet(config, state, version, prediction, path)
    vae = _build_vae(config, state, path)
    if version == "sd_v1":
        text_encoder = _build_clip(state, folder, path)
    else:
        text_encoder = _build_open_clip(state, str(cond.get("layer", "penultimate")), path)
    for module in (unet, vae, text_encoder):
        module.eval()
    return DiffusersBackbone(
        unet, vae, text_encoder, tokenizer, prediction_type=prediction, model_version=version,
        beta_start=float(params.get("linear_start", 0.00085)), beta_end=float(params.get("linear_end", 0.012)),
        num_train_timesteps=int(params.get("timesteps", 1000)), clip_skip=1)


# ---- diffusers folders -----------------------------------------------------------------------------------------
def _variant(folder: Path) -> str | None:
    """``"fp16"`` when a subfolder holds only ``*.fp16.safetensors`` weights; None for plain weights."""
    names = [p.name for p in folder.glob("*.safetensors")]
    if any(name.count(".") == 1 for name in names):  # model.safetensors, model-00001-of-00002.safetensors
        return None
    if any(name.endswith(".fp16.safetensors") for name in names):
        return "fp16"
    raise ModelLoadError(f"{folder} has no .safetensors weights; only safetensors are loaded from diffusers "
                         f"folders (pickle .bin files are never unpickled). Convert the folder to safetensors.")


def load_diffusers_folder(path: Path) -> DiffusersBackbone:
    """A local diffusers SD1.x/SD2.x folder -> a CPU float32 backbone (``local_files_only``, safetensors only)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is a folder without model_index.json; {_EXPECTED}")
    try:
        info = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{index} is not valid JSON ({error})") from error
    if "text_encoder_2" in info or "XL" in str(info.get("_class_name", "")):
        raise ModelLoadError(f"{path} is an SDXL diffusers folder. SDXL checkpoints are trained through the "
                             f"WebUI tab for now: load the model in the WebUI and use the LoRA training tab.")
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer") if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} lacks the subfolder(s) {', '.join(missing)}; {_EXPECTED}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(cls: Any, sub: str) -> Any:
        try:
            return cls.from_pretrained(str(path / sub), local_files_only=True, use_safetensors=True,
                                       variant=_variant(path / sub))
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"{path / sub}: cannot load it ({error})") from error

    unet, vae, text_encoder = load(UNet2DConditionModel, "unet"), load(AutoencoderKL, "vae"), load(
        CLIPTextModel, "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file.is_file() else {}
    version = "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
    for module in (unet, vae, text_encoder):
        module.float().eval()
    return DiffusersBackbone(
        unet, vae, text_encoder, tokenizer, prediction_type=scheduler.get("prediction_type", "epsilon"),
        model_version=version, beta_start=float(scheduler.get("beta_start", 0.00085)),
        beta_end=float(scheduler.get("beta_end", 0.012)),
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)), clip_skip=1)

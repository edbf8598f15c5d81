"""Load an SD1.x / SD2.x / SDXL model, offline, as a :class:`DiffusersBackbone`.

Two sources: a single-file checkpoint in the original layout (``.safetensors``, or ``.ckpt``/``.pt`` read with
``torch.load(weights_only=True)``), optionally with a same-named ``.yaml`` beside it (the WebUI's convention);
or a diffusers folder (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, and for
SDXL ``text_encoder_2/``, ``tokenizer_2/``). Key conversion uses diffusers' own ``single_file_utils`` functions
where they do not copy; the hub is never contacted. Modules are built empty and filled from the memory-mapped
file (:mod:`lora_trainer.models.weights`): the model is never held twice. SDXL: :mod:`.sdxl_loading`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_trainer.models.diffusers_backbone import DiffusersBackbone
from lora_trainer.models.ldm_config import (
    UNET_PREFIX,
    VAE_PREFIX,
    default_original_config,
    diffusers_unet_config,
    diffusers_vae_config,
)
from lora_trainer.models.text_encoders import (
    build_text_encoder,
    clip_config_from_weights,
    clip_weights,
    count_blocks,
    open_clip_to_transformers,
)
from lora_trainer.models.weight_release import CheckpointSource, release, return_freed_memory
from lora_trainer.models.weights import (
    CHECKPOINT_SUFFIXES,
    EXPECTED,
    CheckpointFile,
    ModelLoadError,
    build_empty,
    fill_module,
    listed,
)

log = logging.getLogger(__name__)
META = torch.device("meta")  # modules built here hold no weights: names and shapes only
#: The VAE's parts used only to decode (previews).
VAE_DECODER_PARTS = ("decoder", "post_quant_conv")

CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders.1."
#: Marker tensors some checkpoints carry (NoobAI-XL and others; read by ComfyUI and reForge).
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"


def load_backbone(path: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> DiffusersBackbone:
    """An SD1.x/SD2.x/SDXL single-file checkpoint or diffusers folder -> a backbone on ``device`` in ``dtype``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; {EXPECTED}")
    device = torch.device(device)
    if path.is_dir():
        return load_diffusers_folder(path, device, dtype)
    return load_single_file(path, device, dtype)


def check_base_model(path: str | Path) -> None:
    """Cheap checks before any work (no weights read): the file or folder exists, a ``.safetensors`` header
    parses, a diffusers folder has its index and subfolders. Raises ModelLoadError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; {EXPECTED}")
    if path.is_dir():
        read_model_index(path)
        check_subfolders(path, ("unet", "vae", "text_encoder", "tokenizer"))
        return
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown file type {path.suffix or '(none)'!r}; {EXPECTED}")
    if path.suffix.lower() == ".safetensors":
        CheckpointFile(path)  # its header only


# ---- what a file holds -----------------------------------------------------------------------------------------
def checkpoint_layout(path: Path, state: dict[str, torch.Tensor]) -> str:
    """``"sd_v1"``, ``"sd_v2"`` or ``"sdxl"`` from the keys; unknown layouts raise ModelLoadError."""
    in_weight = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if in_weight is not None and in_weight.shape[1] != 4:
        raise ModelLoadError(f"{path}: the UNet takes {in_weight.shape[1]} input channels (an inpainting or "
                             f"image-editing model); only text-to-image models (4 channels) are supported")
    if any(k.startswith(SDXL_PREFIX) for k in state):
        return "sdxl"
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state)
    missing = [name for name, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)) if
               not any(k.startswith(prefix) for k in state)]
    if not has_clip and not has_open_clip:
        missing.append("text encoder")
    if missing:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion 1.x/2.x/SDXL checkpoint: no {', '.join(missing)} weights found "
            f"(expected keys starting with {UNET_PREFIX!r}, {VAE_PREFIX!r} and {CLIP_PREFIX!r} (SD1), "
            f"{OPEN_CLIP_PREFIX!r} (SD2) or {SDXL_PREFIX!r} (SDXL)); found e.g. "
            f"{listed(sorted(state), 4) or 'no tensors at all'}")
    return "sd_v2" if has_open_clip else "sd_v1"


def noise_markers(path: Path, state: dict[str, torch.Tensor]) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR) as marked by ``v_pred`` / ``ztsnr`` tensors in the file."""
    v_pred, ztsnr = V_PRED_MARKER in state, ZTSNR_MARKER in state
    if v_pred or ztsnr:
        log.info("%s is marked %s", path.name, " and ".join(
            name for name, on in (("v-prediction", v_pred), ("zero terminal SNR", ztsnr)) if on))
    return v_pred, ztsnr


def read_yaml(path: Path) -> dict[str, Any]:
    """An LDM / sgm model config: a mapping with a ``model: params:`` section."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ModelLoadError(f"{path}: cannot read this model config ({error})") from error
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(
            config["model"].get("params"), dict):
        raise ModelLoadError(f"{path}: not an LDM model config (expected a 'model: params:' section)")
    return config


def _sd_yaml_version(path: Path, config: dict[str, Any]) -> str:
    params = config["model"]["params"]
    for section in ("unet_config", "first_stage_config", "cond_stage_config"):
        if not isinstance(params.get(section), dict):
            raise ModelLoadError(f"{path}: 'model.params.{section}' is missing; expected a Stable Diffusion "
                                 f"1.x/2.x config like v1-inference.yaml or v2-inference.yaml")
    target = str(params["cond_stage_config"].get("target", ""))
    if target.endswith("FrozenOpenCLIPEmbedder"):
        return "sd_v2"
    if target.endswith("FrozenCLIPEmbedder"):
        return "sd_v1"
    raise ModelLoadError(f"{path}: cond_stage_config target {target!r} is not supported; expected "
                         f"FrozenCLIPEmbedder (SD1.x) or FrozenOpenCLIPEmbedder (SD2.x)")


# ---- components ------------------------------------------------------------------------------------------------
def build_unet(cfg: dict[str, Any], weights: dict[str, torch.Tensor], source: Path, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    """A ``UNet2DConditionModel`` with diffusers config ``cfg`` from LDM-named weights (``model.diffusion_model.*``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_empty(lambda: UNet2DConditionModel(**cfg))
    fill_module(unet, convert_ldm_unet_checkpoint(weights, cfg), what="UNet", source=source, device=device,
                dtype=dtype)
    return unet


def build_vae(config: dict[str, Any], weights: dict[str, torch.Tensor], source: Path, device: torch.device,
              dtype: torch.dtype) -> nn.Module:
    """An ``AutoencoderKL`` for an LDM config from ``first_stage_model.*`` weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = diffusers_vae_config(config)
    vae = build_empty(lambda: AutoencoderKL(**cfg))
    fill_module(vae, convert_ldm_vae_checkpoint(weights, cfg), what="VAE", source=source, device=device, dtype=dtype)
    return vae


def _local_folder(version: Any) -> Path | None:
    """The cond_stage ``params.version`` when it names an existing local folder (not a hub id)."""
    if not isinstance(version, str) or not version:
        return None
    folder = Path(version).expanduser()
    return folder if folder.is_dir() else None


def build_clip(weights: dict[str, torch.Tensor], prefix: str, folder: Path | None, source: Path,
               device: torch.device, dtype: torch.dtype) -> nn.Module:
    """CLIP ViT-L/14 (SD1.x; SDXL's first encoder) from transformers-named weights under ``prefix``."""
    from transformers import CLIPTextConfig

    named = clip_weights(weights, prefix)
    if folder is not None and (folder / "config.json").is_file():
        config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    else:
        config = clip_config_from_weights(named, hidden_act="quick_gelu", pad_token_id=49407)
    return build_text_encoder(named, config, what="text encoder (CLIP)", source=source, device=device, dtype=dtype)


def build_open_clip(weights: dict[str, torch.Tensor], prefix: str, source: Path, device: torch.device,
                    dtype: torch.dtype, *, penultimate: bool, with_projection: bool = False) -> nn.Module:
    """An OpenCLIP text tower (SD2.x ViT-H; SDXL's bigG) as a transformers CLIP model.

    ``penultimate`` (SD2.x): the last block is dropped, as SD2 uses the penultimate layer's output.
    """
    blocks = count_blocks(weights, prefix + "transformer.resblocks.")
    layers = blocks - 1 if penultimate else blocks
    named = open_clip_to_transformers(weights, prefix, layers)
    config = clip_config_from_weights(named, hidden_act="gelu", pad_token_id=0, layers=layers)
    return build_text_encoder(named, config, what="text encoder (OpenCLIP)", source=source,
                              with_projection=with_projection, device=device, dtype=dtype)


#: Tokenizers already built in this process, by (the content of their files, padding). A CLIP tokenizer's
#: vocabulary is ~20 MB of Python objects on older transformers (4.30: a pure-Python tokenizer); SDXL needs two
#: and every load would build them again, though checkpoints share one vocabulary. Nothing changes a tokenizer
#: after :func:`clip_tokenizer` returns it.
_TOKENIZERS: dict[tuple[Any, ...], Any] = {}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


def _tokenizer_files_digest(folder: Path) -> str:
    """A digest of the tokenizer files in ``folder`` (names and bytes; a model's config.json beside them aside)."""
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def clip_tokenizer(folder: Path | None = None, *, pad_with_zero: bool = False) -> Any:
    """The CLIP tokenizer from ``folder`` or found offline; ``pad_with_zero``: OpenCLIP's padding (token 0, "!").

    Built once per process for the same file contents and padding (see ``_TOKENIZERS``); callers must not
    change it.
    """
    from transformers import CLIPTokenizer

    from lora_trainer.models.tokenizer import clip_tokenizer_folder

    local = folder is not None and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file())
    source = folder if local and folder is not None else clip_tokenizer_folder()
    key = (_tokenizer_files_digest(source), pad_with_zero)
    if key not in _TOKENIZERS:
        tokenizer = CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
        if pad_with_zero:
            tokenizer.pad_token = "!"
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def load_single_file(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackbone:
    """An original-layout checkpoint (with an optional same-named ``.yaml``) -> a backbone on ``device``."""
    checkpoint = CheckpointFile(path)
    state = checkpoint.index  # shapes only: no tensor data is read through it
    version = checkpoint_layout(path, state)
    if version == "sdxl":
        from lora_trainer.models.sdxl_loading import load_sdxl_single_file

        return load_sdxl_single_file(checkpoint, device, dtype)
    v_marked, ztsnr = noise_markers(path, state)
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        config = read_yaml(yaml_path)
        if _sd_yaml_version(yaml_path, config) != version:
            raise ModelLoadError(f"{yaml_path} describes an {_sd_yaml_version(yaml_path, config)} model but "
                                 f"{path.name} holds {version} weights; remove or fix the .yaml")
        log.info("using the model config %s", yaml_path)
    else:
        config = default_original_config(state, version)
        if version == "sd_v2" and not v_marked:
            log.warning("%s: SD2 checkpoint without a .yaml beside it: assuming epsilon prediction (the 512-base "
                        "models). A 768-v model needs v_parameterization: true in the training config, or %s "
                        "with 'parameterization: \"v\"' (Stability's v2-inference-v.yaml).", path, yaml_path.name)
    params = config["model"]["params"]
    prediction = "v_prediction" if params.get("parameterization") == "v" or v_marked else "epsilon"
    cond = params["cond_stage_config"].get("params") or {}
    folder = _local_folder(cond.get("version")) if version == "sd_v1" else None
    tokenizer = clip_tokenizer(folder, pad_with_zero=version == "sd_v2")  # first: fails before model building

    def read(prefix: str) -> dict[str, torch.Tensor]:
        return checkpoint.tensors(prefix, device=device, dtype=dtype)

    def vae() -> nn.Module:
        return build_vae(config, read(VAE_PREFIX), path, device, dtype)

    def text_encoder_from(weights: dict[str, torch.Tensor], on: torch.device) -> nn.Module:
        if version == "sd_v1":
            return build_clip(weights, CLIP_PREFIX, folder, path, on, dtype)
        return build_open_clip(weights, OPEN_CLIP_PREFIX, path, on, dtype,
                               penultimate=str(cond.get("layer", "penultimate")) == "penultimate")

    text_prefix = CLIP_PREFIX if version == "sd_v1" else OPEN_CLIP_PREFIX

    def text_encoder() -> nn.Module:
        return text_encoder_from(read(text_prefix), device)

    unet_config = diffusers_unet_config(config, version, prediction, path)

    def unet() -> nn.Module:
        return build_unet(unet_config, read(UNET_PREFIX), path, device, dtype)

    backbone = DiffusersBackbone(
        first_unet(unet, unet_config, checkpoint, dtype), first_vae(vae, checkpoint),
        first_text_encoder(text_encoder, lambda: text_encoder_from(checkpoint.shapes(text_prefix), META), checkpoint),
        tokenizer, prediction_type=prediction, model_version=version,
        beta_start=float(params.get("linear_start", 0.00085)), beta_end=float(params.get("linear_end", 0.012)),
        num_train_timesteps=int(params.get("timesteps", 1000)), zero_terminal_snr=ztsnr, device=device,
        dtype=dtype)
    return with_source(backbone, checkpoint, {"unet": unet, "vae": vae, "text_encoder": text_encoder})


def first_unet(build: Callable[[], nn.Module], config: dict[str, Any], checkpoint: CheckpointFile,
               dtype: torch.dtype) -> nn.Module:
    """The UNet from ``build``; from a ``.safetensors`` file only its structure, checked against the names and
    shapes of the file's weights (on ``meta``, in ``dtype``): training reads them once the latents and captions are
    cached and the encoders released (see :func:`with_source`)."""
    if not checkpoint.is_safetensors:
        return build()
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_empty(lambda: UNet2DConditionModel(**config))
    fill_module(unet, convert_ldm_unet_checkpoint(checkpoint.shapes(UNET_PREFIX), config), what="UNet",
                source=checkpoint.path, device="meta", dtype=dtype)
    return unet


def first_text_encoder(build: Callable[[], nn.Module], structure: Callable[[], nn.Module],
                       checkpoint: CheckpointFile) -> nn.Module:
    """A text encoder from ``build``; from a ``.safetensors`` file only its ``structure`` (on ``meta``, checked
    against the names and shapes of the file's weights): its weights are read when it is first used, or in a
    second thread while the latents are encoded (:meth:`DiffusersBackbone.text_encoders_meanwhile`)."""
    return structure() if checkpoint.is_safetensors else build()


def first_vae(build: Callable[[], nn.Module], checkpoint: CheckpointFile) -> nn.Module:
    """The VAE from ``build``; from a ``.safetensors`` file without its decoder, which nothing needs before the
    first preview (it is read back then, see :func:`with_source`)."""
    vae = build()
    if checkpoint.is_safetensors:
        release(vae, VAE_DECODER_PARTS)
    return vae


def with_source(backbone: DiffusersBackbone, checkpoint: CheckpointFile,
                rebuilds: dict[str, Callable[[], nn.Module]]) -> DiffusersBackbone:
    """Let ``backbone`` read its UNet when training needs it, release its frozen encoders once their outputs
    are cached, and read them back from a ``.safetensors`` checkpoint (a pickle checkpoint is read whole, so it
    is not kept for that)."""
    if checkpoint.is_safetensors:
        backbone.keep_source(CheckpointSource(checkpoint.path, rebuilds))
    return_freed_memory()  # what conversions left in the C heap
    return backbone


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


def load_pretrained(cls: Any, folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained`` of one subfolder: local, safetensors only, built empty and filled in ``dtype``."""
    try:
        module = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                     variant=_variant(folder), torch_dtype=dtype, low_cpu_mem_usage=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{folder}: cannot load it ({error})") from error
    return module.to(device).eval()


def read_model_index(path: Path) -> dict[str, Any]:
    """A diffusers folder's ``model_index.json``."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is a folder without model_index.json; {EXPECTED}")
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{index} is not valid JSON ({error})") from error


def check_subfolders(path: Path, names: tuple[str, ...]) -> None:
    missing = [sub for sub in names if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} lacks the subfolder(s) {', '.join(missing)}; {EXPECTED}")


def scheduler_settings(path: Path) -> dict[str, Any]:
    """The noise-schedule arguments of :class:`DiffusersBackbone` from ``scheduler/scheduler_config.json``."""
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file.is_file() else {}
    return {"prediction_type": scheduler.get("prediction_type", "epsilon"),
            "beta_start": float(scheduler.get("beta_start", 0.00085)),
            "beta_end": float(scheduler.get("beta_end", 0.012)),
            "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
            "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False))}


def load_diffusers_folder(path: Path, device: torch.device, dtype: torch.dtype) -> DiffusersBackbone:
    """A local diffusers SD1.x/SD2.x/SDXL folder -> a backbone (``local_files_only``, safetensors only)."""
    info = read_model_index(path)
    if "text_encoder_2" in info or "XL" in str(info.get("_class_name", "")):
        from lora_trainer.models.sdxl_loading import load_sdxl_folder

        return load_sdxl_folder(path, device, dtype)
    check_subfolders(path, ("unet", "vae", "text_encoder", "tokenizer"))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = load_pretrained(UNet2DConditionModel, path / "unet", device, dtype)
    vae = load_pretrained(AutoencoderKL, path / "vae", device, dtype)
    text_encoder = load_pretrained(CLIPTextModel, path / "text_encoder", device, dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    version = "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
    return DiffusersBackbone(unet, vae, text_encoder, tokenizer, model_version=version, device=device, dtype=dtype,
                             **scheduler_settings(path))

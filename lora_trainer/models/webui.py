"""The WebUI's loaded model, trained in place: no second copy, and everything put back afterwards.

Wraps the original Stable Diffusion model object the AUTOMATIC1111 WebUI holds (``shared.sd_model``: an
``ldm`` ``LatentDiffusion`` for SD1.x/SD2.x, an ``sgm`` ``DiffusionEngine`` for SDXL). Nothing here imports a
WebUI, ``ldm`` or ``sgm`` module: the model object (and, from the WebUI, a preview renderer and a prompt
encoder) are handed in. LoRA layers go on the LDM modules themselves; the export
(:mod:`lora_trainer.lora.kohya`) names them the kohya way the WebUI, Forge, ComfyUI and diffusers load.

SDXL conditioning travels between :meth:`WebUIBackbone.encode_prompts` and :meth:`WebUIBackbone.predict` as
one tensor per prompt (cross-attention context and the ``vector`` of pooled text + size ids, flattened and
concatenated; :func:`pack_sdxl_conditioning`), so the trainer can cache and batch it like an SD1 embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.host.openclip import OpenClipSplit
from lora_trainer.models.backbone import Backbone
from lora_trainer.models.ldm_blocks import ddim_preview, images_from_decoded, set_block_checkpointing

Sampler = Callable[..., list[Any]]
TOKENS = 77  # one CLIP chunk: BOS + 75 tokens + EOS


class UnsupportedModel(UserError):
    """A loaded model this adapter cannot train (and why)."""


def model_version(model: Any) -> str:
    """``sd_v1``, ``sd_v2`` or ``sdxl`` from the WebUI's flags, else from the model's structure."""
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd_v2"
    cond = getattr(model, "cond_stage_model", None)
    inner = getattr(cond, "wrapped", cond)
    return "sd_v2" if hasattr(inner, "model") and not hasattr(inner, "transformer") else "sd_v1"


def clip_text_model(model: Any) -> nn.Module:
    """The transformers CLIPTextModel inside an SD1 cond stage (hijacked by the WebUI or not)."""
    cond = model.cond_stage_model
    inner = getattr(cond, "wrapped", cond)
    return inner.transformer


def legacy_ddpm_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """The SD "scaled linear" schedule (sgm's ``LegacyDDPMDiscretization``), float32."""
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def pack_sdxl_conditioning(crossattn: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` context and ``[B, V]`` vector -> one ``[B, T*C + V]`` tensor."""
    return torch.cat([crossattn.flatten(1), vector.to(crossattn.dtype)], dim=1)


def unpack_sdxl_conditioning(packed: torch.Tensor, context_dim: int, vector_dim: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_sdxl_conditioning`: ``{"crossattn": [B, T, C], "vector": [B, V]}``."""
    flat, vector = packed[:, :-vector_dim], packed[:, -vector_dim:]
    if flat.shape[1] % context_dim:
        raise ValueError(f"SDXL conditioning of width {packed.shape[1]} does not split into a [T, {context_dim}] "
                         f"context and a {vector_dim}-wide vector")
    return {"crossattn": flat.reshape(packed.shape[0], -1, context_dim), "vector": vector}


def _sdxl_dims(unet: nn.Module) -> tuple[int, int]:
    """(cross-attention context width, ``vector`` width) of an sgm SDXL UNet."""
    context = next((m.in_features for name, m in unet.named_modules()
                    if name.endswith("attn2.to_k") and isinstance(m, nn.Linear)), None)
    adm = getattr(unet, "adm_in_channels", None)
    if adm is None:
        label = getattr(unet, "label_emb", None)
        adm = next((m.in_features for m in label.modules() if isinstance(m, nn.Linear)), None) if label else None
    if context is None or adm is None:
        raise UnsupportedModel("this SDXL UNet has no cross-attention or no label embedding; cannot train it")
    return context, adm


def _text_embedder(embedder: nn.Module) -> nn.Module:
    return getattr(embedder, "wrapped", embedder)


def _parameterization(model: Any) -> str:
    """``eps`` or ``v``: the WebUI's attribute, else (raw sgm) the denoiser's scaling class."""
    value = getattr(model, "parameterization", None)
    if value is None:
        scaling = getattr(getattr(model, "denoiser", None), "scaling", None)
        value = "v" if type(scaling).__name__ == "VScaling" else "eps"
    if value not in ("eps", "v"):
        raise UnsupportedModel(f"this model predicts {value!r}; only eps and v prediction are trained")
    return value


class WebUIBackbone(Backbone):
    """The WebUI's LDM model (SD1.x / SD2.x ``LatentDiffusion``, SDXL ``DiffusionEngine``), used in place.

    ``sampler(prompts, seed=, steps=, width=, height=)`` renders previews (in the WebUI: its own txt2img with
    the loaded checkpoint); without one a plain DDIM loop over the UNet is used.
    ``encode_text(prompts)`` replaces the model's own prompt encoding when given (SDXL: it returns a packed
    tensor, see :func:`pack_sdxl_conditioning`, or a ``{"crossattn", "vector"}`` dict).
    ``sdxl_size``: the (height, width) given to SDXL's original/target size conditioning.
    ``openclip_text_encoder``: allow text-encoder LoRA on OpenCLIP encoders (SD2.x, SDXL's second one). Their
    attention is swapped for split modules from :meth:`lora_roots` until :meth:`release_lora_roots`, which the
    caller must call (in a ``finally``) once the LoRA layers are removed.
    """

    def __init__(self, model: Any, *, sampler: Sampler | None = None,
                 encode_text: Callable[[list[str]], Any] | None = None,
                 sdxl_size: tuple[int, int] = (1024, 1024), openclip_text_encoder: bool = False) -> None:
        self.model = model
        self.openclip_text_encoder = openclip_text_encoder
        self._splits: dict[int, OpenClipSplit] = {}
        self.model_version = model_version(model)
        unet = model.model.diffusion_model
        if getattr(unet, "in_channels", 4) != getattr(unet, "out_channels", 4):
            raise UnsupportedModel(f"the loaded model is an inpainting / instruct model (its UNet takes "
                                   f"{unet.in_channels} channels); load a plain txt2img checkpoint to train a LoRA")
        self.prediction_type = "v_prediction" if _parameterization(model) == "v" else "epsilon"
        alphas = getattr(model, "alphas_cumprod_original", None)
        if alphas is None:
            alphas = getattr(model, "alphas_cumprod", None)
        if alphas is None and self.model_version == "sdxl":
            alphas = legacy_ddpm_alphas_cumprod()
        self.alphas_cumprod = torch.as_tensor(alphas).detach().float().cpu()
        weight = next(unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.sdxl_size = sdxl_size
        self._sdxl_dims = _sdxl_dims(unet) if self.model_version == "sdxl" else None
        self._sampler = sampler
        self._encode_text = encode_text

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            first = self.model.first_stage_model
            x = pixels.to(self.device, dtype=next(first.parameters()).dtype)
            encoded = self.model.encode_first_stage(x)
            if self.model_version == "sdxl":
                return encoded  # sgm's encode_first_stage samples and scales already
            return self.model.get_first_stage_encoding(encoded)

    def encode_prompts(self, prompts: list[str]) -> Any:
        """Text conditioning, cut to the first 75-token chunk (77 positions).

        The WebUI encodes long prompts as several 77-token chunks, so two captions could give contexts of
        different lengths that cannot be batched; training on the first chunk is kohya's default
        (``max_token_length`` 75).
        """
        if self.model_version == "sdxl":
            cond = self._encode_text(prompts) if self._encode_text is not None else self._sdxl_conditioner(prompts)
            if isinstance(cond, dict):
                return pack_sdxl_conditioning(cond["crossattn"][:, :TOKENS], cond["vector"])
            return cond
        cond = self._encode_text(prompts) if self._encode_text is not None \
            else self.model.get_learned_conditioning(prompts)
        return cond[:, :TOKENS] if torch.is_tensor(cond) and cond.dim() == 3 else cond

    def _sdxl_conditioner(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """sgm's GeneralConditioner on a batch with size ids; gradients reach the text encoders when enabled.

        The conditioner runs embedders that are not ``is_trainable`` under ``torch.no_grad``; the flag is
        switched on for the call while grad mode is on (text-encoder LoRA) and put back afterwards.
        """
        height, width = self.sdxl_size
        size = torch.tensor([[height, width]] * len(prompts), device=self.device)
        batch = {"txt": list(prompts), "original_size_as_tuple": size, "target_size_as_tuple": size,
                 "crop_coords_top_left": torch.zeros_like(size), "aesthetic_score": torch.full(
                     (len(prompts), 1), 6.0, device=self.device)}
        embedders = list(self.model.conditioner.embedders)
        saved = [e.is_trainable for e in embedders]
        try:
            for e in embedders:
                e.is_trainable = bool(e.is_trainable) or torch.is_grad_enabled()
            return self.model.conditioner(batch)
        finally:
            for e, flag in zip(embedders, saved, strict=True):
                e.is_trainable = flag

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        x = noisy_latents.to(self.dtype)
        if self.model_version == "sdxl":
            cond = conditioning if isinstance(conditioning, dict) else unpack_sdxl_conditioning(
                conditioning, *self._sdxl_dims)
            cond = {k: cond[k].to(self.device, self.dtype) for k in ("crossattn", "vector")}
            # what the WebUI's DiffusionEngine.apply_model does: the UNet wrapper with discrete timesteps
            return self.model.model(x, timesteps.to(self.device), cond)
        cond = conditioning.to(self.dtype) if torch.is_tensor(conditioning) else conditioning
        return self.model.apply_model(x, timesteps, cond)

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        roots: dict[str, nn.Module] = {"lora_unet": self.model.model.diffusion_model}
        if not train_text_encoder:
            return roots
        if self.model_version == "sd_v1":
            roots["lora_te"] = clip_text_model(self.model)
            return roots
        if not self.openclip_text_encoder:
            model = "SDXL" if self.model_version == "sdxl" else "SD2.x"
            raise UnsupportedModel(f"text-encoder LoRA on the OpenCLIP text encoder of {model} is not enabled "
                                   f"here; turn off train_text_encoder for this {model} model")
        if self.model_version == "sd_v2":
            roots["lora_te"] = self._split_root(_text_embedder(self.model.cond_stage_model).model)
        else:  # SDXL: the CLIP ViT-L embedder (transformers) and the OpenCLIP bigG one, in conditioner order
            for embedder in map(_text_embedder, self.model.conditioner.embedders):
                if isinstance(getattr(embedder, "transformer", None), nn.Module) and "lora_te1" not in roots:
                    roots["lora_te1"] = embedder.transformer
                elif isinstance(getattr(embedder, "model", None), nn.Module) and "lora_te2" not in roots:
                    roots["lora_te2"] = self._split_root(embedder.model)
            if len(roots) == 1:
                raise UnsupportedModel("no CLIP or OpenCLIP text embedder found in this SDXL model's conditioner")
        return roots

    def _split_root(self, text_model: nn.Module) -> nn.Module:
        """The transformers-named root of an OpenCLIP text model, split once per run."""
        if id(text_model) not in self._splits:
            self._splits[id(text_model)] = OpenClipSplit(text_model)
        return self._splits[id(text_model)].root

    def release_lora_roots(self) -> None:
        """Give OpenCLIP text models their original attention modules back (no-op when none were split)."""
        for split in self._splits.values():
            split.restore()
        self._splits.clear()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.model]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_block_checkpointing(self.model.model.diffusion_model, enabled)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        return images_from_decoded(self.model.decode_first_stage(latents.to(self.dtype)))

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        if self._sampler is not None:
            return self._sampler(prompts, seed=seed, steps=steps, width=width, height=height)
        channels = getattr(self.model, "channels", 4)
        return [ddim_preview(self, prompt, seed=seed, steps=steps, width=width, height=height, channels=channels)
                for prompt in prompts]

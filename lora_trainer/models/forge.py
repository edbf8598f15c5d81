"""Forge's loaded model, trained in place: no second copy, and everything put back afterwards.

In Stable Diffusion WebUI Forge, ``shared.sd_model`` is a ``ForgeDiffusionEngine`` (``StableDiffusion``,
``StableDiffusion2``, ``StableDiffusionXL``...). Its UNet is ``forge_objects.unet.model.diffusion_model`` (LDM
module names, so the kohya export is the same as for the A1111 WebUI), its noise schedule and prediction type
live on ``forge_objects.unet.model.predictor``, and its text encoders are transformers CLIP models
(``forge_objects.clip.cond_stage_model.clip_l`` / ``clip_h`` / ``clip_g``, each with a ``transformer``).

The engine's own ``get_learned_conditioning`` and ``encode_first_stage`` are used, called beneath their
``torch.inference_mode()`` decorator so that their results (and text-encoder gradients) can be trained on.
While LoRA roots are handed out, the weights of those roots are ordinary tensors in ``torch.nn.Linear``
modules (:mod:`lora_trainer.host.forge_weights`); :meth:`ForgeBackbone.release_lora_roots` undoes both.
Nothing here imports Forge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.host.forge_blocks import InPlaceResidualGuard
from lora_trainer.host.forge_weights import LinearSwap, ThawedTensors
from lora_trainer.models.backbone import Backbone
from lora_trainer.models.ldm_blocks import ddim_preview, images_from_decoded, set_block_checkpointing
from lora_trainer.models.webui import TOKENS, UnsupportedModel, pack_sdxl_conditioning, unpack_sdxl_conditioning

Sampler = Callable[..., list[Any]]
_TEXT_ENCODERS = {"sd_v1": (("lora_te", "clip_l"),), "sd_v2": (("lora_te", "clip_h"),),
                  "sdxl": (("lora_te1", "clip_l"), ("lora_te2", "clip_g"))}


def is_forge_engine(model: Any) -> bool:
    """True for Forge's ``ForgeDiffusionEngine`` objects (they carry ``forge_objects``)."""
    return hasattr(model, "forge_objects") and hasattr(model, "forge_objects_original")


def forge_model_version(engine: Any) -> str:
    """``sd_v1``, ``sd_v2`` or ``sdxl`` from the engine's flags; other families are refused."""
    for flag, version in (("is_sdxl", "sdxl"), ("is_sd2", "sd_v2"), ("is_sd1", "sd_v1")):
        if getattr(engine, flag, False):
            return version
    raise UnsupportedModel(f"the loaded model is a {type(engine).__name__}; LoRA training here covers SD1.x, SD2.x "
                           f"and SDXL checkpoints (SDXL refiner, SD3, Flux and others are not supported)")


def beneath_inference_mode(method: Callable[..., Any]) -> Callable[..., Any]:
    """The function a ``@torch.inference_mode()`` decorator wraps, bound like ``method``."""
    function = getattr(method, "__func__", method)
    inner = getattr(function, "__wrapped__", None)
    if inner is None:
        return method
    owner = getattr(method, "__self__", None)
    return inner.__get__(owner) if owner is not None else inner


class ForgeBackbone(Backbone):
    """Forge's loaded SD1.x / SD2.x / SDXL engine, used in place.

    ``sampler(prompts, seed=, steps=, width=, height=)`` renders previews (in Forge: its own txt2img); without
    one, or when it returns None, a plain DDIM loop over the UNet is used. ``load_models()`` brings the UNet and
    text encoder back onto the GPU (Forge's ``memory_management.load_models_gpu``) should Forge have moved them
    off to make room for another model (the VAE, say) while memory is short.
    """

    def __init__(self, engine: Any, *, sampler: Sampler | None = None,
                 load_models: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.model_version = forge_model_version(engine)
        if getattr(engine, "is_inpaint", False):
            raise UnsupportedModel("the loaded model is an inpainting model; load a plain txt2img checkpoint to "
                                   "train a LoRA")
        kmodel = engine.forge_objects.unet.model
        self.unet: nn.Module = kmodel.diffusion_model
        predictor = kmodel.predictor
        prediction = getattr(predictor, "prediction_type", None)
        if prediction not in ("epsilon", "v_prediction"):
            raise UnsupportedModel(f"the loaded model predicts {prediction!r}; only eps and v prediction are trained")
        self.prediction_type = prediction
        self.alphas_cumprod = predictor.alphas_cumprod.detach().float().cpu().clone()
        weight = next(self.unet.parameters())
        self.device = weight.device
        self.dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self._sdxl_dims = self._sdxl_widths() if self.model_version == "sdxl" else None
        self._sampler = sampler
        self._load_models = load_models
        self._thawed = ThawedTensors()
        self._swap = LinearSwap()
        self._residuals = InPlaceResidualGuard()
        self._roots: dict[str, nn.Module] = {}

    # ---- what the trainer calls -------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        encode = beneath_inference_mode(self.engine.encode_first_stage)
        with torch.no_grad():
            return encode(pixels.to(self.device, torch.float32))

    def encode_prompts(self, prompts: list[str]) -> Any:
        """The engine's own conditioning, cut to the first 75-token chunk (77 positions); SDXL packed."""
        text_trained = any(prefix != "lora_unet" for prefix in self._roots)
        with contextlib.nullcontext() if text_trained else torch.no_grad():  # frozen weights cannot record graphs
            cond = beneath_inference_mode(self.engine.get_learned_conditioning)(list(prompts))
        if isinstance(cond, dict):
            return pack_sdxl_conditioning(cond["crossattn"][:, :TOKENS], cond["vector"])
        return cond[:, :TOKENS]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """The UNet's raw output (what Forge's ``KModel.apply_model`` computes before its sigma scaling)."""
        self._ensure_on_device()
        x = noisy_latents.to(self.device, self.dtype)
        t = timesteps.to(self.device).float()
        extra = {}
        if self._sdxl_dims is not None:
            cond = unpack_sdxl_conditioning(conditioning, *self._sdxl_dims)
            context, extra["y"] = cond["crossattn"], cond["vector"].to(self.device, self.dtype)
        else:
            context = conditioning
        with contextlib.nullcontext() if "lora_unet" in self._roots else torch.no_grad():
            return self.unet(x, t, context=context.to(self.device, self.dtype), transformer_options={}, **extra)

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        """The UNet (and text encoders), thawed and with torch Linear layers, until :meth:`release_lora_roots`."""
        roots: dict[str, nn.Module] = {"lora_unet": self.unet}
        if train_text_encoder:
            encoders = self.engine.forge_objects.clip.cond_stage_model
            for prefix, name in _TEXT_ENCODERS[self.model_version]:
                roots[prefix] = getattr(encoders, name).transformer
        for prefix, root in roots.items():
            if prefix not in self._roots:
                self._thawed.thaw([root])
                self._swap.swap(root)
                self._residuals.guard(root)
                self._roots[prefix] = root
        return roots

    def release_lora_roots(self) -> None:
        """Forge's Linear modules and inference tensors back in place (call after the LoRA layers are removed)."""
        self._residuals.release()
        self._swap.restore()
        self._thawed.refreeze()
        self._roots.clear()

    def frozen_modules(self) -> list[nn.Module]:
        objects = self.engine.forge_objects
        return [objects.unet.model, objects.clip.cond_stage_model, objects.vae.first_stage_model]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_block_checkpointing(self.unet, enabled)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        decode = beneath_inference_mode(self.engine.decode_first_stage)
        return images_from_decoded(decode(latents.to(self.device, torch.float32)))

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        images = None
        if self._sampler is not None:
            images = self._sampler(prompts, seed=seed, steps=steps, width=width, height=height)
            self._check_still_trainable()
        if images is not None:
            return images
        return [ddim_preview(self, prompt, seed=seed, steps=steps, width=width, height=height) for prompt in prompts]

    # ---- helpers ----------------------------------------------------------------------------------
    def _ensure_on_device(self) -> None:
        if next(self.unet.parameters()).device == self.device:
            return
        if self._load_models is not None:
            self._load_models()
        if next(self.unet.parameters()).device != self.device:
            raise UserError(f"Forge moved the UNet off {self.device} and it could not be brought back; free GPU "
                            f"memory (close other models) and try again")

    def _check_still_trainable(self) -> None:
        """Forge may move weights between devices inside its (inference-mode) txt2img when memory is short."""
        for prefix, root in self._roots.items():
            moved = next((name for name, p in root.named_parameters() if p.device != self.device or
                          p.is_inference()), None)
            if moved is not None:
                raise UserError(f"Forge moved the model being trained ({prefix}.{moved}) while rendering a preview, "
                                f"because GPU memory is short; turn previews off (sample every 0) or lower the "
                                f"resolution or batch size")

    def _sdxl_widths(self) -> tuple[int, int]:
        """(cross-attention context width, ``y`` vector width) of Forge's SDXL UNet."""
        context = next((m.weight.shape[1] for name, m in self.unet.named_modules()
                        if name.endswith("attn2.to_k") and getattr(m, "weight", None) is not None), None)
        label = getattr(self.unet, "label_emb", None)
        vector = next((m.weight.shape[1] for m in label.modules()
                       if getattr(m, "weight", None) is not None and m.weight.dim() == 2), None) if label else None
        if context is None or vector is None:
            raise UnsupportedModel("this SDXL UNet has no cross-attention or no label embedding; cannot train it")
        return context, vector

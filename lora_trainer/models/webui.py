"""The WebUI's loaded model, trained in place: no second copy, and everything put back afterwards.

Wraps the original Stable Diffusion model object the AUTOMATIC1111 WebUI holds (``shared.sd_model``, an
``ldm`` ``LatentDiffusion`` for SD1.x/SD2.x). Nothing here imports a WebUI module: the model object (and,
from the WebUI, a preview renderer and a prompt encoder) are handed in. LoRA layers go on the LDM modules
themselves, so exported keys are the compvis-style kohya names (``lora_unet_input_blocks_1_1_...``) that
A1111, Forge and ComfyUI load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.models.backbone import Backbone

Sampler = Callable[..., list[Any]]


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


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


class WebUIBackbone(Backbone):
    """An LDM ``LatentDiffusion`` (SD1.x / SD2.x) as the trainer sees it, used in place.

    ``sampler(prompts, seed=, steps=, width=, height=)`` renders previews (in the WebUI: its own txt2img with
    the loaded checkpoint); without one a plain DDIM loop over ``apply_model`` is used.
    ``encode_text(prompts)`` replaces ``model.get_learned_conditioning`` when given.
    """

    def __init__(self, model: Any, *, sampler: Sampler | None = None,
                 encode_text: Callable[[list[str]], Any] | None = None) -> None:
        self.model = model
        self.model_version = model_version(model)
        if self.model_version == "sdxl":
            raise UnsupportedModel("SDXL models are not trained in place yet; load an SD1.x or SD2.x checkpoint")
        self.prediction_type = "v_prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
        alphas = getattr(model, "alphas_cumprod_original", None)
        self.alphas_cumprod = (alphas if alphas is not None else model.alphas_cumprod).detach().float().cpu()
        weight = next(model.model.diffusion_model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self._sampler = sampler
        self._encode_text = encode_text

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            first = self.model.first_stage_model
            x = pixels.to(self.device, dtype=next(first.parameters()).dtype)
            return self.model.get_first_stage_encoding(self.model.encode_first_stage(x))

    def encode_prompts(self, prompts: list[str]) -> Any:
        if self._encode_text is not None:
            return self._encode_text(prompts)
        return self.model.get_learned_conditioning(prompts)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        cond = conditioning.to(self.dtype) if torch.is_tensor(conditioning) else conditioning
        return self.model.apply_model(noisy_latents.to(self.dtype), timesteps, cond)

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        roots: dict[str, nn.Module] = {"lora_unet": self.model.model.diffusion_model}
        if train_text_encoder:
            if self.model_version != "sd_v1":
                raise UnsupportedModel("text-encoder LoRA is trained for SD1.x models only; turn off "
                                       "train_text_encoder for this SD2.x model")
            roots["lora_te"] = clip_text_model(self.model)
        return roots

    def frozen_modules(self) -> list[nn.Module]:
        return [self.model]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Non-reentrant torch checkpointing on every ldm block that has a checkpoint switch.

        ldm's own switch uses a custom autograd function that differentiates every parameter of the block,
        which fails once base weights are frozen; so the switch stays as it is and the block's ``forward`` is
        overridden on the instance (undone by deleting the attribute).
        """
        for module in self.model.model.diffusion_model.modules():
            has_switch = any(isinstance(getattr(module, f, None), bool) for f in ("checkpoint", "use_checkpoint"))
            if not has_switch:
                continue
            if enabled and "forward" not in vars(module):
                module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))
            elif not enabled and isinstance(vars(module).get("forward"), functools.partial):
                del module.forward

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        from PIL import Image

        images = self.model.decode_first_stage(latents.to(self.dtype)).float().clamp(-1, 1)
        arrays = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        if self._sampler is not None:
            return self._sampler(prompts, seed=seed, steps=steps, width=width, height=height)
        return [self._ddim(prompt, seed, steps, width, height) for prompt in prompts]

    @torch.no_grad()
    def _ddim(self, prompt: str, seed: int, steps: int, width: int, height: int, guidance: float = 7.0) -> Any:
        """A deterministic DDIM (eta 0) preview with classifier-free guidance."""
        alphas = self.alphas_cumprod
        gen = torch.Generator().manual_seed(seed)
        channels = getattr(self.model, "channels", 4)
        x = torch.randn((1, channels, height // 8, width // 8), generator=gen).to(self.device)
        cond, uncond = self.encode_prompts([prompt]), self.encode_prompts([""])
        times = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
        for index, t in enumerate(times):
            t_batch = torch.full((1,), t, device=self.device, dtype=torch.long)
            out_c = self.predict(x, t_batch, cond).float()
            out_u = self.predict(x, t_batch, uncond).float()
            out = out_u + guidance * (out_c - out_u)
            a_t = alphas[t].to(self.device)
            if self.prediction_type == "v_prediction":
                x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
                eps = (1 - a_t).sqrt() * x + a_t.sqrt() * out
            else:
                eps = out
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            a_prev = alphas[times[index + 1]].to(self.device) if index + 1 < len(times) else torch.tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return self.decode_latents(x)[0]

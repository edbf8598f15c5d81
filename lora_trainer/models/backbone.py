"""What the trainer needs from a model, independent of where the model came from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Backbone(ABC):
    """A latent-diffusion model as the trainer sees it.

    ``model_version``: ``"sd_v1"``, ``"sd_v2"`` or ``"sdxl"``; ``prediction_type``: ``"epsilon"`` or
    ``"v_prediction"``; ``alphas_cumprod``: float32 tensor [num_train_timesteps] on CPU.
    """

    model_version: str
    prediction_type: str
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    #: Prompts :meth:`encode_prompts` may take in one call while captions are cached: 1 where the prompts of a
    #: batch influence each other (the WebUI normalises emphasis weights over the whole batch).
    prompts_per_call: int = 1

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> scaled latents [B, 4, H/8, W/8] (a sample, not the mean)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Any:
        """Prompts -> conditioning the ``predict`` call takes (a tensor for SD1/SD2)."""

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """The denoiser's raw output (epsilon or v, per ``prediction_type``)."""

    @abstractmethod
    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        """Modules that receive LoRA layers, keyed by their kohya prefix (``lora_unet``, ``lora_te``...)."""

    @abstractmethod
    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        """Render one PIL image per prompt with the current weights (LoRA included)."""

    def frozen_modules(self) -> list[nn.Module]:
        """Every module whose parameters must stay frozen (all base weights)."""
        return list(self.lora_roots(True).values())

    @abstractmethod
    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory in the denoiser (and text encoder when it is trained)."""

    def release_lora_roots(self) -> None:
        """Undo what :meth:`lora_roots` set up to expose LoRA targets (nothing, for most models)."""
        return None

    def add_size_conditioning(self, conditioning: Any, items: list[Any]) -> Any:
        """Conditioning for a batch of training ``items`` (``TrainItem``: original and target sizes).

        SDXL adds each image's original size, crop offset and target size; others need nothing more.
        """
        return conditioning

    def set_noise_options(self, *, v_parameterization: bool = False, zero_terminal_snr: bool = False) -> None:
        """kohya's options: ``v_parameterization`` trains v-prediction whatever the model declares;
        ``zero_terminal_snr`` rescales the schedule's betas so the last timestep is pure noise."""
        if v_parameterization:
            self.prediction_type = "v_prediction"
        if zero_terminal_snr:
            self.alphas_cumprod = zero_terminal_snr_alphas_cumprod(self.alphas_cumprod)

    def load_denoiser(self) -> None:
        """Make sure the denoiser's weights are in memory: a backbone may read them only once the encoders'
        outputs are cached and the encoders released, so that the two never take memory together."""
        return None

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The encoders usable on the training device for the length of the block, after
        :meth:`offload_encoders` (nothing to do for most models)."""
        yield

    @contextmanager
    def text_encoders_meanwhile(self, job: Callable[[], T]) -> Iterator[Future[T]]:
        """``job`` (work with the text encoders: caching the captions' embeddings) done when the block ends, its
        result in the future yielded. Here it runs after the block; a backbone whose text encoders can work beside
        the block's work (the latents' encoding) runs it in a second thread meanwhile."""
        outcome: Future[T] = Future()
        yield outcome
        outcome.set_result(job())

    def offload_encoders(self, *, vae: bool, text_encoders: bool) -> None:
        """Release the VAE / text encoders from the training device once their outputs are cached.

        They come back for previews only (:meth:`sample`) and for good with :meth:`restore_encoders`.
        Nothing to do for most models (the WebUI manages its own memory).
        """
        return None

    def restore_encoders(self) -> None:
        """Undo :meth:`offload_encoders`."""
        return None


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule with its betas rescaled to zero terminal SNR (Lin et al. 2023; diffusers' own rescaling)."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    alphas = alphas_cumprod.double()
    betas = 1 - torch.cat([alphas[:1], alphas[1:] / alphas[:-1]])
    return torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0).float()

"""Backbone over diffusers components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lora_trainer.models.backbone import Backbone, T
from lora_trainer.models.weight_release import CheckpointSource, is_released, release


class DiffusersBackbone(Backbone):
    """An SD1.x / SD2.x model held as diffusers modules; the CLI's and the tests' backbone."""

    #: The checkpoint file the modules were read from: frozen ones may then be released and read back on use.
    source: CheckpointSource | None = None
    #: The VAE's parts that encoding needs (its decoder may stay released until a preview).
    ENCODE_PARTS = ("encoder", "quant_conv")
    TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
    prompts_per_call = 8  # each prompt is encoded on its own (one call per caption is ~30% slower on a CPU)

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, *,
                 prediction_type: str = "epsilon", model_version: str = "sd_v1",
                 beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 clip_skip: int = 1, zero_terminal_snr: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        """``device`` / ``dtype``: where the modules already are (see :meth:`to` to move them)."""
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.model_version = model_version
        self.clip_skip = clip_skip
        self._schedule = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                          "beta_end": beta_end}
        self._set_schedule(prediction_type, zero_terminal_snr)
        self.device = torch.device(device)
        self.dtype = dtype
        self._pending: set[str] = set()  # modules with released weights (see ensure_loaded)

    def _set_schedule(self, prediction_type: str, zero_terminal_snr: bool) -> None:
        from diffusers import DDPMScheduler

        self.prediction_type = prediction_type
        self.noise_scheduler = DDPMScheduler(**self._schedule, beta_schedule="scaled_linear",
                                             prediction_type=prediction_type, clip_sample=False,
                                             rescale_betas_zero_snr=zero_terminal_snr)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.float().cpu()

    def set_noise_options(self, *, v_parameterization: bool = False, zero_terminal_snr: bool = False) -> None:
        zero_terminal_snr = zero_terminal_snr or bool(self.noise_scheduler.config.rescale_betas_zero_snr)
        self._set_schedule("v_prediction" if v_parameterization else self.prediction_type, zero_terminal_snr)

    def modules(self) -> list[nn.Module]:
        """Every model component (denoiser, VAE, text encoders)."""
        return [self.unet, self.vae, self.text_encoder]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersBackbone:
        """Move every module; ``dtype`` applies to the frozen base weights."""
        self.load_released()
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in self.modules():
            module.to(self.device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.ensure_loaded(["vae"], self.ENCODE_PARTS)
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self.ensure_loaded(self._encoder_names(False, True))
        ids = self.tokenize(prompts).to(self.device)
        if self.clip_skip > 1:
            out = self.text_encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            modules = dict(self.text_encoder.named_modules())  # transformers >= 5.6 drops the text_model level
            norm = modules.get("text_model.final_layer_norm") or modules["final_layer_norm"]
            return norm(hidden)
        return self.text_encoder(ids)[0]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        self.ensure_loaded(["unet"])
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=conditioning).sample

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        roots: dict[str, nn.Module] = {"lora_unet": self.unet}
        if train_text_encoder:
            roots["lora_te"] = self.text_encoder
        return roots

    def frozen_modules(self) -> list[nn.Module]:
        return self.modules()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        for te in self.text_encoders():
            name = "enable" if enabled else "disable"
            getattr(te, f"activation_checkpointing_{name}", getattr(te, f"gradient_checkpointing_{name}"))()

    # ---- encoders off the training device while their outputs are cached ----------------------------------
    def release_part(self, name: str, parts: tuple[str, ...] | None = None) -> bool:
        """Release the frozen module ``name`` (or its submodules ``parts``) from memory when it can be read back
        from the checkpoint; True when it was."""
        if self.source is None or not self.source.can_rebuild(name):
            return False
        release(getattr(self, name), parts)
        self._pending.add(name)
        return True

    def keep_source(self, source: CheckpointSource) -> None:
        """Read released weights back from ``source``; modules built without their weights (``meta``) count as
        released: they are read the first time they are used."""
        self.source = source
        self._pending = {name for name in source.rebuilds if is_released(getattr(self, name))}

    def ensure_loaded(self, names: list[str], parts: tuple[str, ...] | None = None) -> None:
        """Read back the released weights of the modules ``names`` (only when ``parts`` of them are released).
        Nothing is read during a memory plan's dry run (the backbone then runs on the meta device)."""
        if self.device.type == "meta" or self.source is None:
            return
        for name in names:
            module = getattr(self, name)
            if name in self._pending and is_released(module, parts):
                self.source.restore(name, module, self.device)
                self._pending.discard(name)

    @contextmanager
    def text_encoders_meanwhile(self, job: Callable[[], T]) -> Iterator[Future[T]]:
        """Read the text encoders' released weights and run ``job`` with them in a second thread while the block
        runs; wait for both at its end. The block is the latents' encoding: the VAE's kernels leave the interpreter
        free, so reading the text encoders and encoding the captions cost no time of their own (``README``'s
        performance section has the figures). The block must not build modules meanwhile (the reading thread
        builds its modules empty, which patches ``nn.Module`` for the moment), nor use the text encoders; ``job``
        must not use the global random generator (the block may)."""
        names = [name for name in self._encoder_names(False, True) if name in self._pending]
        outcome: Future[T] = Future()

        def work() -> None:
            try:
                self.ensure_loaded(names)  # set membership and discard are atomic: no lock with the block's reads
                outcome.set_result(job())
            except BaseException as error:  # handed to the caller below
                outcome.set_exception(error)

        worker = threading.Thread(target=work, name="text-encoders", daemon=True)
        worker.start()
        try:
            yield outcome
        finally:
            worker.join()
        outcome.result()  # the worker's error, if any, reaches the caller here

    def load_released(self) -> None:
        """Read back every released weight (the whole model in memory again)."""
        self.ensure_loaded(sorted(self._pending))

    def load_denoiser(self) -> None:
        self.ensure_loaded(["unet"])

    def _encoder_names(self, vae: bool, text_encoders: bool) -> list[str]:
        return (["vae"] if vae else []) + ([n for n in self.TEXT_ENCODER_NAMES if hasattr(self, n)]
                                           if text_encoders else [])

    def offload_encoders(self, *, vae: bool, text_encoders: bool) -> None:
        """On a GPU, move the VAE / text encoders to the CPU; on the CPU, release them from memory when they can
        be read back from the checkpoint file (nothing to do otherwise)."""
        names = self._encoder_names(vae, text_encoders)
        if self.device.type == "cpu":
            self._released = [name for name in names if self.release_part(name)]
            return
        self._offloaded = [getattr(self, name) for name in names]
        for module in self._offloaded:
            module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore_encoders(self) -> None:
        """Undo :meth:`offload_encoders`: offloaded modules come back to the device; released ones are read back
        the next time they are used."""
        for module in getattr(self, "_offloaded", []):
            module.to(self.device)
        self._offloaded = []
        self._released = []

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """The offloaded encoders back on the training device for the length of the block (previews)."""
        offloaded = getattr(self, "_offloaded", [])
        for module in offloaded:
            module.to(self.device)
        self.ensure_loaded(self._encoder_names(True, True))
        try:
            yield
        finally:
            for module in offloaded:
                module.to("cpu")
            for name in getattr(self, "_released", []):
                self.release_part(name)

    # ---- previews -----------------------------------------------------------------------------------------
    def prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's ``prompt_embeds`` (and for SDXL ``pooled_prompt_embeds``) for ``prompts``."""
        return {"prompt_embeds": self.encode_prompts(prompts)}

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        from lora_trainer.models.sampling import sample_images

        self.load_denoiser()
        with self.encoders_on_device():
            return sample_images(self, prompts, seed=seed, steps=steps, width=width, height=height)

"""The tab's host inside the AUTOMATIC1111 WebUI: its loaded model, GPU lock, progress bar and Lora folder.

Every WebUI module is imported inside a method, so importing this file never touches the WebUI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError

LOWVRAM_REASON = ("training needs the whole model on the GPU at once, but --lowvram moves its parts in and out "
                  "during every step; restart the WebUI without --lowvram (--medvram works)")


def unapply_user_loras() -> int:
    """Take the LoRAs of the last txt2img out of the weights (the Lora extension merges them in place).

    Clears the extension's active list, then lets it restore every layer from its own backup. Returns the
    number of layers restored.
    """
    try:
        import networks  # the WebUI's built-in Lora extension
    except ImportError:
        return 0
    import torch
    from modules import shared

    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():  # as in txt2img: the restore copies into parameters that may require grad
        for module in shared.sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)
                restored += 1
    return restored


def clear_conditioning_cache() -> None:
    """Forget the prompt conditionings txt2img caches between calls.

    The cache is keyed by prompt and steps, not by weights: conditionings computed while a text-encoder LoRA
    was being trained must not be reused by the next preview, nor by the user's txt2img after training.
    """
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if name in vars(cls):
                setattr(cls, name, [None] * len(vars(cls)[name]))  # A1111 keeps two slots, Forge three


def unapply_forge_loras(engine: Any) -> None:
    """Forge: back to the LoRA-free model objects, with the weights the last txt2img merged LoRAs into restored.

    Forge merges LoRAs into the weights when a patched UNet / text encoder is loaded and keeps the originals
    in its LoRA loader; refreshing the LoRA-free patchers puts those originals back. ``current_lora_hash`` is
    reset so that the next txt2img applies whatever LoRAs its prompt names (including the new one) afresh.
    """
    original = engine.forge_objects_original
    engine.forge_objects = original.shallow_copy()
    engine.forge_objects_after_applying_lora = original.shallow_copy()
    engine.current_lora_hash = str([])
    original.unet.refresh_loras()
    original.clip.patcher.refresh_loras()


def forge_backbone():
    """Forge's selected checkpoint (loaded if it is not yet), LoRA-free, UNet and text encoder on the GPU."""
    from backend import memory_management
    from modules import sd_models

    from lora_trainer.models.forge import ForgeBackbone

    engine, _ = sd_models.forge_model_reload()
    if engine is None:
        raise UserError("no checkpoint is loaded; pick one in the checkpoint menu at the top first")
    unapply_forge_loras(engine)
    objects = engine.forge_objects
    patchers = [objects.unet, objects.clip.patcher]
    memory_management.load_models_gpu(patchers)
    return ForgeBackbone(engine, sampler=forge_sampler, load_models=lambda: memory_management.load_models_gpu(
        patchers))


def forge_sampler(prompts: list[str], **kwargs: Any) -> list[Any] | None:
    """Forge's txt2img for previews, unless another checkpoint was picked since (it would load it): then None."""
    from modules import sd_models

    data = sd_models.model_data
    if str(data.forge_loading_parameters) != data.forge_hash:
        return None
    return webui_sampler(prompts, **kwargs)


def webui_sampler(prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
    """Previews rendered by the WebUI's own txt2img with the loaded checkpoint (and the LoRA in training)."""
    from modules import processing, shared

    job_count, job_no = shared.state.job_count, shared.state.job_no
    clear_conditioning_cache()
    images = []
    for prompt in prompts:
        shared.state.job_count = -1  # process_images counts this one image, not the training steps, as the job
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, seed=seed, steps=steps, width=width, height=height,
            cfg_scale=7.0, sampler_name="Euler a", do_not_save_samples=True, do_not_save_grid=True)
        try:
            images.extend(processing.process_images(p).images[:1])
        finally:
            p.close()
            clear_conditioning_cache()
            if hasattr(shared, "total_tqdm"):
                shared.total_tqdm.clear()  # as txt2img does: the next preview starts its own console bar
    shared.state.job_count, shared.state.job_no = job_count, job_no  # process_images resets the job counters
    return images


def trusted_origins(cmd_opts: Any, demo: Any) -> tuple[list[str], str | None]:
    """Origins the API answers besides the WebUI's own address: the ``--share`` link and what
    ``--cors-allow-origins`` (comma-separated) and ``--cors-allow-origins-regex`` allow."""
    urls = [url.strip() for url in (getattr(cmd_opts, "cors_allow_origins", None) or "").split(",") if url.strip()]
    share_url = getattr(demo, "share_url", None)
    if share_url:
        urls.append(str(share_url))
    return urls, getattr(cmd_opts, "cors_allow_origins_regex", None) or None


def default_output_dir() -> str:
    """``<WebUI data dir>/outputs/lora_train`` (beside txt2img's outputs; per ``--data-dir``)."""
    try:
        from modules.paths_internal import default_output_dir as webui_outputs
    except ImportError:
        webui_outputs = "outputs"
    return str(Path(webui_outputs) / "lora_train")


def is_forge() -> bool:
    """True inside Stable Diffusion WebUI Forge (its ``sd_models.forge_model_reload``)."""
    try:
        from modules import sd_models
    except ImportError:
        return False
    return hasattr(sd_models, "forge_model_reload")


class WebUIHost:
    """What the tab needs from the WebUI (see ``lora_trainer.ui.host.Host``)."""

    def lora_dir(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir)

    def defaults(self) -> dict[str, Any]:
        from modules import shared

        opts = shared.opts
        return {
            "output_dir": getattr(opts, "lora_train_output_dir", "") or default_output_dir(),
            "sample_every": int(getattr(opts, "lora_train_sample_every", 50) or 0),
            "preset": getattr(opts, "lora_train_default_preset", "") or "",
        }

    def get_backbone(self):
        """The loaded checkpoint as a trainer backbone, used in place; user LoRAs unapplied first."""
        from modules import shared

        from lora_trainer.models.webui import WebUIBackbone

        if is_forge():
            return forge_backbone()
        if getattr(shared.cmd_opts, "lowvram", False):
            raise UserError(LOWVRAM_REASON)
        model = shared.sd_model
        if model is None:
            raise UserError("no checkpoint is loaded; pick one in the checkpoint menu at the top first")
        unapply_user_loras()
        return WebUIBackbone(model, sampler=webui_sampler, openclip_text_encoder=True)

    def base_model_path(self) -> str | None:
        """The loaded checkpoint's file (A1111 and Forge keep it in ``sd_model.sd_checkpoint_info``)."""
        from modules import shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return getattr(info, "filename", None) or None

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Hold the WebUI's GPU queue lock: no txt2img or checkpoint switch can run during training."""
        from modules import shared
        from modules.call_queue import queue_lock

        with queue_lock:
            shared.state.begin(job="lora_train")  # also clears a stale Interrupt from an earlier txt2img
            try:
                return fn()
            finally:
                shared.state.end()

    def progress(self, snapshot: dict[str, Any]) -> None:
        """Feed the WebUI's own progress bar (step, loss, ETA)."""
        from modules import shared

        state = shared.state
        state.job_count = int(snapshot.get("total_steps") or 0)
        state.job_no = int(snapshot.get("step") or 0)
        loss = snapshot.get("loss")
        state.textinfo = f"LoRA step {state.job_no}/{state.job_count}" + (f", loss {loss:.4f}" if loss else "")
        samples = snapshot.get("sample_paths") or []
        if samples and samples[-1] != getattr(self, "_last_preview", None):
            from PIL import Image

            self._last_preview = samples[-1]
            with Image.open(samples[-1]) as image:
                state.assign_current_image(image.copy())

    def interrupted(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted)

    def refresh_loras(self) -> None:
        """List the new LoRA; Forge also forgets LoRA files it read, in case this one replaced an older file."""
        try:
            import networks
        except ImportError:
            return
        cached = getattr(networks, "load_lora_state_dict", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        networks.list_available_networks()

    def captioners(self) -> list[str]:
        return ["WebUI BLIP", "WebUI DeepBooru"]

    def checkpoint_label(self) -> str | None:
        """The checkpoint picked at the top of the page (read from the settings: nothing is loaded for it)."""
        from modules import shared

        return getattr(shared.opts, "sd_model_checkpoint", None) or None

    def bind_send_to_txt2img(self, button: Any, prompt: Any) -> bool:
        """Wire ``button`` to add the text of ``prompt`` to txt2img's prompt and open the txt2img tab.

        Uses the txt2img prompt the WebUI registers for pasting (its "Send to" buttons use the same list) and
        the WebUI's own ``switch_to_txt2img`` page function; other txt2img fields are left as they are.
        """
        try:
            from modules import infotext_utils as paste
        except ImportError:  # WebUI versions before 1.8
            from modules import generation_parameters_copypaste as paste
        fields = (paste.paste_fields.get("txt2img") or {}).get("fields") or []
        target = next((field[0] for field in fields if field[1] == "Prompt"), None)
        if target is None:
            return False
        from lora_trainer.ui.guide import add_to_prompt

        button.click(fn=add_to_prompt, inputs=[prompt, target], outputs=[target])
        button.click(fn=None, _js="switch_to_txt2img", inputs=None, outputs=None)  # Forge maps _js to js
        return True

    def caption_with_host(self, name: str, images: list[Any]) -> list[str]:
        """Caption with the WebUI's own interrogators (without their job bookkeeping, which would clobber ours)."""
        from modules import shared

        if name == "WebUI BLIP":
            shared.interrogator.load()
            try:
                return [shared.interrogator.generate_caption(image) for image in images]
            finally:
                shared.interrogator.send_blip_to_ram()
        if name == "WebUI DeepBooru":
            from modules import deepbooru

            deepbooru.model.start()
            try:
                return [deepbooru.model.tag_multi(image) for image in images]
            finally:
                deepbooru.model.stop()
        raise UserError(f"unknown WebUI captioner {name!r}; choose one of {self.captioners()}")

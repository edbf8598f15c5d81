"""WebUIHost against fake WebUI modules: lock, state/progress, interrupt, --lowvram, user LoRAs, previews, refresh."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.ui import webui_host


class State:
    def __init__(self) -> None:
        self.job_count, self.job_no, self.textinfo, self.interrupted = 0, 0, None, False
        self.images, self.begun, self.ended = [], [], 0

    def begin(self, job: str = "") -> None:
        self.begun.append(job)
        self.interrupted = False

    def end(self) -> None:
        self.ended += 1

    def assign_current_image(self, image) -> None:
        self.images.append(image)


class LoraLayer(torch.nn.Linear):
    network_current_names = ("user_lora",)


@pytest.fixture
def webui(monkeypatch, tmp_path):
    state = State()
    model = torch.nn.Sequential(LoraLayer(2, 2), torch.nn.Linear(2, 2))
    total_tqdm = types.SimpleNamespace(cleared=0)
    total_tqdm.clear = lambda: setattr(total_tqdm, "cleared", total_tqdm.cleared + 1)
    shared = types.SimpleNamespace(state=state, sd_model=model, total_tqdm=total_tqdm,
                                   cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"), lowvram=False),
                                   opts=types.SimpleNamespace(lora_train_output_dir="", lora_train_sample_every=25,
                                                              lora_train_default_preset="Low VRAM"))
    call_queue = types.SimpleNamespace(queue_lock=threading.Lock())
    seen = {}

    class Processing:
        cached_c = cached_uc = ["stale", "stale"]

    class Txt2Img(Processing):
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

        def close(self) -> None:
            pass

    def process_images(p):
        seen.setdefault("job_count", []).append(state.job_count)
        seen.setdefault("cache", []).append(Txt2Img.cached_c)
        state.job_count, state.job_no = 1, 1  # what the WebUI does to the counters
        return types.SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    processing = types.SimpleNamespace(StableDiffusionProcessing=Processing,
                                       StableDiffusionProcessingTxt2Img=Txt2Img, process_images=process_images)
    applied = []

    def network_apply_weights(module) -> None:  # the Lora extension restores its backup in place
        applied.append(module)
        module.weight.copy_(torch.zeros_like(module.weight))

    networks = types.SimpleNamespace(loaded_networks=["user_lora"], network_apply_weights=network_apply_weights,
                                     list_available_networks=lambda: seen.setdefault("refreshed", True))
    modules = types.SimpleNamespace(shared=shared, call_queue=call_queue, processing=processing)
    for name, module in (("modules", modules), ("modules.shared", shared), ("modules.call_queue", call_queue),
                         ("modules.processing", processing), ("networks", networks)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(state=state, shared=shared, lock=call_queue.queue_lock, seen=seen,
                                 networks=networks, applied=applied, model=model, Txt2Img=Txt2Img)


def test_lora_dir_and_defaults_from_the_settings(webui, tmp_path):
    host = webui_host.WebUIHost()
    assert host.lora_dir() == tmp_path / "Lora"
    assert host.defaults() == {"output_dir": str(Path("outputs") / "lora_train"), "sample_every": 25,
                               "preset": "Low VRAM"}


def test_the_default_output_folder_is_under_the_webui_data_dir(webui, monkeypatch, tmp_path):
    paths_internal = types.SimpleNamespace(default_output_dir=str(tmp_path / "data" / "outputs"))
    monkeypatch.setitem(sys.modules, "modules.paths_internal", paths_internal)
    assert webui_host.default_output_dir() == str(tmp_path / "data" / "outputs" / "lora_train")
    assert webui_host.WebUIHost().defaults()["output_dir"] == str(tmp_path / "data" / "outputs" / "lora_train")
    webui.shared.opts.lora_train_output_dir = "/elsewhere/lora"
    assert webui_host.WebUIHost().defaults()["output_dir"] == "/elsewhere/lora"


def test_trusted_origins_are_the_share_link_and_the_cors_settings():
    opts = types.SimpleNamespace(cors_allow_origins="http://a.example, http://b.example:8080,",
                                 cors_allow_origins_regex=r"https://.*\.lan")
    demo = types.SimpleNamespace(share_url="https://abc.gradio.live")
    assert webui_host.trusted_origins(opts, demo) == (
        ["http://a.example", "http://b.example:8080", "https://abc.gradio.live"], r"https://.*\.lan")
    assert webui_host.trusted_origins(types.SimpleNamespace(), None) == ([], None)


def test_the_loaded_checkpoint_file_is_the_base_model(webui):
    assert webui_host.WebUIHost().base_model_path() is None  # a model without checkpoint info
    webui.shared.sd_model.sd_checkpoint_info = types.SimpleNamespace(filename="/m/Stable-diffusion/v15.safetensors")
    assert webui_host.WebUIHost().base_model_path() == "/m/Stable-diffusion/v15.safetensors"


def test_lowvram_is_refused_with_the_reason(webui):
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(UserError, match="--lowvram"):
        webui_host.WebUIHost().get_backbone()
    webui.shared.cmd_opts.lowvram = False
    webui.shared.sd_model = None
    with pytest.raises(UserError, match="no checkpoint is loaded"):
        webui_host.WebUIHost().get_backbone()


def test_user_loras_are_taken_out_of_the_weights(webui):
    assert webui.model[0].weight.requires_grad  # as the WebUI's models load: a plain copy_ would raise
    assert webui_host.unapply_user_loras() == 1
    assert webui.networks.loaded_networks == [] and webui.applied == [webui.model[0]]
    assert not webui.model[0].weight.any()


def test_run_holds_the_gpu_lock_and_the_webui_job(webui):
    webui.state.interrupted = True  # a stale Interrupt from an earlier txt2img must not stop the new run
    host = webui_host.WebUIHost()
    assert host.run_exclusive(lambda: (webui.lock.locked(), host.interrupted())) == (True, False)
    assert not webui.lock.locked() and webui.state.begun == ["lora_train"] and webui.state.ended == 1
    webui.state.interrupted = True
    assert host.interrupted()


def test_progress_feeds_the_webui_state(webui, tmp_path):
    sample = tmp_path / "s.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(sample)
    host = webui_host.WebUIHost()
    snap = {"step": 3, "total_steps": 10, "loss": 0.25, "sample_paths": [str(sample)]}
    host.progress(snap)
    host.progress(snap)
    state = webui.state
    assert (state.job_count, state.job_no) == (10, 3) and "3/10" in state.textinfo and "0.2500" in state.textinfo
    assert len(state.images) == 1  # the same preview is shown once


def test_previews_count_as_one_image_and_restore_the_counters(webui):
    webui.state.job_count, webui.state.job_no = 100, 40
    images = webui_host.webui_sampler(["a", "b"], seed=1, steps=4, width=64, height=64)
    assert len(images) == 2 and webui.seen["job_count"] == [-1, -1]
    assert webui.seen["cache"] == [[None, None], [None, None]]  # no conditioning from before the LoRA changed
    assert (webui.state.job_count, webui.state.job_no) == (100, 40)
    assert webui.shared.total_tqdm.cleared == 2


def test_refresh_lists_new_loras(webui):
    webui_host.WebUIHost().refresh_loras()
    assert webui.seen["refreshed"]


class Patcher:
    def __init__(self) -> None:
        self.refreshed = 0

    def refresh_loras(self) -> None:
        self.refreshed += 1


class ForgeObjects(types.SimpleNamespace):
    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(**vars(self))


@pytest.fixture
def forge(webui, monkeypatch):
    """The WebUI fixture turned into Forge: sd_models.forge_model_reload, backend.memory_management, a LoRA'd engine."""
    original = ForgeObjects(unet=Patcher(), clip=types.SimpleNamespace(patcher=Patcher()), vae=None)
    with_lora = ForgeObjects(unet=Patcher(), clip=types.SimpleNamespace(patcher=Patcher()), vae=None)
    engine = types.SimpleNamespace(forge_objects=with_lora.shallow_copy(), forge_objects_original=original,
                                   forge_objects_after_applying_lora=with_lora, current_lora_hash="[['a', 1, 1]]")
    data = types.SimpleNamespace(forge_loading_parameters={"checkpoint": "a"}, forge_hash=str({"checkpoint": "a"}))
    sd_models = types.SimpleNamespace(forge_model_reload=lambda: (engine, False), model_data=data)
    loaded = []
    memory_management = types.SimpleNamespace(load_models_gpu=loaded.append)
    backend = types.SimpleNamespace(memory_management=memory_management)
    sys.modules["modules"].sd_models = sd_models
    for name, module in (("modules.sd_models", sd_models), ("backend", backend),
                         ("backend.memory_management", memory_management)):
        monkeypatch.setitem(sys.modules, name, module)
    made = {}
    monkeypatch.setattr("lora_trainer.models.forge.ForgeBackbone",
                        lambda model, **kwargs: made.update(model=model, **kwargs) or "backbone")
    return types.SimpleNamespace(engine=engine, original=original, loaded=loaded, made=made, data=data)


def test_forge_backbone_is_the_lora_free_engine_loaded_on_the_gpu(forge):
    assert webui_host.is_forge()
    assert webui_host.WebUIHost().get_backbone() == "backbone"
    engine, original = forge.engine, forge.original
    assert forge.made["model"] is engine and engine.current_lora_hash == "[]"
    assert engine.forge_objects.unet is original.unet and engine.forge_objects_after_applying_lora.unet is original.unet
    assert original.unet.refreshed == 1 and original.clip.patcher.refreshed == 1  # merged LoRA weights restored
    assert forge.loaded == [[original.unet, original.clip.patcher]]
    forge.made["load_models"]()
    assert len(forge.loaded) == 2


def test_forge_previews_decline_when_another_checkpoint_was_picked(forge, webui):
    assert len(webui_host.forge_sampler(["a"], seed=1, steps=2, width=64, height=64)) == 1
    forge.data.forge_loading_parameters = {"checkpoint": "b"}  # picked in the UI: txt2img would load it now
    assert webui_host.forge_sampler(["a"], seed=1, steps=2, width=64, height=64) is None


def test_forge_keeps_its_three_conditioning_cache_slots(webui):
    webui.Txt2Img.cached_c = ["stale", "stale", "stale"]
    webui_host.clear_conditioning_cache()
    assert webui.Txt2Img.cached_c == [None, None, None]


def test_refresh_forgets_lora_files_forge_has_read(webui):
    cleared = []
    webui.networks.load_lora_state_dict = types.SimpleNamespace(cache_clear=lambda: cleared.append(True))
    webui_host.WebUIHost().refresh_loras()
    assert cleared == [True] and webui.seen["refreshed"]


def test_a1111_is_not_taken_for_forge(webui):
    assert not webui_host.is_forge()


def test_the_checkpoint_to_train_is_the_one_picked_at_the_top(webui):
    assert webui_host.WebUIHost().checkpoint_label() is None
    webui.shared.opts.sd_model_checkpoint = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    assert webui_host.WebUIHost().checkpoint_label() == "v1-5-pruned-emaonly.safetensors [6ce0161689]"


class Clickable:
    def __init__(self) -> None:
        self.clicks: list[dict] = []

    def click(self, **kwargs) -> None:
        self.clicks.append(kwargs)


def test_send_to_txt2img_adds_the_line_to_its_prompt_and_opens_the_tab(webui, monkeypatch):
    from lora_trainer.ui.guide import add_to_prompt

    prompt, seed, button, line = Clickable(), Clickable(), Clickable(), Clickable()
    paste = types.SimpleNamespace(paste_fields={})
    monkeypatch.setitem(sys.modules, "modules.infotext_utils", paste)
    sys.modules["modules"].infotext_utils = paste
    assert not webui_host.WebUIHost().bind_send_to_txt2img(button, line)  # txt2img not built: nothing bound
    paste.paste_fields["txt2img"] = {"fields": [(seed, "Seed"), (prompt, "Prompt")]}
    assert webui_host.WebUIHost().bind_send_to_txt2img(button, line)
    fill, switch = button.clicks
    assert fill == {"fn": add_to_prompt, "inputs": [line, prompt], "outputs": [prompt]}
    assert switch == {"fn": None, "_js": "switch_to_txt2img", "inputs": None, "outputs": None}

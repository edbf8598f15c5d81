"""scripts/lora_train.py against a fake WebUI ``modules`` package: callbacks, settings, error tab, routes."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from lora_trainer.ui import webui_host as real_webui_host
from lora_trainer.ui.host import BaseHost

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lora_train.py"
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")


class OptionInfo:
    """The WebUI 1.10 signature (settings categories since 1.7)."""

    def __init__(self, default=None, label="", component=None, component_args=None, section=None, category_id=None):
        self.default, self.label, self.component, self.component_args, self.section = (
            default, label, component, component_args, section)
        self.category_id = category_id


class OldOptionInfo:
    """A WebUI before settings categories: no ``category_id`` argument."""

    def __init__(self, default=None, label="", component=None, component_args=None, section=None):
        self.default, self.section = default, section


@pytest.fixture
def webui(monkeypatch, tmp_path):
    """Fake ``modules.script_callbacks`` / ``modules.shared`` and a fake ``lora_trainer.ui.webui_host``."""
    callbacks: dict[str, list] = {}
    script_callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
        setattr(script_callbacks, name, lambda fn, _n=name: callbacks.setdefault(_n, []).append(fn))
    options: dict[str, OptionInfo] = {}
    shared = types.ModuleType("modules.shared")
    shared.OptionInfo = OptionInfo
    shared.opts = types.SimpleNamespace(add_option=lambda key, info: options.__setitem__(key, info))
    shared.cmd_opts = types.SimpleNamespace(api_auth="u:p", cors_allow_origins="http://tool.example:3000",
                                            cors_allow_origins_regex=None)
    modules = types.ModuleType("modules")
    modules.script_callbacks, modules.shared = script_callbacks, shared
    host_module = types.ModuleType("lora_trainer.ui.webui_host")
    host_module.WebUIHost = lambda: BaseHost(tmp_path / "Lora")
    host_module.trusted_origins = real_webui_host.trusted_origins
    host_module.default_output_dir = lambda: str(tmp_path / "data" / "outputs" / "lora_train")
    for name, module in (("modules", modules), ("modules.script_callbacks", script_callbacks),
                         ("modules.shared", shared), ("lora_trainer.ui.webui_host", host_module)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("lora_train_script_under_test", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return types.SimpleNamespace(script=script, callbacks=callbacks, options=options, host_module=host_module)


def test_registers_the_three_callbacks(webui):
    assert {k: len(v) for k, v in webui.callbacks.items()} == {"on_ui_tabs": 1, "on_ui_settings": 1,
                                                               "on_app_started": 1}
    assert str(SCRIPT.parents[1]) in sys.path


@needs_gradio
def test_settings_section(webui):
    webui.callbacks["on_ui_settings"][0]()
    assert set(webui.options) == {"lora_train_output_dir", "lora_train_sample_every", "lora_train_default_preset"}
    assert all(info.section == ("lora_train", "LoRA Train") for info in webui.options.values())
    assert all(info.category_id == "training" for info in webui.options.values())  # under Settings' Training
    assert "Low VRAM" in webui.options["lora_train_default_preset"].component_args["choices"]


@needs_gradio
def test_settings_section_on_a_webui_without_categories(webui, monkeypatch):
    monkeypatch.setattr(sys.modules["modules.shared"], "OptionInfo", OldOptionInfo)
    webui.callbacks["on_ui_settings"][0]()
    assert len(webui.options) == 3 and all(isinstance(info, OldOptionInfo) for info in webui.options.values())


@needs_gradio
def test_tab_and_error_tab(webui):
    import gradio as gr

    [(blocks, title, elem_id)] = webui.callbacks["on_ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("LoRA Train", "lora_train")
    assert "lora_train_start" in {getattr(b, "elem_id", None) for b in blocks.blocks.values()}

    def broken():
        raise RuntimeError("no model is loaded <yet>")

    webui.host_module.WebUIHost = broken
    webui.script._host = None
    [(blocks, _, _)] = webui.callbacks["on_ui_tabs"][0]()
    errors = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_train_startup_error"]
    assert errors and "no model is loaded &lt;yet&gt;" in errors[0].value


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("httpx") is None,
                    reason="fastapi/httpx are not installed")
def test_app_started_adds_authenticated_routes(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    webui.callbacks["on_app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/lora-train/v1/jobs/current").status_code == 401
    response = client.get("/lora-train/v1/jobs/current", auth=("u", "p"))
    assert response.status_code == 200 and response.json()["status"] in ("idle", "done", "interrupted", "failed")


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("httpx") is None,
                    reason="fastapi/httpx are not installed")
def test_routes_answer_the_share_link_and_cors_origins_only(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    webui.callbacks["on_app_started"][0](types.SimpleNamespace(share_url="https://abc.gradio.live"), app)
    client = TestClient(app)
    current = "/lora-train/v1/jobs/current"
    for origin in ("https://abc.gradio.live", "http://tool.example:3000", "http://testserver"):
        assert client.get(current, auth=("u", "p"), headers={"Origin": origin}).status_code == 200
    assert client.get(current, auth=("u", "p"), headers={"Origin": "https://evil.example"}).status_code == 403


def test_the_output_folder_setting_defaults_to_the_data_dir(webui, tmp_path):
    webui.callbacks["on_ui_settings"][0]()
    assert webui.options["lora_train_output_dir"].default == str(tmp_path / "data" / "outputs" / "lora_train")

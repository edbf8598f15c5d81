"""The tab's callbacks as plain functions, and (when gradio is installed) that build_tab assembles."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.data.captions import read_metadata_csv
from lora_trainer.ui import plot as plot_colours
from lora_trainer.ui import tab
from lora_trainer.ui.host import BaseHost
from lora_trainer.ui.job import TrainingJob


class FakeHost(BaseHost):
    def __init__(self, lora_dir: Path, backbone_factory=None, **defaults) -> None:
        super().__init__(lora_dir, defaults)
        self.backbone_factory = backbone_factory
        self.locked = 0
        self.refreshed = 0
        self.progress_calls = 0

    def get_backbone(self):
        return self.backbone_factory() if self.backbone_factory else None

    def base_model_path(self):
        return "/models/Stable-diffusion/base-v15.safetensors" if self.backbone_factory else None

    def run_exclusive(self, fn):
        self.locked += 1
        return fn()

    def progress(self, snapshot):
        self.progress_calls += 1

    def refresh_loras(self):
        self.refreshed += 1

    def captioners(self):
        return ["Fake captioner"]

    def caption_with_host(self, name, images):
        assert name == "Fake captioner"
        return [f"a {image.size[0]} px picture" for image in images]


def ui_values(**overrides) -> list:
    cfg = config_from_dict(overrides, require=False)
    return tab.config_to_values(cfg)


def test_config_keys_cover_every_setting_once():
    from lora_trainer.config import TEXT_GENERATION_KEYS

    image_settings = [k for k in TrainConfig().to_dict() if k not in TEXT_GENERATION_KEYS]
    assert sorted(tab.CONFIG_KEYS) == sorted(image_settings)
    assert len(set(tab.CONFIG_KEYS)) == len(tab.CONFIG_KEYS)


def test_ui_values_convert_back_to_the_same_config(tmp_path):
    cfg = config_from_dict({"train_data_dir": str(tmp_path), "max_steps": 300, "text_encoder_lr": 5e-5,
                            "sample_prompts": ["a, b", "c"], "target_modules": ["to_q", "to_v"],
                            "train_text_encoder": True, "scheduler": "cosine"}, require=False)
    values = tab.config_to_values(cfg)
    assert values[tab.CONFIG_KEYS.index("sample_prompts")] == "a, b\nc"
    assert tab.values_to_config(values) == cfg


def test_empty_widgets_mean_unset():
    values = ui_values()
    values[tab.CONFIG_KEYS.index("max_steps")] = 0
    values[tab.CONFIG_KEYS.index("min_snr_gamma")] = "  "
    values[tab.CONFIG_KEYS.index("resume_from")] = ""
    cfg = tab.values_to_config(values)
    assert cfg.max_steps is None and cfg.min_snr_gamma is None and cfg.resume_from is None
    values[tab.CONFIG_KEYS.index("min_snr_gamma")] = "five"
    with pytest.raises(Exception, match="min_snr_gamma"):
        tab.values_to_config(values)


def test_sample_every_without_prompts_uses_the_trigger_word():
    values = ui_values(trigger_word="zkx")
    values[tab.CONFIG_KEYS.index("sample_every")] = 50
    assert tab.values_to_config(values).sample_prompts == ["zkx"]


def test_presets_change_only_their_keys():
    values = ui_values(output_name="mine")
    out = tab.apply_preset("Low VRAM", *values)
    cfg = tab.values_to_config(out)
    assert cfg.gradient_checkpointing and cfg.batch_size == 1 and cfg.lora_rank == 8
    assert cfg.output_name == "mine"
    assert tab.apply_preset("no such preset", *values) == values
    for preset in tab.PRESETS.values():  # every preset is a valid config
        config_from_dict(preset, require=False)


@pytest.mark.parametrize("gradio3", [False, True])
def test_yaml_save_then_load_round_trip(tmp_path, gradio3):
    values = ui_values(train_data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
                       output_name="rt", lora_rank=8, max_steps=123, sample_prompts=["p1"], flip_aug=True)
    offered, status = tab.save_yaml_ui(*values)
    saved = tmp_path / "out" / "rt.train.yaml"
    assert "Saved" in status and saved.is_file() and Path(offered).read_text() == saved.read_text()
    assert yaml.safe_load(saved.read_text())["lora_rank"] == 8  # the CLI's YAML format
    upload = SimpleNamespace(name=offered) if gradio3 else offered
    loaded = tab.load_yaml_ui(upload, *ui_values())
    assert loaded[:-1] == values and "Loaded rt.train.yaml" in loaded[-1]


def test_yaml_load_errors_keep_the_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 4\n")
    values = ui_values()
    out = tab.load_yaml_ui(str(bad), *values)
    assert out[:-1] == values and "did you mean 'lora_rank'" in out[-1]
    assert tab.load_yaml_ui(None, *values)[-1] == "Choose a YAML file first."


def test_caption_rows(shapes_dataset):
    rows, status = tab.load_caption_rows(str(shapes_dataset))
    assert len(rows) == 8 and status == "8 image(s); 0 without a caption." and all(caption for _, caption in rows)
    assert rows[0] == ["000_red_circle.png", read_metadata_csv(shapes_dataset / "metadata.csv")["000_red_circle.png"]]
    assert "does not exist" in tab.load_caption_rows(str(shapes_dataset / "nope"))[1]


def test_caption_table_counts_only_usable_images(shapes_dataset):
    """Broken files are not images: they leave the count and the table and are named with the reason."""
    (shapes_dataset / "a.png").write_bytes(b"")
    (shapes_dataset / "b.jpg").write_bytes(b"not an image at all")
    first = sorted(shapes_dataset.glob("*.png"))[1].read_bytes()
    (shapes_dataset / "c.png").write_bytes(first[: len(first) // 2])
    rows, status = tab.load_caption_rows(str(shapes_dataset))
    assert len(rows) == 8 and not {"a.png", "b.jpg", "c.png"} & {name for name, _ in rows}
    assert status.startswith("8 image(s), 3 unreadable: a.png (empty file (0 bytes)), b.jpg (not an image"), status
    assert "c.png (truncated or corrupt image data)" in status and status.endswith("; 0 without a caption.")


def test_caption_with_a_host_captioner(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 40), (i * 50, 0, 0)).save(folder / f"{i}.png")
    host = FakeHost(tmp_path / "Lora")
    assert tab.captioner_choices(host)[0] == "Fake captioner"
    status, rows = tab.caption_dataset_ui(host, str(folder), "Fake captioner", "", "zkx", False)
    assert host.locked == 1 and "3" in status
    assert rows == [["0.png", "zkx, a 40 px picture"], ["1.png", "zkx, a 41 px picture"],
                    ["2.png", "zkx, a 42 px picture"]]
    status, _ = tab.caption_dataset_ui(host, str(folder), "Unknown", "", "", False)
    assert "unknown captioner" in status


class SlowCaptioningHost(FakeHost):
    """A host captioner that waits after its first batch until told to go on (while the test presses Interrupt)."""

    def __init__(self, lora_dir, webui_interrupt=False):
        super().__init__(lora_dir)
        self.batches: list[int] = []
        self.first_batch_done, self.go_on = threading.Event(), threading.Event()
        self.webui_interrupt = webui_interrupt

    def interrupted(self):
        return self.webui_interrupt and len(self.batches) >= 1

    def caption_with_host(self, name, images):
        self.batches.append(len(images))
        if len(self.batches) == 1:
            self.first_batch_done.set()
            assert self.go_on.wait(60)
        return super().caption_with_host(name, images)


def caption_images(folder, count=10):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("button", ["train", "caption"])
def test_interrupt_stops_captioning_after_the_current_batch(tmp_path, button):
    """The tab's Interrupt (either button) reaches the captioner: one batch of 4 is done, the rest are left."""
    folder = caption_images(tmp_path / "imgs")
    host = SlowCaptioningHost(tmp_path / "Lora")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(
        tab.caption_dataset_ui(host, str(folder), "Fake captioner", "", "zkx", False)))
    worker.start()
    assert host.first_batch_done.wait(60)
    note = tab.interrupt_ui(TrainingJob()) if button == "train" else tab.interrupt_caption_ui()
    assert tab.CAPTION_STOPPING in note
    host.go_on.set()
    worker.join(60)
    status, rows = result[0]
    assert host.batches == [tab.CAPTION_BATCH] == [4]
    assert status.startswith("Interrupted: captioned 4,") and "interrupted after 4 of 10 image(s)" in status
    assert [caption for _, caption in rows].count("") == 6
    assert len(read_metadata_csv(folder / "metadata.csv")) == 4  # what was done is kept


def test_the_webui_interrupt_stops_captioning(tmp_path):
    folder = caption_images(tmp_path / "imgs")
    host = SlowCaptioningHost(tmp_path / "Lora", webui_interrupt=True)
    host.go_on.set()
    status, _ = tab.caption_dataset_ui(host, str(folder), "Fake captioner", "", "", False)
    assert host.batches == [4] and status.startswith("Interrupted: captioned 4,")


def test_an_interrupt_while_nothing_runs_is_not_kept_for_the_next_captioning(tmp_path):
    folder = caption_images(tmp_path / "imgs")
    assert tab.interrupt_caption_ui() == "Captioning is not running."
    assert "Nothing is running." in tab.interrupt_ui(TrainingJob())
    status, rows = tab.caption_dataset_ui(FakeHost(tmp_path / "Lora"), str(folder), "Fake captioner", "", "", False)
    assert status.startswith("captioned 10,") and all(caption for _, caption in rows)


def test_clean_reports_and_shows_dropped_images(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    Image.new("RGB", (96, 96), (200, 30, 30)).save(folder / "big.png")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(folder / "tiny.png")
    summary, rows, thumbs, new_folder = tab.clean_dataset_ui(str(folder), "", 64, "off")
    assert new_folder == str(tmp_path / "raw_clean") and (tmp_path / "raw_clean" / "big.png").is_file()
    assert rows[0][:3] == ["tiny.png", "dropped", "too_small"] and ["big.png", "kept"] == rows[1][:2]
    assert len(thumbs) == 1 and thumbs[0][1].startswith("tiny.png")
    assert "1 file(s) dropped" in summary
    assert tab.clean_dataset_ui("", "", 64, "off")[0] == "Set the image folder first."
    again = tab.clean_dataset_ui(str(folder), "", 64, "off")
    assert again[0].startswith("Clean failed") and again[3] == str(folder)  # the folder field is left as it was
    assert "1 file(s) dropped" in tab.clean_dataset_ui(str(folder), "", 64, "off", True)[0]


def test_tables_keep_their_headers_when_empty():
    pytest.importorskip("pandas")
    assert list(tab.as_frame([], tab.CLEAN_HEADERS).columns) == tab.CLEAN_HEADERS
    frame = tab.as_frame([["a.png", "kept", "", ""]], tab.CLEAN_HEADERS)
    assert frame.values.tolist() == [["a.png", "kept", "", ""]]


def test_loss_plot_shows_validation_best_step_and_alarm():
    """Orange validation points at their steps, the best step dashed green, the alarm dashed red; after a
    resume the axis starts at the earliest evaluation."""
    losses = [1.0 - 0.01 * i for i in range(40)]
    plot = np.asarray(tab.render_loss_plot(losses, first_step=11, validation=[[5, 0.9], [20, 0.7], [40, 0.8]],
                                           best_step=20, alarm_step=40))
    plain = np.asarray(tab.render_loss_plot(losses, first_step=11))

    def columns(colour):
        hits = np.all(plot[40:-30, :, :3] == colour[:3], axis=-1) & (plot[40:-30, :, 3] == 255)
        return set(np.nonzero(hits.any(axis=0))[0])

    left, right = 64, tab.PLOT_SIZE[0] - 12
    x_of = {step: round(left + (right - left) * (step - 5) / (50 - 5)) for step in (5, 20, 40)}  # steps 5..50
    assert any(abs(c - x_of[20]) <= 1 for c in columns(plot_colours.BEST))
    assert any(abs(c - x_of[40]) <= 1 for c in columns(plot_colours.ALARM))
    assert any(abs(c - x_of[5]) <= 2 for c in columns(plot_colours.VALIDATION))
    assert not np.array_equal(plot, plain)


def test_loss_plot_and_status_html():
    plot = tab.render_loss_plot([1.0, 0.8, 0.9, 0.5, 0.4])
    assert plot.size == tab.PLOT_SIZE
    pixels = np.asarray(plot)
    assert ((pixels[..., 2] > 150) & (pixels[..., 0] < 100)).any()  # the blue moving average is drawn
    assert tab.render_loss_plot([]).size == tab.PLOT_SIZE
    assert plot.mode == "RGBA" and pixels[5, tab.PLOT_SIZE[0] // 2, 3] == 0  # transparent: fits either theme
    html = tab.status_html({"status": "failed", "error": "<bad> & wrong", "progress": 0.5}, note="n")
    assert 'data-status="failed"' in html and "&lt;bad&gt; &amp; wrong" in html
    resumable = {"output_name": "<mine>", "step": 30, "total_steps": 40, "checkpoint": "/out/step-000030"}
    html = tab.status_html({**TrainingJob().snapshot(), "resumable": resumable})
    assert "Resumable: &lt;mine&gt; stopped at step 30/40 (checkpoint /out/step-000030)" in html
    assert "Resumable" not in tab.status_html(TrainingJob().snapshot())


def test_start_poll_and_install(make_tiny_backbone, shapes_dataset, tmp_path):
    host = FakeHost(tmp_path / "Lora", make_tiny_backbone)
    job = TrainingJob()
    values = ui_values(train_data_dir=str(shapes_dataset), output_dir=str(tmp_path / "out"), output_name="tab lora",
                       trigger_word="zkx", resolution=64, batch_size=4, max_steps=2, lora_rank=4, device="cpu",
                       sample_prompts=["zkx"], sample_steps=2)
    html = tab.start_training_ui(host, job, *values)
    assert "Started." in html
    assert job.wait(120)
    status, plot, samples = tab.poll_ui(job)
    assert 'data-status="done"' in status, status
    assert plot.size == tab.PLOT_SIZE and isinstance(samples[0][0], Image.Image)
    assert [name for _, name in samples] == ["tab lora.preview.png", "step-000002-0.png"]  # newest first
    installed = tmp_path / "Lora" / "tab lora.safetensors"
    assert installed.is_file() and (tmp_path / "Lora" / "tab lora.preview.png").is_file()
    meta = json.loads((tmp_path / "Lora" / "tab lora.json").read_text())
    assert meta["sd version"] == "SD1" and meta["activation text"] == "zkx"
    assert meta["notes"] == "Trained with lora-trainer on base-v15.safetensors: 2 steps, rank 4."
    with safe_open(str(installed), "pt") as lora:  # the loaded checkpoint is named, as kohya names its base
        assert lora.metadata()["ss_sd_model_name"] == "base-v15.safetensors"
    assert host.locked == 1 and host.refreshed == 1 and host.progress_calls >= 2
    assert "Nothing is running" in tab.interrupt_ui(job)


def test_a_preview_is_installed_without_sample_prompts(make_tiny_backbone, shapes_dataset, tmp_path):
    """The Lora card always has a picture: the run's preview, rendered by the host's sampler."""
    host = FakeHost(tmp_path / "Lora", make_tiny_backbone)
    job = TrainingJob()
    values = ui_values(train_data_dir=str(shapes_dataset), output_dir=str(tmp_path / "out"), output_name="card",
                       trigger_word="zkx", resolution=64, batch_size=4, max_steps=1, lora_rank=2, device="cpu",
                       sample_steps=2)
    assert "Started." in tab.start_training_ui(host, job, *values)
    assert job.wait(120) and job.snapshot()["status"] == "done", job.snapshot()
    installed = tmp_path / "Lora" / "card.preview.png"
    assert (tmp_path / "Lora" / "card.safetensors").is_file() and installed.is_file()
    with Image.open(installed) as image, Image.open(tmp_path / "out" / "card.preview.png") as rendered:
        assert image.size == (64, 64) and np.array_equal(np.asarray(image), np.asarray(rendered))


def test_a_page_opened_mid_run_shows_the_running_settings(make_tiny_backbone, shapes_dataset, tmp_path):
    gate = threading.Event()
    host = FakeHost(tmp_path / "Lora", lambda: gate.wait(60) and make_tiny_backbone())
    job = TrainingJob()
    running = ui_values(train_data_dir=str(shapes_dataset), output_dir=str(tmp_path / "out"), output_name="mid run",
                        resolution=64, batch_size=4, max_steps=1, lora_rank=4, device="cpu", sample_steps=2)
    defaults = ui_values()
    assert tab.job_form_ui(job, *defaults) == defaults  # no job yet: the form stays as it is
    assert "Started." in tab.start_training_ui(host, job, *running)
    try:
        shown = tab.job_form_ui(job, *defaults)
        assert shown[tab.CONFIG_KEYS.index("output_name")] == "mid run"
        assert shown[tab.CONFIG_KEYS.index("lora_rank")] == running[tab.CONFIG_KEYS.index("lora_rank")]
        assert tab.values_to_config(shown).max_steps == 1
    finally:
        gate.set()
    assert job.wait(120) and job.snapshot()["status"] == "done"


@pytest.mark.parametrize("ending", ["done", "interrupted", "failed"])
def test_a_page_reloaded_after_a_run_shows_its_settings(make_tiny_backbone, shapes_dataset, tmp_path, ending):
    """Not the defaults under the status of the job that just ended, whichever way it ended."""
    def backbone():
        if ending == "failed":
            raise RuntimeError("no model")
        return make_tiny_backbone()

    host = FakeHost(tmp_path / "Lora", backbone)
    host.interrupted = lambda: ending == "interrupted"  # the WebUI's Interrupt, pressed before the first step
    job = TrainingJob()
    ran = ui_values(train_data_dir=str(shapes_dataset), output_dir=str(tmp_path / "out"), output_name="last run",
                    trigger_word="zkx", resolution=64, batch_size=4, max_steps=1, lora_rank=2, device="cpu",
                    sample_steps=2)
    assert "Started." in tab.start_training_ui(host, job, *ran)
    assert job.wait(120) and job.snapshot()["status"] == ending, job.snapshot()
    shown = tab.job_form_ui(job, *ui_values())
    cfg = tab.values_to_config(shown)
    assert (cfg.output_name, cfg.trigger_word, cfg.lora_rank, cfg.resolution) == ("last run", "zkx", 2, 64)
    assert cfg.train_data_dir == str(shapes_dataset)


def test_start_refuses_bad_settings(tmp_path):
    job = TrainingJob()
    host = FakeHost(tmp_path / "Lora")
    html = tab.start_training_ui(host, job, *ui_values(train_data_dir=str(tmp_path / "missing")))
    assert "Not started" in html and "does not exist" in html and job.snapshot()["status"] == "idle"


def test_start_refuses_a_taken_name_before_training(shapes_dataset, tmp_path):
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "mine.safetensors").write_bytes(b"old")
    job = TrainingJob()
    html = tab.start_training_ui(FakeHost(tmp_path / "Lora"), job,
                                 *ui_values(train_data_dir=str(shapes_dataset), output_name="mine"))
    assert "Not started" in html and "already exists" in html and job.snapshot()["status"] == "idle"


def test_settings_in_view_include_steps_epochs_and_overwrite():
    assert {"max_steps", "epochs", "overwrite", "lora_rank", "learning_rate", "resolution", "batch_size"} \
        <= set(tab.BASIC_KEYS)
    assert not set(tab.BASIC_KEYS) & set(tab.ADVANCED_KEYS)


def test_initial_config_uses_host_defaults_and_preset(tmp_path):
    host = FakeHost(tmp_path, output_dir=str(tmp_path / "o"), sample_every=100, preset="Low VRAM", unknown=1)
    cfg, preset = tab.initial_config(host)
    assert preset == "Low VRAM" and cfg.gradient_checkpointing and cfg.output_dir == str(tmp_path / "o")
    assert cfg.sample_every == 100 and cfg.sample_prompts == []  # Start fills the prompts from the trigger word
    assert tab.values_to_config(tab.config_to_values(cfg)).sample_prompts == ["my_lora"]


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")
def test_build_tab_returns_blocks(tmp_path):
    import gradio as gr

    blocks = tab.build_tab(FakeHost(tmp_path), TrainingJob())
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    for elem in ("lora_train_refresh", "lora_train_status", "lora_train_loss_plot", "lora_train_samples",
                 "lora_train_advanced", "lora_train_cfg_noise_offset", "lora_train_step_line",
                 "lora_train_load_pictures", "lora_train_card_caption_11", "lora_train_card_tags_0",
                 "lora_train_add_trigger", "lora_train_replace_all", "lora_train_checkpoint", "lora_train_try_prompt",
                 "lora_train_send", "lora_train_validation", "lora_train_grid", "lora_train_snapshot",
                 "lora_train_install_snapshot", "lora_train_cfg_validation_split", "lora_train_resume",
                 "lora_train_caption_interrupt", "lora_train_caption_status"):
        assert elem in ids
    assert all(elem.startswith("lora_train_") for elem in ids if elem)


def test_messages_are_escaped_html_and_nothing_while_empty():
    assert tab.message_html("") == ""
    shown = tab.message_html("Loaded <a>.yaml\nkept 3")
    assert "&lt;a&gt;.yaml<br>kept 3" in shown and 'class="lora_train_message"' in shown
    load = tab.with_message_html(lambda *values: [*values, "Loaded x.yaml"], -1)
    assert load(1, 2)[:2] == [1, 2] and "Loaded x.yaml" in load(1, 2)[-1]
    assert tab.with_message_html(lambda: "")() == ""


def test_the_form_shows_no_text_generation_settings():
    from lora_trainer.config import TEXT_GENERATION_KEYS

    assert not set(TEXT_GENERATION_KEYS) & set(tab.CONFIG_KEYS)  # the tab trains images only
    assert "lora_rank" in tab.CONFIG_KEYS and "task_type" in tab.CONFIG_KEYS  # a loaded LLM config is still refused

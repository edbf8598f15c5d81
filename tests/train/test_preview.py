"""The LoRA's preview picture: rendered at the end of every finished run unless turned off."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.train.events import EventBus, MessageEvent, SampleEvent
from lora_trainer.train.preview import PREVIEW_MAX_SIZE, preview_prompt, preview_size, write_preview
from lora_trainer.train.trainer import Trainer


def make_config(data, out, **overrides):
    settings = {"train_data_dir": str(data), "base_model": "unused-backbone-given", "output_dir": str(out),
                "output_name": "card", "trigger_word": "zkx", "resolution": 64, "batch_size": 4, "lora_rank": 2,
                "max_steps": 1, "sample_steps": 2, "device": "cpu"}
    settings.update(overrides)
    return config_from_dict(settings)


@pytest.mark.parametrize(("trigger", "prompts", "captions", "expected"), [
    ("zkx", [], ["zkx, a red circle"], "zkx"),
    ("zkx", ["watercolor of a fox"], [], "zkx, watercolor of a fox"),
    ("zkx", ["a zkx fox", "other"], [], "a zkx fox"),  # already names the trigger word
    ("zkx", ["zkxstyle fox"], [], "zkx, zkxstyle fox"),  # a longer word is not the trigger word
    ("", ["a fox"], ["a red circle"], "a fox"),
    ("", [], ["", "a red circle"], "a red circle"),
    ("  ", ["  "], [], ""),
])
def test_preview_prompt(trigger, prompts, captions, expected):
    assert preview_prompt(trigger, prompts, captions) == expected


def test_preview_size_is_capped():
    assert preview_size(512) == 512 and preview_size(1024) == PREVIEW_MAX_SIZE


def test_write_preview_renders_with_the_trigger_word(tmp_path):
    class Recorder:
        def sample(self, prompts, *, seed, steps, width, height):
            self.call = (prompts, seed, steps, width, height)
            torch.rand(3)  # the renderer may draw from the global RNG: the caller's stream is kept
            return [Image.new("RGB", (width, height), "red")]

    backbone = Recorder()
    cfg = make_config(tmp_path, tmp_path / "out", resolution=1024, sample_prompts=["ink drawing"], seed=3)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    path, image = write_preview(backbone, cfg)
    assert torch.equal(torch.rand(1), expected_next)
    assert backbone.call == (["zkx, ink drawing"], 3, 2, PREVIEW_MAX_SIZE, PREVIEW_MAX_SIZE)
    assert path == tmp_path / "out" / "card.preview.png"
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (PREVIEW_MAX_SIZE, PREVIEW_MAX_SIZE)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_finished_run_renders_a_preview_without_sample_prompts(make_tiny_backbone, shapes_dataset, tmp_path):
    events = []
    result = Trainer(make_config(shapes_dataset, tmp_path / "out"), make_tiny_backbone(),
                     events=EventBus(events.append)).run()
    assert result.lora_path is not None and result.sample_paths == []
    assert result.preview_path == tmp_path / "out" / "card.preview.png"
    with Image.open(result.preview_path) as image:
        assert image.size == (64, 64)
    assert any(isinstance(e, SampleEvent) and e.paths == [result.preview_path] for e in events)


def test_preview_off_renders_nothing(make_tiny_backbone, shapes_dataset, tmp_path):
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", preview=False), make_tiny_backbone()).run()
    assert result.lora_path is not None and result.preview_path is None
    assert not (tmp_path / "out" / "card.preview.png").exists()


def test_a_failing_preview_keeps_the_lora(make_tiny_backbone, shapes_dataset, tmp_path):
    backbone = make_tiny_backbone()

    def broken_sampler(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    backbone.sample = broken_sampler
    events = []
    result = Trainer(make_config(shapes_dataset, tmp_path / "out"), backbone, events=EventBus(events.append)).run()
    assert result.lora_path is not None and result.lora_path.is_file() and result.preview_path is None
    warnings = [e.text for e in events if isinstance(e, MessageEvent) and e.level == "warning"]
    assert any("no preview picture" in text and "sampler exploded" in text for text in warnings)

"""Held-out images and the fixed-noise validation loss."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil

import pytest
import torch

from lora_trainer.config import ConfigError, config_from_dict
from lora_trainer.data.dataset import DatasetError, scan_dataset
from lora_trainer.lora.inject import inject_lora
from lora_trainer.train.events import EventBus, StepEvent, ValidationEvent
from lora_trainer.train.loss_log import LossLog
from lora_trainer.train.trainer import Trainer
from lora_trainer.train.validation import ValidationLoss, split_validation
from tests.lora.helpers import UNET_TARGETS, randomize_lora
from tests.train.toy import ToyBackbone, planted_overfit


def _cfg(data, **overrides):
    return config_from_dict({"train_data_dir": str(data), "resolution": 64, **overrides}, require=False)


def test_split_holds_out_the_same_images_whatever_their_order(shapes_dataset, tmp_path):
    scan = scan_dataset(shapes_dataset, resolution=64)
    train, held, notes = split_validation(scan, _cfg(shapes_dataset, validation_split=0.25))
    assert len(held) == 2 and len(train.items) == 6 and not notes
    assert not {i.path for i in held} & {i.path for i in train.items}
    reversed_scan = scan_dataset(shapes_dataset, resolution=64)
    reversed_scan.items.reverse()
    again = split_validation(reversed_scan, _cfg(shapes_dataset, validation_split=0.25))[1]
    assert {i.path for i in again} == {i.path for i in held}
    assert split_validation(scan, _cfg(shapes_dataset))[1] == []  # off by default: every image trains
    with pytest.raises(DatasetError, match="leaves none to train on"):
        split_validation(dataclasses.replace(scan, items=scan.items[:1]), _cfg(shapes_dataset, validation_split=0.5))


def test_validation_folder(shapes_dataset, tmp_path):
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    for path in sorted(shapes_dataset.glob("*.png"))[:2]:
        shutil.copy(path, held_dir / path.name)
    scan = scan_dataset(shapes_dataset, resolution=64)
    train, held, notes = split_validation(scan, _cfg(shapes_dataset, validation_dir=str(held_dir),
                                                     trigger_word="zkx"))
    assert train is scan and len(held) == 2 and all(item.caption == "zkx" for item in held)
    assert "2 image(s) have no caption" in notes[0]
    with pytest.raises(DatasetError, match="is the training folder"):
        split_validation(scan, _cfg(shapes_dataset, validation_dir=str(shapes_dataset)))


def test_validation_keys_are_checked_together(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        _cfg(tmp_path, validation_split=0.1, validation_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="early_stop needs validation images"):
        _cfg(tmp_path, early_stop=True)
    with pytest.raises(ConfigError, match="validation_split: 0.9 is too large"):
        _cfg(tmp_path, validation_split=0.9)


def test_validation_loss_is_identical_when_computed_twice(tiny_backbone, shapes_dataset):
    items = scan_dataset(shapes_dataset, resolution=64).items[:3]
    roots = tiny_backbone.lora_roots(True)
    params = inject_lora(roots, rank=4, alpha=4, dropout=0.5, unet_targets=UNET_TARGETS,
                         te_targets=["q_proj", "v_proj"])
    randomize_lora(params, seed=1)
    for module in roots.values():
        module.train()  # as during training: dropout on
    measure = ValidationLoss(tiny_backbone, items, encode_text=True, chunk=2)
    first = measure(roots.values())
    torch.manual_seed(999)  # whatever the global random state, the noise is the measure's own
    assert measure(roots.values()) == first
    assert all(m.training for root in roots.values() for m in root.modules())  # train mode given back
    rebuilt = ValidationLoss(tiny_backbone, items, encode_text=True, chunk=3)  # a new run, other batching
    assert rebuilt(roots.values()) == pytest.approx(first, rel=1e-5)
    randomize_lora(params, seed=2)
    assert measure(roots.values()) != first  # it does measure the LoRA


class OffloadingToy(ToyBackbone):
    """A toy whose encoders leave the device like a GPU backbone's do: encoding after that is an error."""

    def __init__(self) -> None:
        super().__init__()
        self.offloaded = False

    def offload_encoders(self, *, vae: bool, text_encoders: bool) -> None:
        self.offloaded = vae or text_encoders

    def restore_encoders(self) -> None:
        self.offloaded = False

    @contextlib.contextmanager
    def encoders_on_device(self):
        offloaded, self.offloaded = self.offloaded, False
        try:
            yield
        finally:
            self.offloaded = offloaded

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not self.offloaded, "the VAE was used after it left the device"
        return super().encode_images(pixels)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        assert not self.offloaded, "a text encoder was used after it left the device"
        return super().encode_prompts(prompts)


def test_validation_in_the_loop_reads_the_device_only_when_it_validates(tmp_path, monkeypatch):
    """Latents and captions cached (the encoders leave the device): the held-out images are encoded only with
    the encoders brought back (encoders_on_device); with an endless read window, pending losses are read at
    each validation and not once per step."""
    logs: list[LossLog] = []

    class Batched(LossLog):
        def __init__(self, every_seconds: float) -> None:
            super().__init__(every_seconds=float("inf"))
            logs.append(self)

    monkeypatch.setattr("lora_trainer.train.trainer.LossLog", Batched)
    cfg = config_from_dict(planted_overfit(tmp_path, max_steps=20, validate_every=5, cache_latents=True))
    events: list = []
    backbone = OffloadingToy()
    result = Trainer(cfg, backbone, events=EventBus(events.append)).run()
    assert [e.step for e in events if isinstance(e, ValidationEvent)] == [5, 10, 15, 20]
    assert [e.step for e in events if isinstance(e, StepEvent)] == list(range(1, 21)) and result.lora_path
    assert logs[0].reads == 4  # one read of the pending losses per validation, none in between


def test_sdxl_validation_conditions_on_each_image_size(make_tiny_sdxl_backbone, shapes_dataset):
    """As in training, SDXL's predictions get each held-out image's original size, crop and target size."""
    from lora_trainer.models.sdxl_backbone import size_ids

    backbone = make_tiny_sdxl_backbone()
    items = scan_dataset(shapes_dataset, resolution=64).items[:2]
    seen: list = []
    predict = backbone.predict

    def spy(noisy, timesteps, conditioning):
        seen.append(conditioning["time_ids"].tolist())
        return predict(noisy, timesteps, conditioning)

    backbone.predict = spy
    measure = ValidationLoss(backbone, items, encode_text=False, chunk=4)
    assert measure() == measure()
    assert seen[0] == [size_ids(items[0])] * 4 and seen[1] == [size_ids(items[1])] * 4

"""Frozen encoders leave memory once their outputs are cached and come back from the checkpoint file on use."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.models.diffusers_backbone import DiffusersBackbone
from lora_trainer.models.loading import load_backbone
from lora_trainer.models.weight_release import is_released
from lora_trainer.models.weights import ModelLoadError
from lora_trainer.train.memory_plan import resident_bytes
from lora_trainer.train.trainer import Trainer

PROMPTS = ["a red square", "a blue circle on grey"]


def _sample(backbone) -> list:
    return backbone.sample(PROMPTS[:1], seed=3, steps=2, width=64, height=64)


def _pixels(images: list) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(image) for image in images]))


def test_the_unet_the_text_encoder_and_the_vae_decoder_wait_on_disk_until_used(tiny_checkpoint: Path) -> None:
    backbone = load_backbone(tiny_checkpoint)
    assert is_released(backbone.vae.decoder) and is_released(backbone.vae.post_quant_conv)
    assert is_released(backbone.unet) and not backbone.unet.training
    assert is_released(backbone.text_encoder) and not backbone.text_encoder.training
    assert not is_released(backbone.vae, backbone.ENCODE_PARTS)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.manual_seed(0)
    latents = backbone.encode_images(pixels)  # the encoder is there: nothing is read
    assert is_released(backbone.vae.decoder)
    first = _sample(backbone)  # the preview reads the UNet and the decoder
    assert not is_released(backbone.vae) and not is_released(backbone.unet)
    full = load_backbone(tiny_checkpoint)
    full.load_released()
    torch.manual_seed(0)
    torch.testing.assert_close(full.encode_images(pixels), latents, atol=0, rtol=0)
    assert torch.equal(_pixels(first), _pixels(_sample(full)))
    with torch.no_grad():
        assert torch.equal(backbone.encode_prompts(PROMPTS), full.encode_prompts(PROMPTS))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_text_encoders_are_read_and_the_captions_encoded_in_a_second_thread_while_the_latents_are_encoded(
        tiny_checkpoint: Path, tiny_sdxl_checkpoint: Path, family: str, monkeypatch) -> None:
    """In the block another thread reads the text encoders, then runs the job with them; after it they are in
    memory, the same as read in place, and the job's result equals encoding in place; an error while reading them
    or in the job reaches the caller."""
    path = tiny_checkpoint if family == "sd15" else tiny_sdxl_checkpoint
    backbone = load_backbone(path)
    names = [n for n in ("text_encoder", "text_encoder_2") if hasattr(backbone, n)]
    assert all(is_released(getattr(backbone, n)) for n in names)
    restore, readers, encoders = backbone.source.restore, [], []

    def recorded(name, module, device):
        readers.append((name, threading.current_thread().name))
        restore(name, module, device)

    def job():
        encoders.append(threading.current_thread().name)
        with torch.no_grad():
            return backbone.encode_prompts(PROMPTS)

    monkeypatch.setattr(backbone.source, "restore", recorded)
    with backbone.text_encoders_meanwhile(job) as embeddings:
        latents = backbone.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert sorted(readers) == [(n, "text-encoders") for n in names] and encoders == ["text-encoders"]
    assert latents.shape[1] == 4 and not any(is_released(getattr(backbone, n)) for n in names)
    full = load_backbone(path)
    full.load_released()
    with torch.no_grad():
        assert torch.equal(embeddings.result(), full.encode_prompts(PROMPTS))
        assert torch.equal(backbone.encode_prompts(PROMPTS), full.encode_prompts(PROMPTS))
    with backbone.text_encoders_meanwhile(lambda: 7) as seven:  # nothing left to read: the job alone
        pass
    assert len(readers) == len(names) and seven.result() == 7

    broken = load_backbone(path)

    def fails(name, module, device):
        raise ModelLoadError(f"{path} changed on disk (test)")

    monkeypatch.setattr(broken.source, "restore", fails)
    with pytest.raises(ModelLoadError, match="changed on disk"), broken.text_encoders_meanwhile(lambda: None):
        pass

    def job_fails():
        raise ValueError("the job failed (test)")

    with pytest.raises(ValueError, match="the job failed"), full.text_encoders_meanwhile(job_fails):
        pass


def test_a_backbone_without_its_own_way_runs_the_job_after_the_block() -> None:
    """The base class's order (the WebUI's models): the block first, then the job, in the calling thread."""
    from tests.train.toy import ToyBackbone

    order: list[str] = []
    with ToyBackbone().text_encoders_meanwhile(lambda: order.append("job") or 3) as outcome:
        order.append("block")
    assert order == ["block", "job"] and outcome.result() == 3


def test_cached_encoders_leave_memory_on_the_cpu_and_come_back_unchanged(tiny_checkpoint: Path) -> None:
    backbone = load_backbone(tiny_checkpoint)
    backbone.load_released()
    with torch.no_grad():
        before = backbone.encode_prompts(PROMPTS)
    images = _sample(backbone)
    held = resident_bytes([backbone.vae, backbone.text_encoder], torch.device("cpu"))
    buffers = sum(b.numel() * b.element_size() for m in (backbone.vae, backbone.text_encoder) for b in m.buffers())

    backbone.offload_encoders(vae=True, text_encoders=True)
    assert is_released(backbone.vae) and is_released(backbone.text_encoder)
    assert resident_bytes([backbone.vae, backbone.text_encoder], torch.device("cpu")) == buffers < held
    assert torch.equal(_pixels(_sample(backbone)), _pixels(images))  # a preview reads them back for its length
    assert is_released(backbone.vae) and is_released(backbone.text_encoder)

    backbone.restore_encoders()  # read back lazily, the next time they are used
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_prompts(PROMPTS), before, atol=0, rtol=0)
    assert not is_released(backbone.text_encoder)


def test_a_checkpoint_changed_on_disk_is_not_read_back(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    backbone = load_backbone(copy)
    backbone.offload_encoders(vae=True, text_encoders=True)
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ModelLoadError, match="changed on disk since it was loaded"):
        backbone.encode_prompts(PROMPTS)
    copy.unlink()
    with pytest.raises(ModelLoadError, match="can no longer be read"):
        backbone.encode_prompts(PROMPTS)


def test_a_pickle_checkpoint_is_not_kept_for_reading_back(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint))}, ckpt)
    (tmp_path / "tiny.yaml").write_text(tiny_checkpoint.with_suffix(".yaml").read_text())
    backbone = load_backbone(ckpt)
    assert backbone.source is None and not is_released(backbone.vae)
    backbone.offload_encoders(vae=True, text_encoders=True)
    assert not is_released(backbone.vae) and not is_released(backbone.text_encoder)


def test_a_cli_run_trains_without_the_cached_encoders_in_memory(tiny_checkpoint: Path, shapes_dataset: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    """While latents and captions are cached the UNet is not read yet; the thread that cached the captions reads
    it once the text encoder has left memory (the VAE may still be encoding); from the first step on, the run
    holds neither the VAE nor the text encoder; the LoRA is still written."""
    cfg = config_from_dict({"train_data_dir": str(shapes_dataset), "base_model": str(tiny_checkpoint),
                            "output_dir": str(tmp_path), "resolution": 64, "max_steps": 2, "lora_rank": 4,
                            "device": "cpu", "preview": False})
    trainer = Trainer(cfg)
    seen: list[bool] = []
    original = Trainer._train

    def spy(self, *args, **kwargs):
        seen.append(is_released(self.backbone.vae) and is_released(self.backbone.text_encoder))
        return original(self, *args, **kwargs)

    caching: list[bool] = []
    text_cache = Trainer._text_cache

    def spy_caching(self, *args, **kwargs):
        caching.append(is_released(self.backbone.unet))
        return text_cache(self, *args, **kwargs)

    reads: list[tuple[str, bool]] = []
    load_denoiser = DiffusersBackbone.load_denoiser

    def spy_read(self) -> None:
        if is_released(self.unet):
            reads.append((threading.current_thread().name, is_released(self.text_encoder)))
        load_denoiser(self)

    monkeypatch.setattr(Trainer, "_train", spy)
    monkeypatch.setattr(Trainer, "_text_cache", spy_caching)
    monkeypatch.setattr(DiffusersBackbone, "load_denoiser", spy_read)
    result = trainer.run()
    assert caching == [True] and seen == [True] and result.steps_done == 2
    assert reads == [("text-encoders", True)]
    assert result.lora_path is not None and result.lora_path.is_file()

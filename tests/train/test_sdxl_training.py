"""SDXL from the command line on tiny SDXL-topology models: it learns, its file fits the WebUI, size conditioning
per image, cached text-encoder outputs change nothing, kohya's v_parameterization / zero_terminal_snr."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.cli import main
from lora_trainer.config import config_from_dict
from lora_trainer.data.dataset import TrainItem, scan_dataset
from lora_trainer.train.trainer import Trainer
from tests.lora.webui_names import unmatched_keys
from tests.train.helpers import fixed_eval_loss

ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def make_config(data: Path, out: Path, **overrides):
    return config_from_dict({"train_data_dir": str(data), "base_model": "given", "output_dir": str(out),
                             "resolution": 64, "batch_size": 4, "max_steps": 3, "lora_rank": 4, "lora_alpha": 4,
                             "learning_rate": 2e-3, "seed": 5, "device": "cpu", **overrides})


def test_a_single_file_trains_from_the_cli_into_a_file_the_webui_matches(tiny_sdxl_checkpoint: Path,
                                                                         shapes_dataset: Path, tmp_path: Path):
    config = tmp_path / "sdxl.yaml"
    config.write_text(yaml.safe_dump({
        "train_data_dir": str(shapes_dataset), "base_model": str(tiny_sdxl_checkpoint), "output_name": "xl",
        "output_dir": str(tmp_path / "out"), "resolution": 64, "batch_size": 2, "max_steps": 2, "lora_rank": 4,
        "train_text_encoder": True, "target_modules": ALL_TARGETS, "sample_prompts": ["a red circle"],
        "sample_steps": 2, "device": "cpu"}))
    assert main(["train", "--config", str(config)]) == 0
    lora = tmp_path / "out" / "xl.safetensors"
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(lora))
    assert {k.split("_", 2)[1] for k in state} == {"unet", "te1", "te2"}
    assert unmatched_keys(state, load_file(str(tiny_sdxl_checkpoint))) == []  # the WebUI matches every key
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (metadata["ss_v_parameterization"], metadata["ss_zero_terminal_snr"]) == ("False", "False")
    sample = next((tmp_path / "out" / "samples").rglob("step-000002-0.png"))
    assert Image.open(sample).size == (64, 64) and (tmp_path / "out" / "xl.preview.png").is_file()


def test_loss_falls_when_fitting_a_few_images(make_tiny_sdxl_backbone, shapes_dataset: Path, tmp_path: Path):
    """SDXL has no attention at its first level: on 8x8 latents, LoRA on the attention alone learns slowly
    (1.14 -> 1.03 in 40 steps), so the resnets' convolutions are trained too (1.14 -> 0.52 in 20 steps)."""
    backbone = make_tiny_sdxl_backbone()
    before = fixed_eval_loss(backbone, shapes_dataset)
    cfg = make_config(shapes_dataset, tmp_path / "out", max_steps=20, learning_rate=1e-2, lora_rank=8,
                      lora_alpha=8, target_modules=[*ALL_TARGETS, "conv1", "conv2"])
    result = Trainer(cfg, backbone, restore_backbone=False).run()
    after = fixed_eval_loss(backbone, shapes_dataset)
    assert result.steps_done == 20 and after < 0.8 * before, (before, after)


@pytest.fixture
def mixed_sizes(tmp_path: Path) -> Path:
    """Four captioned pictures, two landscape and two portrait, of different sizes."""
    from lora_trainer.data.captions import write_metadata_csv

    folder = tmp_path / "mixed"
    folder.mkdir()
    captions = {}
    for index, (size, colour) in enumerate([((120, 60), "red"), ((96, 64), "blue"), ((60, 110), "green"),
                                             ((64, 90), "yellow")]):
        name = f"{index}.png"
        Image.new("RGB", size, {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60),
                                "yellow": (235, 210, 40)}[colour]).save(folder / name)
        captions[name] = f"a {colour} picture"
    write_metadata_csv(folder / "metadata.csv", captions)
    return folder


def test_size_ids_are_each_images_own(make_tiny_sdxl_backbone):
    backbone = make_tiny_sdxl_backbone()
    items = [TrainItem(Path("a.png"), "a", 120, 60, (64, 48)), TrainItem(Path("b.png"), "b", 60, 110, (48, 64))]
    cond = backbone.add_size_conditioning(backbone.encode_prompts(["a", "b"]), items)
    # 120x60 covers 64x48 at scale 0.8 (96x48): cropped 16 px from the left; 60x110 at 0.8 (48x88): 12 from the top
    assert cond["time_ids"].tolist() == [[60, 120, 0, 16, 48, 64], [110, 60, 12, 0, 64, 48]]
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([300, 300])
    with torch.no_grad():
        other = {**cond, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
        own, square = backbone.predict(latents, timesteps, cond), backbone.predict(latents, timesteps, other)
    assert not torch.allclose(own, square)


def test_cached_text_encoder_outputs_give_the_same_losses(make_tiny_sdxl_backbone, mixed_sizes: Path, tmp_path,
                                                          monkeypatch):
    """Frozen text encoders: encoding every caption once gives the losses of encoding them at every step."""
    seen: list[list[int]] = []
    add_sizes = type(make_tiny_sdxl_backbone()).add_size_conditioning

    def spy(self, conditioning, items):
        seen.append([item.target for item in items])
        return add_sizes(self, conditioning, items)

    monkeypatch.setattr(type(make_tiny_sdxl_backbone()), "add_size_conditioning", spy)
    settings = {"bucket": True, "batch_size": 2, "max_steps": 4, "caption_dropout": 0.3, "preview": False}
    cached = Trainer(make_config(mixed_sizes, tmp_path / "cached", **settings), make_tiny_sdxl_backbone()).run()
    targets = {item.target for item in scan_dataset(mixed_sizes, resolution=64, bucket=True).items}
    assert len(targets) > 1 and {t for batch in seen for t in batch} == targets  # every image's own bucket
    assert all(len(set(batch)) == 1 for batch in seen)

    encoded: list[int] = []
    backbone = make_tiny_sdxl_backbone()
    encode = backbone.encode_prompts
    backbone.encode_prompts = lambda prompts: encoded.append(len(prompts)) or encode(prompts)
    monkeypatch.setattr(Trainer, "_text_cache", lambda self, items: None)
    uncached = Trainer(make_config(mixed_sizes, tmp_path / "uncached", **settings), backbone).run()
    assert len(encoded) == 4 and encoded == [len(batch) for batch in seen[-4:]]  # encoded at every step
    assert uncached.losses == pytest.approx(cached.losses, rel=1e-5, abs=1e-7)


def test_v_parameterization_and_zero_terminal_snr(make_tiny_sdxl_backbone, shapes_dataset: Path, tmp_path: Path):
    backbone = make_tiny_sdxl_backbone()
    cfg = make_config(shapes_dataset, tmp_path / "out", v_parameterization=True, zero_terminal_snr=True,
                      min_snr_gamma=5.0, sample_prompts=["a red circle"], sample_steps=3, max_steps=2)
    result = Trainer(cfg, backbone).run()
    assert backbone.prediction_type == "v_prediction" and backbone.noise_scheduler.config.prediction_type == \
        "v_prediction"
    assert backbone.alphas_cumprod[-1] == 0 and backbone.alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-4)
    assert all(math.isfinite(loss) for loss in result.losses)
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_v_parameterization"], metadata["ss_zero_terminal_snr"]) == ("True", "True")
    assert metadata["modelspec.prediction_type"] == "v"
    assert Image.open(result.sample_paths[0]).size == (64, 64)


def test_min_snr_weights_at_zero_terminal_snr():
    from lora_trainer.models.backbone import zero_terminal_snr_alphas_cumprod
    from lora_trainer.models.webui import legacy_ddpm_alphas_cumprod
    from lora_trainer.train.noise import min_snr_weights

    alphas = zero_terminal_snr_alphas_cumprod(legacy_ddpm_alphas_cumprod())
    assert alphas[-1] == 0
    steps = torch.tensor([0, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        weights = min_snr_weights(steps, alphas, 5.0, prediction)
        assert torch.isfinite(weights).all(), prediction
    assert min_snr_weights(steps, alphas, 5.0, "epsilon")[-1] == 1.0  # min(snr, gamma) / snr -> 1 as snr -> 0


def test_encoders_leave_the_device_while_their_outputs_are_cached(make_tiny_sdxl_backbone, shapes_dataset, tmp_path,
                                                                   monkeypatch):
    backbone = make_tiny_sdxl_backbone()
    moves: list[tuple[str, str]] = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(backbone, name)
        monkeypatch.setattr(module, "to", lambda *a, _n=name, _m=module, **k: moves.append((_n, str(a[0]))) or _m)
    backbone.device = torch.device("cuda")  # only the moves are recorded; nothing runs there
    backbone.offload_encoders(vae=True, text_encoders=True)
    assert moves == [("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")]
    moves.clear()
    with backbone.encoders_on_device():
        assert moves == [("vae", "cuda"), ("text_encoder", "cuda"), ("text_encoder_2", "cuda")]
    backbone.restore_encoders()
    assert moves[3:] == [("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu"), ("vae", "cuda"),
                         ("text_encoder", "cuda"), ("text_encoder_2", "cuda")]

    calls: list = []
    trained = make_tiny_sdxl_backbone()
    monkeypatch.setattr(trained, "offload_encoders", lambda **kw: calls.append(kw))
    monkeypatch.setattr(trained, "restore_encoders", lambda: calls.append("restore"))
    Trainer(make_config(shapes_dataset, tmp_path / "out", max_steps=1), trained).run()
    # on the CPU the text encoders leave first, in the thread that cached their outputs, before the UNet is read
    assert calls == [{"vae": False, "text_encoders": True}, {"vae": True, "text_encoders": True}, "restore"]

"""ss_* and modelspec.* metadata: every value a string, with the values the WebUI and kohya tools read."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.lora.metadata import modelspec_architecture, tag_frequency, training_metadata


def make(model_version: str = "sd_v1", prediction_type: str = "epsilon", **overrides) -> dict[str, str]:
    settings = {"train_data_dir": "/data/shapes", "base_model": "/models/v1-5-pruned.safetensors",
                "output_name": "shapes_v1", "lora_rank": 8, "lora_alpha": 4, "learning_rate": 2e-4,
                "resolution": 512, "epochs": 3, "repeats": 2, "batch_size": 2, "seed": 7,
                "trigger_word": "shp", "train_text_encoder": True, "text_encoder_lr": 5e-5, "min_snr_gamma": 5.0}
    settings.update(overrides)
    cfg = config_from_dict(settings)
    return training_metadata(cfg=cfg, model_version=model_version, prediction_type=prediction_type,
                             captions=["shp, red circle, white background", "shp, blue square", "shp,, red circle"],
                             steps=6, total_steps=9, started_at=1_700_000_000.5, num_images=3,
                             buckets=[(512, 512), (448, 576)])


def test_sd1_metadata_values():
    meta = make()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
        "ss_network_dropout": "0.0", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_output_name": "shapes_v1", "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_resolution": "(512, 512)",
        "ss_num_train_images": "6", "ss_steps": "6", "ss_max_train_steps": "9", "ss_epoch": "2",
        "ss_learning_rate": "0.0002", "ss_unet_lr": "0.0002", "ss_text_encoder_lr": "5e-05",
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)", "ss_lr_scheduler": "constant", "ss_seed": "7",
        "ss_min_snr_gamma": "5.0", "ss_noise_offset": "0.0", "ss_training_started_at": "1700000000.5",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "shapes_v1", "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon", "modelspec.trigger_phrase": "shp",
    }
    assert {k: meta[k] for k in expected} == expected
    assert json.loads(meta["ss_tag_frequency"]) == {"shapes": {"shp": 3, "red circle": 2, "white background": 1,
                                                               "blue square": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["1"]["resolution"] == [448, 576]
    assert "shp" in meta["ss_training_comment"]
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    datetime.fromisoformat(meta["modelspec.date"])


@pytest.mark.parametrize(("version", "prediction", "base", "v2", "arch", "impl", "pred"), [
    ("sd_v2", "v_prediction", "sd_v2", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "v"),
    ("sd_v2", "epsilon", "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "epsilon"),
])
def test_model_versions(version, prediction, base, v2, arch, impl, pred):
    meta = make(version, prediction)
    assert meta["ss_base_model_version"] == base and meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch == modelspec_architecture(version, prediction)
    assert meta["modelspec.implementation"] == impl and meta["modelspec.prediction_type"] == pred


def test_unet_only_and_no_trigger():
    meta = make(train_text_encoder=False, trigger_word="", min_snr_gamma=None)
    assert meta["ss_text_encoder_lr"] == "0.0" and meta["ss_network_train_unet_only"] == "True"
    assert "modelspec.trigger_phrase" not in meta and meta["ss_min_snr_gamma"] == "None"


def test_unknown_model_version_is_refused():
    with pytest.raises(ValueError, match="'sd3'"):
        make("sd3")


def test_tag_frequency_strips_and_counts():
    assert tag_frequency([" a ,b", "b, ,c", ""]) == {"b": 2, "a": 1, "c": 1}

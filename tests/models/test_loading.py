"""load_backbone: single files (.safetensors / .ckpt, with and without .yaml), diffusers folders, clear errors."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lora_trainer.models.loading import ModelLoadError, load_backbone
from tests.models.helpers import copy_checkpoint

PROMPT = "a red circle on a blue background"


def _final_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    modules = dict(text_encoder.named_modules())
    return modules.get("text_model.final_layer_norm", modules.get("final_layer_norm"))


@torch.no_grad()
def _assert_same_model(backbone, components: dict, *, atol: float = 1e-5, text: bool = True) -> None:
    backbone.load_released()  # the UNet and the VAE decoder are read on first use
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    timesteps = torch.tensor([500])
    got = backbone.unet(latents, timesteps, encoder_hidden_states=context).sample
    want = components["unet"](latents, timesteps, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    got_mean = backbone.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(got_mean, components["vae"].encode(pixels).latent_dist.mean, atol=atol, rtol=0)
    torch.testing.assert_close(backbone.vae.decode(got_mean).sample, components["vae"].decode(got_mean).sample,
                               atol=atol, rtol=0)
    if text:
        ids = backbone.tokenize([PROMPT])
        want_ids = components["tokenizer"]([PROMPT], padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(backbone.encode_prompts([PROMPT]), components["text_encoder"](ids)[0],
                                   atol=atol, rtol=0)


def test_single_file_round_trip_reproduces_the_tiny_model(tiny_checkpoint: Path, tiny_components: dict) -> None:
    backbone = load_backbone(tiny_checkpoint)
    assert (backbone.model_version, backbone.prediction_type, backbone.clip_skip) == ("sd_v1", "epsilon", 1)
    assert backbone.noise_scheduler.config.beta_start == pytest.approx(0.00085)
    assert backbone.noise_scheduler.config.beta_end == pytest.approx(0.012)
    assert backbone.device == torch.device("cpu") and backbone.dtype == torch.float32
    assert not backbone.unet.training and not backbone.text_encoder.training
    _assert_same_model(backbone, tiny_components)


def test_tiny_text_encoder_output_mean_is_not_zero(tiny_backbone) -> None:
    # the WebUI's emphasis normalisation divides by the mean of the encoder's output
    with torch.no_grad():
        assert abs(float(tiny_backbone.encode_prompts([PROMPT]).mean())) > 0.05
        weight = tiny_backbone.text_encoder.get_input_embeddings().weight
        assert float(weight.mean()) != 0.0


def test_tiny_checkpoint_has_the_ldm_layout_and_a_loadable_clip_folder(tiny_checkpoint: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    state = load_file(str(tiny_checkpoint))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in state
    config = yaml.safe_load(tiny_checkpoint.with_suffix(".yaml").read_text())
    clip_dir = Path(config["model"]["params"]["cond_stage_config"]["params"]["version"])
    assert clip_dir.is_absolute() and clip_dir.name == "tiny-sd15-clip"
    assert config["model"]["params"]["cond_stage_config"]["target"].endswith(".FrozenCLIPEmbedder")
    encoder = CLIPTextModel.from_pretrained(str(clip_dir), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    assert tokenizer("a cat").input_ids[0] == 49406
    prefix = "cond_stage_model.transformer."
    for key, value in encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        assert torch.equal(value, state[prefix + key].to(value.dtype)), key


def test_without_yaml_the_sizes_come_from_the_weights(tiny_checkpoint: Path, tiny_components: dict,
                                                     tmp_path: Path) -> None:
    bare = copy_checkpoint(tiny_checkpoint, tmp_path, "bare", with_yaml=False)
    backbone = load_backbone(bare)
    assert (backbone.model_version, backbone.prediction_type) == ("sd_v1", "epsilon")
    _assert_same_model(backbone, tiny_components)


def test_ckpt_with_plain_weights_loads(tiny_checkpoint: Path, tiny_components: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint)), "global_step": 7, "epoch": 1}, ckpt)
    shutil.copyfile(tiny_checkpoint.with_suffix(".yaml"), ckpt.with_suffix(".yaml"))
    _assert_same_model(load_backbone(ckpt), tiny_components)


class _Payload:
    """Unpickling this would create a file: stands in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": _Payload(marker)}, bad)
    with pytest.raises(ModelLoadError, match="refused to unpickle") as info:
        load_backbone(bad)
    assert "evil.ckpt" in str(info.value) and ".safetensors" in str(info.value)
    assert not marker.exists()


def test_yaml_parameterization_v_and_schedule(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path, "vpred")
    config = yaml.safe_load(model.with_suffix(".yaml").read_text())
    config["model"]["params"].update(parameterization="v", linear_start=0.001, linear_end=0.02)
    model.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    backbone = load_backbone(model)
    assert backbone.prediction_type == "v_prediction"
    assert backbone.noise_scheduler.config.prediction_type == "v_prediction"
    assert backbone.noise_scheduler.config.beta_start == pytest.approx(0.001)
    assert backbone.noise_scheduler.config.beta_end == pytest.approx(0.02)


def test_a_yaml_that_does_not_fit_the_weights_is_reported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path, "wrong")
    config = yaml.safe_load(model.with_suffix(".yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["num_res_blocks"] = 1
    model.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelLoadError, match=r"wrong\.safetensors: the UNet weights do not (match|fit)"):
        load_backbone(model)


# ---- SD2 (OpenCLIP text tower) -------------------------------------------------------------------------------
@pytest.fixture
def tiny_sd2(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A tiny SD2-layout checkpoint (linear attention projections, 3-block OpenCLIP text tower) + its parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.ldm_checkpoint import text_encoder_to_open_clip, unet_to_ldm, vae_to_ldm
    from lora_trainer.models.tiny import tiny_clip_config, tiny_unet_config, tiny_vae_config

    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**tiny_unet_config(), "use_linear_projection": True}).eval()
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**tiny_clip_config(), "num_hidden_layers": 3,
                                                   "hidden_act": "gelu"})).eval()
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae),
             **text_encoder_to_open_clip(text_encoder, "cond_stage_model.model."),
             "cond_stage_model.model.text_projection": torch.randn(32, 32)}  # in SD2 files; unused by SD2
    model = tmp_path / "sd2" / "tiny-sd2.safetensors"
    model.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(model))
    config = yaml.safe_load(tiny_checkpoint.with_suffix(".yaml").read_text())
    params = config["model"]["params"]
    params["parameterization"] = "v"
    params["unet_config"]["params"]["use_linear_in_transformer"] = True
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                   "params": {"freeze": True, "layer": "penultimate"}}
    model.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    return model, {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def test_sd2_checkpoint_uses_the_penultimate_open_clip_layer(tiny_sd2: tuple[Path, dict]) -> None:
    model, parts = tiny_sd2
    backbone = load_backbone(model)
    assert (backbone.model_version, backbone.prediction_type) == ("sd_v2", "v_prediction")
    assert backbone.text_encoder.config.num_hidden_layers == 2
    assert backbone.tokenize(["a cat"])[0, -1].item() == 0  # OpenCLIP pads with "!" (token 0)
    _assert_same_model(backbone, parts, text=False)
    ids = backbone.tokenize([PROMPT])
    with torch.no_grad():
        hidden = parts["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        want = _final_norm(parts["text_encoder"])(hidden)
        torch.testing.assert_close(backbone.encode_prompts([PROMPT]), want, atol=1e-5, rtol=0)


def test_sd2_without_yaml_assumes_epsilon_and_says_so(tiny_sd2: tuple[Path, dict], caplog) -> None:
    model, _ = tiny_sd2
    model.with_suffix(".yaml").unlink()
    with caplog.at_level(logging.WARNING, logger="lora_trainer.models.loading"):
        backbone = load_backbone(model)
    assert (backbone.model_version, backbone.prediction_type) == ("sd_v2", "epsilon")
    assert "assuming epsilon" in caplog.text and "parameterization" in caplog.text


# ---- diffusers folders ----------------------------------------------------------------------------------------
def test_diffusers_folder_loads_locally(tiny_components: dict, tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    folder = tmp_path / "tiny-diffusers"
    for name in ("unet", "vae", "text_encoder"):
        tiny_components[name].save_pretrained(str(folder / name), safe_serialization=True)
    tiny_components["tokenizer"].save_pretrained(str(folder / "tokenizer"))
    DDPMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear",
                  prediction_type="v_prediction").save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    backbone = load_backbone(folder)
    assert (backbone.model_version, backbone.prediction_type) == ("sd_v1", "v_prediction")
    assert backbone.noise_scheduler.config.beta_start == pytest.approx(0.001)
    _assert_same_model(backbone, tiny_components)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_diffusers_folder_with_only_pickled_weights_is_refused(tiny_components: dict, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        (folder / name).mkdir(parents=True)
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match=r"unet has no \.safetensors weights.*never unpickled"):
        load_backbone(folder)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"nope\.safetensors does not exist.*\.safetensors, \.ckpt"):
        load_backbone(tmp_path / "nope.safetensors")


def test_unknown_extension_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"model\.bin: unknown file type '\.bin'"):
        load_backbone(tmp_path / "model.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors is not a readable \.safetensors file"):
        load_backbone(tmp_path / "broken.safetensors")
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        load_backbone(tmp_path)


def test_a_partial_sdxl_file_is_reported(tmp_path: Path) -> None:
    model = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
                   torch.zeros(77, 8),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(model))
    with pytest.raises(ModelLoadError, match=r"sdxl\.safetensors looks like an SDXL checkpoint but has no VAE"):
        load_backbone(model)


def test_unrecognised_keys_are_reported(tmp_path: Path) -> None:
    model = tmp_path / "garbage.safetensors"
    save_file({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)}, str(model))
    with pytest.raises(ModelLoadError) as info:
        load_backbone(model)
    message = str(info.value)
    assert "garbage.safetensors is not a Stable Diffusion 1.x/2.x/SDXL checkpoint" in message
    assert "model.diffusion_model." in message and "bar.bias" in message


def test_yaml_for_another_model_family_is_reported(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path, "mixed")
    config = copy.deepcopy(yaml.safe_load(model.with_suffix(".yaml").read_text()))
    config["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    model.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelLoadError, match=r"mixed\.yaml describes an sd_v2 model but mixed\.safetensors holds"):
        load_backbone(model)


def test_tokenizer_unavailable_propagates(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from lora_trainer.models import tokenizer

    def no_vocab():
        raise tokenizer.TokenizerUnavailable("no CLIP tokenizer is available offline (test)")

    monkeypatch.setattr(tokenizer, "default_cache_dir", lambda: tmp_path / "empty-cache")
    monkeypatch.setattr(tokenizer, "find_open_clip_vocab", no_vocab)
    monkeypatch.setattr(tokenizer, "find_hub_clip_tokenizer", lambda: None)
    bare = copy_checkpoint(tiny_checkpoint, tmp_path / "bare", "bare", with_yaml=False)
    with pytest.raises(tokenizer.TokenizerUnavailable, match="no CLIP tokenizer is available offline"):
        load_backbone(bare)


def test_sd2_768_v_without_yaml_trains_v_with_v_parameterization(tiny_sd2: tuple[Path, dict], shapes_dataset: Path,
                                                                  tmp_path: Path) -> None:
    """kohya's v_parameterization: a 768-v model whose file says nothing about it trains v-prediction."""
    from safetensors import safe_open

    from lora_trainer.config import config_from_dict
    from lora_trainer.train.trainer import Trainer

    model, _ = tiny_sd2
    model.with_suffix(".yaml").unlink()
    cfg = config_from_dict({"train_data_dir": str(shapes_dataset), "base_model": str(model), "resolution": 64,
                            "output_dir": str(tmp_path / "out"), "max_steps": 1, "lora_rank": 2, "device": "cpu",
                            "v_parameterization": True, "preview": False})
    trainer = Trainer(cfg)
    result = trainer.run()
    assert trainer.backbone.model_version == "sd_v2" and trainer.backbone.prediction_type == "v_prediction"
    assert trainer.backbone.noise_scheduler.config.prediction_type == "v_prediction"
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (metadata["ss_v2"], metadata["ss_v_parameterization"]) == ("True", "True")


def test_a_tokenizer_is_built_once_per_vocabulary_and_padding(tmp_path: Path) -> None:
    """Checkpoints whose tokenizer files hold the same bytes share one tokenizer (a CLIP vocabulary is ~20 MB of
    Python objects on transformers 4.30); another padding or other files give another one."""
    from lora_trainer.models.loading import clip_tokenizer
    from lora_trainer.models.tokenizer import write_demo_tokenizer_files

    first, second, changed = (write_demo_tokenizer_files(tmp_path / name) for name in ("a", "b", "c"))
    (first / "config.json").write_text('{"hidden_size": 32}')  # a model's config beside the tokenizer: not a key
    (second / "config.json").write_text('{"hidden_size": 64}')
    settings = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 64}))
    assert clip_tokenizer(first) is clip_tokenizer(second)
    padded = clip_tokenizer(first, pad_with_zero=True)
    assert padded is not clip_tokenizer(first) and padded is clip_tokenizer(second, pad_with_zero=True)
    assert (padded.pad_token, clip_tokenizer(first).pad_token) == ("!", "<|endoftext|>")
    assert clip_tokenizer(changed) is not clip_tokenizer(first)
    assert clip_tokenizer(changed).model_max_length == 64

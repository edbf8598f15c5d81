"""SDXL offline: single files in the sgm layout (with an sgm .yaml, without, with a foreign one), diffusers folders."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lora_trainer.models.loading import ModelLoadError, load_backbone
from lora_trainer.models.sdxl_backbone import SDXLBackbone
from tests.models.helpers import copy_checkpoint

PROMPTS = ["a red circle on a blue background", ""]


@torch.no_grad()
def assert_same_sdxl(backbone, reference, *, atol: float = 1e-5) -> None:
    """Same conditioning, denoiser output (with size ids), VAE and tokenization as ``reference``."""
    assert isinstance(backbone, SDXLBackbone) and backbone.model_version == "sdxl"
    backbone.load_released()  # the UNet and the VAE decoder are read on first use
    for tokenizer in ("tokenizer", "tokenizer_2"):
        ids = SDXLBackbone._ids(getattr(backbone, tokenizer), PROMPTS)
        assert torch.equal(ids, SDXLBackbone._ids(getattr(reference, tokenizer), PROMPTS)), tokenizer
    cond, want = backbone.encode_prompts(PROMPTS), reference.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond, want, atol=atol, rtol=0)
    generator = torch.Generator().manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([20, 700])
    torch.testing.assert_close(backbone.predict(latents, timesteps, cond), reference.predict(latents, timesteps, want),
                               atol=atol, rtol=0)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    torch.testing.assert_close(backbone.vae.encode(pixels).latent_dist.mean,
                               reference.vae.encode(pixels).latent_dist.mean, atol=atol, rtol=0)
    assert backbone.vae.config.scaling_factor == pytest.approx(0.13025)


def test_single_file_with_its_sgm_yaml(tiny_sdxl_checkpoint: Path, make_tiny_sdxl_backbone) -> None:
    backbone = load_backbone(tiny_sdxl_checkpoint)
    assert (backbone.prediction_type, backbone.pooled_dim, backbone.context_dim) == ("epsilon", 32, 64)
    assert type(backbone.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert backbone.tokenizer_2.pad_token_id == 0 and backbone.tokenizer.pad_token_id == 49407
    assert backbone.unet.config.addition_time_embed_dim == 8
    assert list(backbone.unet.config.transformer_layers_per_block)[1:] == [1, 2]
    assert_same_sdxl(backbone, make_tiny_sdxl_backbone())


def test_the_checkpoint_has_the_sgm_layout(tiny_sdxl_checkpoint: Path) -> None:
    state = load_file(str(tiny_sdxl_checkpoint))
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (32, 32)
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in state
    config = yaml.safe_load(tiny_sdxl_checkpoint.with_suffix(".yaml").read_text())
    assert config["model"]["target"] == "sgm.models.diffusion.DiffusionEngine"
    assert config["model"]["params"]["network_config"]["params"]["adm_in_channels"] == 32 + 6 * 8


def open_clip_text_tower(width: int, layers: int, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The weights OpenCLIP builds for a text tower (SDXL's bigG: width 1280, 32 layers, embed_dim 1280) and their
    shapes; its MLP is always 4x the width (``open_clip`` 2.20, the WebUI's, has no setting for it)."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (49408, width), "positional_embedding": (77, width), "ln_final.weight": (width,),
        "ln_final.bias": (width,), "text_projection": (width, embed_dim), "logit_scale": ()}
    for index in range(layers):
        block = f"transformer.resblocks.{index}."
        for name, shape in {"ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,),
                            "ln_2.bias": (width,), "attn.in_proj_weight": (3 * width, width),
                            "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
                            "attn.out_proj.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
                            "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width),
                            "mlp.c_proj.bias": (width,)}.items():
            shapes[block + name] = shape
    return shapes


def test_the_second_text_encoder_has_open_clips_text_tower_layout(tiny_sdxl_checkpoint: Path) -> None:
    """What the WebUI builds from the yaml (an OpenCLIP text tower) takes every weight of the file, shapes included."""
    prefix = "conditioner.embedders.1.model."
    state = load_file(str(tiny_sdxl_checkpoint))
    tower = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    assert tower == open_clip_text_tower(width=32, layers=3, embed_dim=32)


def test_the_yaml_takes_the_first_text_encoders_penultimate_layer(tiny_sdxl_checkpoint: Path) -> None:
    """sgm's FrozenCLIPEmbedder (and the WebUI's SDXL hijack) use ``hidden_states[layer_idx]``: 11 of SDXL's 12
    blocks, 1 of the tiny model's 2 (the penultimate, as our SDXLBackbone's ``hidden_states[-2]``)."""
    from lora_trainer.models.ldm_config import sdxl_config
    from lora_trainer.models.text_encoders import count_blocks

    state = load_file(str(tiny_sdxl_checkpoint))
    blocks = count_blocks(state, "conditioner.embedders.0.transformer.text_model.encoder.layers.")
    config = yaml.safe_load(tiny_sdxl_checkpoint.with_suffix(".yaml").read_text())
    clip = config["model"]["params"]["conditioner_config"]["params"]["emb_models"][0]["params"]
    assert (blocks, clip["layer_idx"]) == (2, 1)
    real = sdxl_config({}, {})["model"]["params"]["conditioner_config"]["params"]["emb_models"][0]["params"]
    assert real == {"layer": "hidden", "layer_idx": 11}  # Stability's sd_xl_base.yaml


def test_without_yaml_every_size_comes_from_the_weights(tiny_sdxl_checkpoint: Path, make_tiny_sdxl_backbone,
                                                        tmp_path: Path) -> None:
    bare = copy_checkpoint(tiny_sdxl_checkpoint, tmp_path, "bare", with_yaml=False)
    assert_same_sdxl(load_backbone(bare), make_tiny_sdxl_backbone())


def test_a_yaml_of_another_architecture_is_set_aside(tiny_sdxl_checkpoint: Path, tiny_checkpoint: Path,
                                                    make_tiny_sdxl_backbone, tmp_path: Path, caplog) -> None:
    model = copy_checkpoint(tiny_sdxl_checkpoint, tmp_path, "foreign", with_yaml=False)
    shutil.copyfile(tiny_checkpoint.with_suffix(".yaml"), model.with_suffix(".yaml"))  # an SD1 LatentDiffusion yaml
    with caplog.at_level(logging.WARNING, logger="lora_trainer.models.sdxl_loading"):
        backbone = load_backbone(model)
    assert "describes no SDXL" in caplog.text and "read from the weights" in caplog.text
    assert_same_sdxl(backbone, make_tiny_sdxl_backbone())


def test_v_prediction_from_the_yaml_or_the_markers(tiny_sdxl_checkpoint: Path, tmp_path: Path) -> None:
    vscaled = copy_checkpoint(tiny_sdxl_checkpoint, tmp_path / "a", "vscaling", with_yaml=True)
    config = yaml.safe_load(vscaled.with_suffix(".yaml").read_text())
    denoiser = config["model"]["params"]["denoiser_config"]["params"]
    denoiser["scaling_config"]["target"] = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
    vscaled.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    backbone = load_backbone(vscaled)
    assert backbone.prediction_type == "v_prediction" and backbone.alphas_cumprod[-1] > 0

    marked = tmp_path / "b" / "marked.safetensors"
    marked.parent.mkdir()
    save_file({**load_file(str(tiny_sdxl_checkpoint)), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(marked))
    backbone = load_backbone(marked)
    assert backbone.prediction_type == "v_prediction"
    assert backbone.alphas_cumprod[-1] == 0  # zero terminal SNR: the last step is pure noise


def test_float16_file_to_bfloat16_and_float16_keeps_the_vae_in_float32(tiny_sdxl_checkpoint: Path) -> None:
    backbone = load_backbone(tiny_sdxl_checkpoint, dtype=torch.float16)
    assert backbone.unet.dtype == torch.float16 and backbone.text_encoder_2.dtype == torch.float16
    assert backbone.vae.dtype == torch.float32  # SDXL's VAE overflows in float16
    assert load_backbone(tiny_sdxl_checkpoint, dtype=torch.bfloat16).vae.dtype == torch.bfloat16


def test_diffusers_folder(_tiny_sdxl_components: dict, make_tiny_sdxl_backbone, tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    folder = tmp_path / "tiny-sdxl-diffusers"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        _tiny_sdxl_components[name].save_pretrained(str(folder / name), **(
            {} if name.startswith("tokenizer") else {"safe_serialization": True}))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction").save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    backbone = load_backbone(folder)
    assert backbone.prediction_type == "v_prediction"
    assert_same_sdxl(backbone, make_tiny_sdxl_backbone(prediction_type="v_prediction"))
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="lacks the subfolder.*text_encoder_2"):
        load_backbone(folder)


def test_our_open_clip_conversion_matches_diffusers(tiny_sdxl_checkpoint: Path) -> None:
    """The fused q/k/v split into views (no copy) gives what diffusers' own (copying) conversion gives."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from lora_trainer.models.text_encoders import open_clip_to_transformers

    prefix = "conditioner.embedders.1.model."
    state = load_file(str(tiny_sdxl_checkpoint))
    backbone = load_backbone(tiny_sdxl_checkpoint)
    ours = open_clip_to_transformers(state, prefix)
    theirs = convert_open_clip_checkpoint(backbone.text_encoder_2, state, prefix=prefix)
    theirs = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
              for k, v in theirs.items() if not k.endswith("position_ids")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key

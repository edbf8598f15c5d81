"""Training the WebUI's own model class in place: Stability's ``ldm`` LatentDiffusion on a tiny config.

The ``ldm`` package comes from ``stable-diffusion-sdkit`` (installed with ``--no-deps``). Its training-only
imports (pytorch_lightning, torchvision's image grid) are stubbed when absent: the WebUI has the real ones,
and nothing under test uses them.

SDXL: ``sgm`` (Stability-AI/generative-models, the commit the WebUI pins) is not on the package index; the SDXL
tests run when it is importable or ``LORA_TRAINER_SGM_PATH`` names a checkout (the WebUI keeps one in
``repositories/generative-models``), and skip otherwise. Its imports of kornia, open_clip and torchvision are
stubbed when those are absent (only image embedders and the LPIPS loss use them). The test that builds the sgm
model from a tiny SDXL file's own .yaml needs the real open_clip (and torchvision): it runs in the WebUI's venv
(``LORA_TRAINER_SGM_PATH=<webui>/repositories/generative-models``, pytest on its PYTHONPATH) and skips elsewhere.
"""

from __future__ import annotations

import copy
import importlib.machinery
import json
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.lora.inject import inject_lora, load_lora_state_dict, remove_lora
from lora_trainer.lora.kohya import from_kohya_state_dict, to_kohya_state_dict
from lora_trainer.models.state import model_weights_hash, restore_model_state, snapshot_model_state
from lora_trainer.models.webui import (
    UnsupportedModel,
    WebUIBackbone,
    legacy_ddpm_alphas_cumprod,
    model_version,
    pack_sdxl_conditioning,
    unpack_sdxl_conditioning,
)
from lora_trainer.train.trainer import TE_TARGETS, Trainer


def _stub_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _import_sgm(monkeypatch: pytest.MonkeyPatch):
    """``sgm.models.diffusion`` with its unused heavy imports stubbed, or skip."""
    if os.environ.get("LORA_TRAINER_SGM_PATH"):
        monkeypatch.syspath_prepend(os.environ["LORA_TRAINER_SGM_PATH"])
    if importlib.util.find_spec("sgm") is None:
        pytest.skip("needs sgm (set LORA_TRAINER_SGM_PATH to a Stability-AI/generative-models checkout)")
    try:
        import torchvision.models  # noqa: F401
    except (ImportError, RuntimeError):
        tv = _stub_module(monkeypatch, "torchvision")
        for sub in ("models", "utils", "transforms"):
            setattr(tv, sub, _stub_module(monkeypatch, f"torchvision.{sub}", make_grid=lambda *a, **k: None))
    for name in ("kornia", "open_clip"):
        try:
            __import__(name)
        except (ImportError, RuntimeError):
            _stub_module(monkeypatch, name)
    import sgm.models.diffusion

    return sgm.models.diffusion


def _target(target: str, **params) -> dict:
    return {"target": target, "params": params}


@pytest.fixture
def sdxl_model(monkeypatch, ldm_stubs, tiny_checkpoint):
    """A tiny SDXL-layout sgm DiffusionEngine: CLIP text context + pooled and size ids in ``vector``."""
    diffusion = _import_sgm(monkeypatch)
    clip_dir = tiny_checkpoint.with_name(f"{tiny_checkpoint.stem}-clip")
    enc = "sgm.modules.encoders.modules."

    def size_ids(key: str) -> dict:
        return {"input_key": key, **_target(enc + "ConcatTimestepEmbedderND", outdim=16)}

    torch.manual_seed(0)
    model = diffusion.DiffusionEngine(
        network_config=_target(
            "sgm.modules.diffusionmodules.openaimodel.UNetModel", adm_in_channels=32 + 3 * 32,
            num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4, model_channels=32,
            attention_resolutions=[2], num_res_blocks=2, channel_mult=[1, 2], num_head_channels=16,
            use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 1],
            context_dim=32, spatial_transformer_attn_type="softmax", legacy=False),
        denoiser_config=_target(
            "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", num_idx=1000,
            weighting_config=_target("sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"),
            scaling_config=_target("sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"),
            discretization_config=_target("sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization")),
        first_stage_config=_target(
            "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", embed_dim=4,
            lossconfig=_target("torch.nn.Identity"),
            ddconfig={"attn_type": "vanilla", "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                      "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                      "dropout": 0.0}),
        conditioner_config=_target("sgm.modules.GeneralConditioner", emb_models=[
            {"input_key": "txt", **_target(enc + "FrozenCLIPEmbedder", version=str(clip_dir), device="cpu",
                                           layer="hidden", layer_idx=-2, always_return_pooled=True)},
            size_ids("original_size_as_tuple"), size_ids("crop_coords_top_left"), size_ids("target_size_as_tuple")]),
        scale_factor=0.13025, disable_first_stage_autocast=True)
    # sgm zero-initialises output layers: give them small random weights so outputs depend on the inputs
    with torch.no_grad():
        for name, param in model.model.diffusion_model.named_parameters():
            if not param.any():
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


class OpenClipBlock(torch.nn.Module):
    """The layout of an OpenCLIP residual block: fused-projection attention, mlp of c_fc / gelu / c_proj."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, 4)
        self.mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(width, 2 * width), gelu=torch.nn.GELU(),
                                                   c_proj=torch.nn.Linear(2 * width, width)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TinyOpenCLIPEmbedder(torch.nn.Module):
    """The shape of ldm's FrozenOpenCLIPEmbedder: ``.model`` with ``transformer.resblocks`` (sequence first)."""

    def __init__(self, tokenizer, width: int = 32) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = torch.nn.Module()
        self.model.token_embedding = torch.nn.Embedding(49408, width)
        self.model.positional_embedding = torch.nn.Parameter(torch.randn(77, width) * 0.01)
        self.model.transformer = torch.nn.Module()
        self.model.transformer.resblocks = torch.nn.ModuleList(OpenClipBlock(width) for _ in range(2))
        self.model.ln_final = torch.nn.LayerNorm(width)

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        x = (self.model.token_embedding(ids.input_ids) + self.model.positional_embedding).transpose(0, 1)
        mask = torch.full((77, 77), float("-inf")).triu(1)
        for block in self.model.transformer.resblocks:
            x = block(x, attn_mask=mask)
        return self.model.ln_final(x.transpose(0, 1))


def make_config(data, out, **overrides):
    settings = {"train_data_dir": str(data), "base_model": "webui", "output_dir": str(out), "resolution": 64,
                "batch_size": 2, "max_steps": 2, "lora_rank": 4, "lora_alpha": 2, "learning_rate": 1e-2,
                "device": "cpu", "seed": 3, "sample_steps": 2}  # 2: the end-of-run preview stays cheap
    settings.update(overrides)
    return config_from_dict(settings)


def test_detects_sd1_and_reads_schedule(ldm_model):
    backbone = WebUIBackbone(ldm_model)
    assert model_version(ldm_model) == "sd_v1" and backbone.prediction_type == "epsilon"
    assert torch.allclose(backbone.alphas_cumprod, ldm_model.alphas_cumprod.float())
    latents = backbone.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8)
    cond = backbone.encode_prompts(["a photo"])
    assert backbone.predict(latents, torch.tensor([10]), cond).shape == latents.shape


def test_training_leaves_the_live_model_exactly_as_it_was(ldm_model, shapes_dataset, tmp_path):
    before_hash = model_weights_hash(ldm_model)
    before = snapshot_model_state(ldm_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True,
                                 gradient_checkpointing=True), WebUIBackbone(ldm_model)).run()
    assert result.lora_path is not None and result.steps_done == 2
    assert model_weights_hash(ldm_model) == before_hash
    after = snapshot_model_state(ldm_model)
    assert after.module_types == before.module_types
    assert after.requires_grad == before.requires_grad and after.training == before.training
    assert after.checkpoint_flags == before.checkpoint_flags
    keys = load_file(str(result.lora_path))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys


def test_exported_file_reproduces_the_trained_model(ldm_model, shapes_dataset, tmp_path):
    fresh = copy.deepcopy(ldm_model)
    trained = WebUIBackbone(ldm_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True), trained,
                     restore_backbone=False).run()
    reloaded = WebUIBackbone(fresh)
    roots = reloaded.lora_roots(True)
    inject_lora(roots, rank=4, alpha=4, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                te_targets=TE_TARGETS)
    load_lora_state_dict(roots, from_kohya_state_dict(load_file(str(result.lora_path)), roots))
    for module in (*roots.values(), *trained.lora_roots(True).values()):
        module.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 700])
    with torch.no_grad():
        cond_trained = trained.encode_prompts(["a red circle", "sks"])
        cond_reloaded = reloaded.encode_prompts(["a red circle", "sks"])
        torch.testing.assert_close(cond_reloaded, cond_trained, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded.predict(x, t, cond_reloaded), trained.predict(x, t, cond_trained),
                                   atol=1e-4, rtol=0)
        remove_lora(roots)
        base = reloaded.predict(x, t, reloaded.encode_prompts(["a red circle", "sks"]))
        assert (base - trained.predict(x, t, cond_trained)).abs().max() > 1e-3  # the LoRA changed the output


def test_sd2_text_encoder_training_is_refused_clearly(ldm_model):
    ldm_model.is_sd2 = True
    with pytest.raises(UnsupportedModel, match="train_text_encoder"):
        WebUIBackbone(ldm_model).lora_roots(True)


def test_preview_sampler_is_deterministic(ldm_model):
    backbone = WebUIBackbone(ldm_model)
    first = backbone.sample(["a red circle"], seed=5, steps=3, width=64, height=64)
    second = backbone.sample(["a red circle"], seed=5, steps=3, width=64, height=64)
    assert first[0].size == (64, 64) and first[0].tobytes() == second[0].tobytes()


def test_gradient_checkpointing_wraps_blocks_not_the_unet_and_comes_off(ldm_model):
    backbone = WebUIBackbone(ldm_model)
    unet = ldm_model.model.diffusion_model
    backbone.set_gradient_checkpointing(True)
    wrapped = [name for name, m in unet.named_modules() if "forward" in vars(m)]
    assert wrapped and "" not in wrapped
    assert any(name.endswith("transformer_blocks.0") for name in wrapped)
    backbone.set_gradient_checkpointing(False)
    assert not [name for name, m in unet.named_modules() if "forward" in vars(m)]


def test_sdxl_conditioning_packs_and_unpacks_exactly():
    crossattn, vector = torch.randn(2, 77, 32), torch.randn(2, 128)
    packed = pack_sdxl_conditioning(crossattn, vector)
    assert packed.shape == (2, 77 * 32 + 128)
    out = unpack_sdxl_conditioning(packed, 32, 128)
    assert torch.equal(out["crossattn"], crossattn) and torch.equal(out["vector"], vector)
    with pytest.raises(ValueError, match="does not split"):
        unpack_sdxl_conditioning(packed[:, 1:], 32, 128)


def test_sdxl_matches_sgm_own_denoiser(sdxl_model):
    """The raw prediction, turned into sgm's denoised x0 by hand, equals sgm's DiscreteDenoiser output."""
    from sgm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

    backbone = WebUIBackbone(sdxl_model, sdxl_size=(64, 64))
    assert backbone.model_version == "sdxl" and backbone.prediction_type == "epsilon"
    expected = torch.as_tensor(LegacyDDPMDiscretization().alphas_cumprod).float()
    torch.testing.assert_close(backbone.alphas_cumprod, expected)
    torch.testing.assert_close(legacy_ddpm_alphas_cumprod(), expected)
    assert backbone.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8)
    cond = backbone.encode_prompts(["a red circle", ""])
    parts = unpack_sdxl_conditioning(cond, 32, 128)
    assert parts["crossattn"].shape == (2, 77, 32) and parts["vector"].shape == (2, 128)
    other_size = WebUIBackbone(sdxl_model, sdxl_size=(1024, 1024)).encode_prompts(["a red circle", ""])
    assert torch.equal(other_size[:, :77 * 32], cond[:, :77 * 32])  # same text,
    assert not torch.equal(other_size[:, -96:], cond[:, -96:])  # other size ids

    t = torch.tensor([100, 800])
    alpha = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = backbone.predict(x_t, t, cond)
        sigma = ((1 - alpha) / alpha).sqrt()
        denoised = sdxl_model.denoiser(sdxl_model.model, x_t / alpha.sqrt(), sigma.flatten(), parts)
    torch.testing.assert_close(denoised, (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt(), atol=1e-4, rtol=1e-4)


def test_sdxl_training_in_place_restores_the_model_and_exports_sdxl_names(sdxl_model, shapes_dataset, tmp_path):
    before_hash = model_weights_hash(sdxl_model)
    before = snapshot_model_state(sdxl_model)
    fresh = copy.deepcopy(sdxl_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", gradient_checkpointing=True),
                     WebUIBackbone(sdxl_model, sdxl_size=(64, 64))).run()
    assert result.steps_done == 2 and result.lora_path is not None
    assert model_weights_hash(sdxl_model) == before_hash
    after = snapshot_model_state(sdxl_model)
    assert after.module_types == before.module_types and after.requires_grad == before.requires_grad
    assert after.training == before.training and after.forward_overrides == before.forward_overrides
    from safetensors import safe_open

    with safe_open(str(result.lora_path), "pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    # kohya's diffusers-style names; the WebUI maps down_blocks.1.attentions.0 back to input_blocks.4.1
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert not any(k.startswith("lora_te") for k in keys)

    # the file, loaded into an untouched copy, reproduces the trained UNet
    state = load_file(str(result.lora_path))
    trained, reloaded = WebUIBackbone(sdxl_model, sdxl_size=(64, 64)), WebUIBackbone(fresh, sdxl_size=(64, 64))
    roots_t = trained.lora_roots(False)
    roots_r = reloaded.lora_roots(False)
    for roots in (roots_t, roots_r):
        inject_lora(roots, rank=4, alpha=2, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                    te_targets=TE_TARGETS)
        load_lora_state_dict(roots, from_kohya_state_dict(state, roots))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([300])
    with torch.no_grad():
        cond = reloaded.encode_prompts(["a red circle"])
        with_lora = reloaded.predict(x, t, cond)
        remove_lora(roots_r)
        remove_lora(roots_t)
        base = reloaded.predict(x, t, cond)
    assert (with_lora - base).abs().max() > 1e-4
    assert model_weights_hash(fresh) == before_hash


def test_sdxl_text_encoder_training_is_refused_clearly(sdxl_model):
    with pytest.raises(UnsupportedModel, match="train_text_encoder for this SDXL"):
        WebUIBackbone(sdxl_model).lora_roots(True)


def _real_open_clip(monkeypatch: pytest.MonkeyPatch, folder) -> types.ModuleType:
    """``open_clip`` (it needs torchvision: the WebUI's venv has both), with the tiny second text encoder's
    text tower registered (for this test only) under the arch name it returns as ``.tiny_arch``; or skip."""
    try:
        import open_clip
        import open_clip.factory
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"needs open_clip with torchvision, as in the WebUI's venv ({error})")
    from lora_trainer.models.tiny_sdxl import tiny_open_clip_config

    te2 = tiny_open_clip_config()
    path = folder / "lora-trainer-tiny-sdxl-te2.json"
    path.write_text(json.dumps({
        "embed_dim": te2["projection_dim"],
        "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 32, "patch_size": 14},
        "text_cfg": {"context_length": te2["max_position_embeddings"], "vocab_size": te2["vocab_size"],
                     "width": te2["hidden_size"], "heads": te2["num_attention_heads"],
                     "layers": te2["num_hidden_layers"]}}))
    factory = open_clip.factory
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(path)
    open_clip.tiny_arch = path.stem
    return open_clip


def test_a_tiny_sdxl_file_fills_the_webuis_sgm_model_and_our_lora_keys_find_its_modules(
        monkeypatch, request, tiny_sdxl_checkpoint, _tiny_sdxl_components, tmp_path):
    """What the WebUI does with a single-file SDXL checkpoint: sgm builds the model from the .yaml beside it (the
    second text encoder by its OpenCLIP arch name), the file's weights fill it exactly, the conditioner runs (the
    first encoder's layer_idx is its penultimate layer) and every key of a LoRA we export (te1, te2, UNet) names
    one of its modules, by the WebUI's own naming, with the right shape."""
    import yaml

    from tests.lora.helpers import UNET_TARGETS
    from tests.lora.webui_names import module_names_of, unmatched_keys, webui_modules

    open_clip = _real_open_clip(monkeypatch, tmp_path)
    request.getfixturevalue("ldm_stubs")  # after open_clip: its stand-in torchvision would hide the real one
    _import_sgm(monkeypatch)
    from sgm.util import instantiate_from_config

    config = yaml.safe_load(tiny_sdxl_checkpoint.with_suffix(".yaml").read_text())
    embedders = config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    embedders[1]["params"].update(arch=open_clip.tiny_arch, version=None)  # no download (the WebUI skips it too)
    for embedder in embedders[:2]:
        embedder["params"]["device"] = "cpu"
    model = instantiate_from_config(config["model"]).eval()
    state = load_file(str(tiny_sdxl_checkpoint))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["denoiser.sigmas"], [])  # a buffer sgm computes

    with torch.no_grad():
        size = torch.tensor([[64, 64]])
        cond = model.conditioner({"txt": ["a red circle"], "original_size_as_tuple": size,
                                  "crop_coords_top_left": torch.tensor([[0, 0]]), "target_size_as_tuple": size})
        ids = _tiny_sdxl_components["tokenizer"](["a red circle"], padding="max_length", max_length=77,
                                                 truncation=True, return_tensors="pt").input_ids
        ours = _tiny_sdxl_components["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
    assert cond["crossattn"].shape == (1, 77, 64) and cond["vector"].shape == (1, 32 + 6 * 8)
    torch.testing.assert_close(cond["crossattn"][..., :32], ours, atol=1e-5, rtol=0)

    real = module_names_of(model)
    assert webui_modules(state).items() <= real.items()  # the tests' re-statement names the real modules
    c = {k: copy.deepcopy(v) for k, v in _tiny_sdxl_components.items() if not k.startswith("tokenizer")}
    roots = {"lora_unet": c["unet"], "lora_te1": c["text_encoder"], "lora_te2": c["text_encoder_2"]}
    inject_lora(roots, rank=4, alpha=2.0, dropout=0.0, unet_targets=UNET_TARGETS, te_targets=TE_TARGETS)
    lora = to_kohya_state_dict(roots, 2.0)
    assert {k.split("_")[1] for k in lora} == {"unet", "te1", "te2"}
    assert unmatched_keys(lora, modules=real) == []


def test_long_prompt_chunks_are_cut_to_one_and_v_prediction_is_read(ldm_model):
    """The WebUI returns 77 positions per 75-token chunk; training keeps the first chunk, like kohya."""
    short = torch.randn(1, 77, 32)
    long = torch.randn(1, 154, 32)
    backbone = WebUIBackbone(ldm_model, encode_text=lambda prompts: long if prompts[0] == "long" else short)
    assert backbone.encode_prompts(["long"]).shape == (1, 77, 32)
    assert torch.equal(backbone.encode_prompts(["long"]), long[:, :77])
    assert torch.equal(backbone.encode_prompts(["short"]), short)
    ldm_model.parameterization = "v"
    assert WebUIBackbone(ldm_model).prediction_type == "v_prediction"
    ldm_model.parameterization = "x0"
    with pytest.raises(UnsupportedModel, match="x0"):
        WebUIBackbone(ldm_model)


def test_inpainting_models_are_refused_clearly(ldm_model):
    ldm_model.model.diffusion_model.in_channels = 9
    with pytest.raises(UnsupportedModel, match="inpainting"):
        WebUIBackbone(ldm_model)


@pytest.fixture
def sd2_model(ldm_model, _tiny_components):
    """The tiny LDM model with an OpenCLIP text stage, flagged SD2 the way the WebUI does."""
    torch.manual_seed(0)
    ldm_model.cond_stage_model = TinyOpenCLIPEmbedder(_tiny_components["tokenizer"]).requires_grad_(False)
    ldm_model.is_sd2 = True
    return ldm_model


def test_sd2_openclip_text_encoder_lora_trains_and_is_released(sd2_model):
    """SD2's OpenCLIP attention is split for the run (kohya names), gets gradients, and is given back."""
    resblock = sd2_model.cond_stage_model.model.transformer.resblocks[0]
    attn, mlp = resblock.attn, resblock.mlp
    before_hash, before = model_weights_hash(sd2_model), snapshot_model_state(sd2_model)
    backbone = WebUIBackbone(sd2_model, openclip_text_encoder=True)
    roots = backbone.lora_roots(True)
    assert backbone.lora_roots(True)["lora_te"] is roots["lora_te"]  # one split per run
    sd2_model.requires_grad_(False)
    params = inject_lora(roots, rank=4, alpha=4, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                         te_targets=TE_TARGETS)
    cond = backbone.encode_prompts(["a red circle", "sks"])
    backbone.predict(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond).square().mean().backward()
    te_up = [p for name, p in roots["lora_te"].named_parameters() if "lora_B" in name]
    assert te_up and all(p.grad is not None and p.grad.abs().sum() > 0 for p in te_up)
    assert len(params) == sum(1 for r in roots.values() for p in r.parameters() if p.requires_grad)
    keys = to_kohya_state_dict(roots, 4)
    for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1"):
        assert f"lora_te_text_model_encoder_layers_1_{part}.lora_down.weight" in keys
    remove_lora(roots)
    backbone.release_lora_roots()
    restore_model_state(sd2_model, before)
    assert resblock.attn is attn and resblock.mlp is mlp
    assert model_weights_hash(sd2_model) == before_hash
    assert snapshot_model_state(sd2_model).requires_grad == before.requires_grad


def test_sdxl_text_encoder_lora_gets_gradients_through_the_conditioner(sdxl_model):
    """sgm runs non-trainable embedders under no_grad; the flag is lifted for the call and put back."""
    backbone = WebUIBackbone(sdxl_model, sdxl_size=(64, 64), openclip_text_encoder=True)
    roots = backbone.lora_roots(True)
    assert sorted(roots) == ["lora_te1", "lora_unet"]  # this tiny conditioner has no OpenCLIP embedder
    sdxl_model.requires_grad_(False)
    inject_lora(roots, rank=4, alpha=4, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                te_targets=TE_TARGETS)
    cond = backbone.encode_prompts(["a red circle"])
    backbone.predict(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond).square().mean().backward()
    te_up = [p for name, p in roots["lora_te1"].named_parameters() if "lora_B" in name]
    assert te_up and all(p.grad is not None and p.grad.abs().sum() > 0 for p in te_up)
    assert [e.is_trainable for e in sdxl_model.conditioner.embedders] == [False] * 4
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in to_kohya_state_dict(roots, 4)
    remove_lora(roots)
    backbone.release_lora_roots()


def test_trainer_on_sd2_with_text_encoder_gives_the_split_back(sd2_model, shapes_dataset, tmp_path):
    """The trainer itself releases the OpenCLIP split: the live SD2 model ends exactly as it started."""
    resblock = sd2_model.cond_stage_model.model.transformer.resblocks[0]
    attn, mlp = resblock.attn, resblock.mlp
    before_hash, before = model_weights_hash(sd2_model), snapshot_model_state(sd2_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True),
                     WebUIBackbone(sd2_model, openclip_text_encoder=True)).run()
    assert result.lora_path is not None
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in load_file(str(result.lora_path))
    assert resblock.attn is attn and resblock.mlp is mlp
    assert model_weights_hash(sd2_model) == before_hash
    after = snapshot_model_state(sd2_model)
    assert after.module_types == before.module_types and after.requires_grad == before.requires_grad

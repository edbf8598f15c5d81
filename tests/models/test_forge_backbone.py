"""Training Forge's loaded model in place, on a stand-in built the way Forge builds its models.

Forge itself cannot be installed in CI. The stand-in reproduces what matters about it: every weight is loaded
under ``torch.inference_mode()`` (so autograd refuses to save it for backward), linear layers are a ``Linear``
class of Forge's own that is not an ``nn.Linear``, the engine's ``get_learned_conditioning`` /
``encode_first_stage`` / ``decode_first_stage`` are decorated with ``torch.inference_mode()``, and the UNet is
reached as ``forge_objects.unet.model.diffusion_model`` with ``(x, t, context=, transformer_options=)``, the
noise schedule on ``.predictor``. The UNet and VAE are ldm's (LDM module names, as Forge's), the text encoder a
transformers CLIPTextModel (as Forge's ``clip_l.transformer``).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.host.forge_weights import LinearSwap, ThawedTensors, is_forge_linear
from lora_trainer.lora.inject import inject_lora, load_lora_state_dict, remove_lora
from lora_trainer.lora.kohya import from_kohya_state_dict
from lora_trainer.models.forge import ForgeBackbone, UnsupportedModel, beneath_inference_mode, forge_model_version
from lora_trainer.models.state import model_weights_hash, snapshot_model_state
from lora_trainer.train.trainer import TE_TARGETS, Trainer


class Linear(nn.Module):
    """What Forge's ``ForgeOperations.Linear`` is: an ``nn.Module`` with ``weight`` / ``bias``, not an nn.Linear."""

    def __init__(self, source: nn.Linear, manual_cast: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.bias = nn.Parameter(source.bias.detach().clone()) if source.bias is not None else None
        self.parameters_manual_cast = manual_cast
        self.scale_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parameters_manual_cast:  # weights cast to the input's dtype on every call
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)


def forge_like(module: nn.Module, manual_cast: bool = False) -> nn.Module:
    """``module`` with Forge's Linear class and every tensor an inference tensor, as Forge's loader leaves it.

    Forge's loader builds its CLIP text encoders with manual-cast Linears (``manual_cast=True``).
    """
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, Linear(child, manual_cast))
    with torch.inference_mode():
        for child in module.modules():
            for key, p in list(child._parameters.items()):
                if p is not None:
                    child._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for key, b in list(child._buffers.items()):
                if b is not None:
                    child._buffers[key] = b.clone()
    return module


def add_residuals_in_place(unet: nn.Module) -> nn.Module:
    """Give ``unet``'s transformer blocks Forge's forward, which adds each residual in place (``x += ...``)."""

    def forge_forward(block: nn.Module):
        def _forward(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            x += block.attn1(block.norm1(x), context=context if block.disable_self_attn else None)
            x += block.attn2(block.norm2(x), context=context)
            x_skip = x
            x = block.ff(block.norm3(x))
            x += x_skip
            return x
        return _forward

    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module._forward = forge_forward(module)
    return unet


class Predictor(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())


class ForgeLikeEngine:
    """The parts of Forge's ``StableDiffusion`` engine that the backbone touches."""

    is_sd1, is_sd2, is_sdxl, is_inpaint = True, False, False, False

    def __init__(self, ldm_model) -> None:
        self.tokenizer = ldm_model.cond_stage_model.tokenizer
        kmodel = nn.Module()
        kmodel.diffusion_model = add_residuals_in_place(forge_like(ldm_model.model.diffusion_model))
        kmodel.predictor = forge_like(Predictor(ldm_model.alphas_cumprod))
        clip_l = nn.Module()
        clip_l.transformer = forge_like(ldm_model.cond_stage_model.transformer, manual_cast=True)
        encoders = nn.Module()
        encoders.clip_l = clip_l
        self.first_stage = forge_like(ldm_model.first_stage_model)
        self.scale = float(ldm_model.scale_factor)
        self.forge_objects = types.SimpleNamespace(
            unet=types.SimpleNamespace(model=kmodel), clip=types.SimpleNamespace(cond_stage_model=encoders),
            vae=types.SimpleNamespace(first_stage_model=self.first_stage))
        self.forge_objects_original = self.forge_objects

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.forge_objects.clip.cond_stage_model.clip_l.transformer(ids.input_ids)[0]

    @torch.inference_mode()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(x).sample() * self.scale

    @torch.inference_mode()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(z / self.scale)


@pytest.fixture
def engine(ldm_model) -> ForgeLikeEngine:
    return ForgeLikeEngine(ldm_model)


def all_tensors(engine: ForgeLikeEngine) -> list[torch.Tensor]:
    modules = [engine.forge_objects.unet.model, engine.forge_objects.clip.cond_stage_model, engine.first_stage]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def make_config(data, out, **overrides):
    from lora_trainer.config import config_from_dict

    settings = {"train_data_dir": str(data), "base_model": "webui", "output_dir": str(out), "resolution": 64,
                "batch_size": 2, "max_steps": 2, "lora_rank": 4, "lora_alpha": 2, "learning_rate": 1e-2,
                "device": "cpu", "seed": 3, "sample_steps": 2}  # 2: the end-of-run preview stays cheap
    settings.update(overrides)
    return config_from_dict(settings)


def test_the_stand_in_has_forges_problem(engine):
    """Plain LoRA training on Forge's weights fails: they cannot be saved for backward."""
    unet = engine.forge_objects.unet.model.diffusion_model
    assert all(t.is_inference() for t in all_tensors(engine))
    layer = next(m for m in unet.modules() if is_forge_linear(m))
    x = torch.randn(1, layer.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(x).sum().backward()


def test_reads_version_schedule_and_predicts(engine, ldm_model):
    backbone = ForgeBackbone(engine)
    assert backbone.model_version == "sd_v1" and backbone.prediction_type == "epsilon"
    assert torch.equal(backbone.alphas_cumprod, ldm_model.alphas_cumprod.float())
    latents = backbone.encode_images(torch.zeros(1, 3, 64, 64))
    cond = backbone.encode_prompts(["a photo"])
    assert latents.shape == (1, 4, 8, 8) and cond.shape[1] == 77
    assert not latents.is_inference() and not cond.is_inference()  # results can be trained on
    with torch.no_grad():
        assert backbone.predict(latents, torch.tensor([10]), cond).shape == latents.shape


def test_training_leaves_forges_model_exactly_as_it_was(engine, shapes_dataset, tmp_path):
    kmodel = engine.forge_objects.unet.model
    hashes = [model_weights_hash(m) for m in (kmodel, engine.forge_objects.clip.cond_stage_model)]
    before = [snapshot_model_state(m) for m in (kmodel, engine.forge_objects.clip.cond_stage_model)]
    grads = [t.requires_grad for t in all_tensors(engine)]

    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True,
                                 gradient_checkpointing=True), ForgeBackbone(engine)).run()

    assert result.steps_done == 2 and result.lora_path is not None
    assert [model_weights_hash(m) for m in (kmodel, engine.forge_objects.clip.cond_stage_model)] == hashes
    after = [snapshot_model_state(m) for m in (kmodel, engine.forge_objects.clip.cond_stage_model)]
    assert [a.module_types for a in after] == [b.module_types for b in before]  # Forge's Linear class is back
    assert [a.forward_overrides for a in after] == [b.forward_overrides for b in before]
    assert all(t.is_inference() for t in all_tensors(engine))  # inference tensors again, as Forge left them
    assert [t.requires_grad for t in all_tensors(engine)] == grads
    keys = load_file(str(result.lora_path))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys


def test_exported_file_reproduces_the_trained_forge_model(ldm_model, shapes_dataset, tmp_path):
    fresh = ForgeLikeEngine(copy.deepcopy(ldm_model))
    trained = ForgeBackbone(ForgeLikeEngine(ldm_model))
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True), trained,
                     restore_backbone=False).run()
    reloaded = ForgeBackbone(fresh)
    roots = reloaded.lora_roots(True)
    inject_lora(roots, rank=4, alpha=4, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                te_targets=TE_TARGETS)
    load_lora_state_dict(roots, from_kohya_state_dict(load_file(str(result.lora_path)), roots))
    for module in (*roots.values(), *trained.lora_roots(True).values()):
        module.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 700])
    prompts = ["a red circle", "sks"]
    with torch.no_grad():
        cond_trained, cond_reloaded = trained.encode_prompts(prompts), reloaded.encode_prompts(prompts)
        torch.testing.assert_close(cond_reloaded, cond_trained, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded.predict(x, t, cond_reloaded), trained.predict(x, t, cond_trained),
                                   atol=1e-4, rtol=0)
        remove_lora(roots)
        base = reloaded.predict(x, t, reloaded.encode_prompts(prompts))
        assert (base - trained.predict(x, t, cond_trained)).abs().max() > 1e-3  # the LoRA changed the output
    reloaded.release_lora_roots()


def test_thawing_and_refreezing_hold_the_weights_once(monkeypatch):
    """Each replaced tensor is freed before the next module's are copied: no second copy of the model."""
    import weakref

    from lora_trainer.host import forge_weights

    with torch.inference_mode():
        root = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
    watched = [weakref.ref(p) for p in root.parameters()]
    alive_at_copy = []
    copy = forge_weights._copy_parameter

    def counting_copy(tensor, requires_grad):
        alive_at_copy.append(sum(ref() is not None for ref in watched))
        return copy(tensor, requires_grad)

    monkeypatch.setattr(forge_weights, "_copy_parameter", counting_copy)
    thawed = ThawedTensors()
    thawed.thaw([root])
    assert alive_at_copy == [10, 10, 8, 8, 6, 6, 4, 4, 2, 2]  # a module's weight and bias, then they go
    assert all(ref() is None for ref in watched)
    watched[:] = [weakref.ref(p) for p in root.parameters()]
    alive_at_copy.clear()
    thawed.refreeze()
    assert alive_at_copy == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert all(p.is_inference() for p in root.parameters())


def test_thawed_tensors_stay_shared_and_refreeze_exactly():
    with torch.inference_mode():
        shared = nn.Parameter(torch.randn(3, 3), requires_grad=False)
        first, second = nn.Module(), nn.Module()
        first.w, second.w = shared, shared
        first.register_buffer("ids", torch.arange(3))
    thawed = ThawedTensors()
    assert thawed.thaw([first, second]) == 3 and thawed.thaw([first]) == 0  # idempotent
    assert first.w is second.w and not first.w.is_inference() and not first.ids.is_inference()
    assert torch.equal(first.w, shared) and first.w.requires_grad is False
    thawed.refreeze()
    assert first.w is second.w and first.w.is_inference() and first.ids.is_inference()
    assert torch.equal(first.w, shared) and len(thawed) == 0
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        ThawedTensors().thaw([first])


def _offloaded(layer: Linear) -> None:
    layer.prev_parameters_manual_cast, layer.parameters_manual_cast = False, True  # what Forge's CPU swap sets


def _on_two_devices(layer: Linear) -> None:
    layer.parameters_manual_cast = True
    layer.weight = nn.Parameter(layer.weight.detach().to("meta"))


@pytest.mark.parametrize(("change", "message"), [
    (_offloaded, "GPU Weights"),
    (_on_two_devices, "spread over cpu, meta"),
    (lambda layer: setattr(layer, "scale_weight", torch.ones(1)), "quantized"),
    (lambda layer: setattr(layer, "weight", nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn))),
     "float8_e4m3fn"),
])
def test_linear_swap_refuses_what_it_cannot_train_through_and_swaps_nothing(change, message):
    root = nn.Sequential(Linear(nn.Linear(2, 2)), Linear(nn.Linear(2, 2)))
    change(root[1])
    with pytest.raises(UserError, match=message):
        LinearSwap().swap(root)
    assert all(isinstance(m, Linear) for m in root)


def test_manual_cast_layers_compute_as_forge_does_after_the_swap():
    """Forge's CLIP: fp16 weights in manual-cast Linears, run on fp32 activations; swapped, it computes the same."""
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    root = nn.Sequential(Linear(root[0], True), nn.GELU(), Linear(root[2], True)).half()
    x = torch.randn(3, 4)
    expected = root(x)
    assert expected.dtype == torch.float32
    originals = list(root)
    swap = LinearSwap()
    assert swap.swap(root) == 2 and isinstance(root[0], nn.Linear) and root[2].weight is originals[2].weight
    assert torch.equal(root(x), expected)
    inject_lora({"lora_te": root}, rank=2, alpha=2, dropout=0.0, unet_targets=[], te_targets=["0", "2"])
    out = root(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)  # LoRA B starts at zero
    out.sum().backward()  # gradients reach the float32 LoRA weights through fp16 frozen ones
    remove_lora({"lora_te": root})
    swap.restore()
    assert list(root) == originals and root[0].weight.dtype == torch.float16


def test_linear_swap_shares_parameters_and_puts_the_originals_back():
    root = nn.Sequential(Linear(nn.Linear(2, 3)), nn.ReLU(), Linear(nn.Linear(3, 2)))
    originals = list(root)
    swap = LinearSwap()
    assert swap.swap(root) == 2
    assert isinstance(root[0], nn.Linear) and root[0].weight is originals[0].weight
    x = torch.randn(4, 2)
    assert torch.equal(root(x), nn.Sequential(*originals)(x))
    swap.restore()
    assert list(root) == originals


def test_other_model_families_and_inpainting_are_refused(engine):
    engine.is_sd1 = False
    with pytest.raises(UnsupportedModel, match="SD1.x, SD2.x and SDXL"):
        forge_model_version(engine)
    engine.is_sd1, engine.is_inpaint = True, True
    with pytest.raises(UnsupportedModel, match="inpainting"):
        ForgeBackbone(engine)


def test_a_preview_that_moves_the_model_stops_training_clearly(engine):
    def forge_txt2img_moving_weights(prompts, **kwargs):
        with torch.inference_mode():  # Forge's txt2img runs in inference mode; a move there re-freezes weights
            engine.forge_objects.unet.model.to(torch.float64)
        return [None]

    backbone = ForgeBackbone(engine, sampler=forge_txt2img_moving_weights)
    backbone.lora_roots(False)
    with pytest.raises(UserError, match="moved the model"):
        backbone.sample(["x"], seed=1, steps=1, width=64, height=64)
    backbone.release_lora_roots()


def test_sampler_may_decline_and_the_ddim_preview_is_used(engine):
    backbone = ForgeBackbone(engine, sampler=lambda prompts, **kw: None)
    images = backbone.sample(["a red circle"], seed=5, steps=2, width=64, height=64)
    assert images[0].size == (64, 64)


def test_beneath_inference_mode_calls_the_undecorated_function(engine):
    plain = beneath_inference_mode(engine.get_learned_conditioning)
    with torch.no_grad():
        assert not plain(["x"]).is_inference() and engine.get_learned_conditioning(["x"]).is_inference()

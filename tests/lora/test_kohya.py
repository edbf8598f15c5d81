"""kohya key names exactly as the WebUI reads them, from diffusers and LDM module trees, and back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.lora.inject import inject_lora, lora_state_dict
from lora_trainer.lora.kohya import (
    diffusers_to_ldm_unet_path,
    from_kohya_state_dict,
    kohya_names,
    ldm_to_diffusers_unet_path,
    text_encoder_path,
    to_kohya_state_dict,
)
from tests.lora.helpers import TE_TARGETS, UNET_TARGETS, ldm_view, randomize_lora

Q = "transformer_blocks_0_attn1_to_q"


def inject(roots: dict, rank: int = 4, alpha: float = 2.0, unet_targets=UNET_TARGETS) -> list:
    return inject_lora(roots, rank=rank, alpha=alpha, dropout=0.0, unet_targets=unet_targets,
                       te_targets=TE_TARGETS)


def test_key_names_and_alpha(tiny_components):
    roots = {"lora_unet": tiny_components["unet"], "lora_te": tiny_components["text_encoder"]}
    randomize_lora(inject(roots, rank=4, alpha=2.0))
    state = to_kohya_state_dict(roots, 2.0)
    for name in (f"lora_unet_down_blocks_0_attentions_0_{Q}", f"lora_unet_mid_block_attentions_0_{Q}",
                 f"lora_unet_up_blocks_3_attentions_2_{Q}",
                 "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
                 "lora_unet_down_blocks_2_attentions_1_proj_in", "lora_unet_down_blocks_2_attentions_1_proj_out",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
                 "lora_te_text_model_encoder_layers_1_mlp_fc1", "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert state[f"{name}.lora_down.weight"].shape[0] == 4, name
        assert state[f"{name}.lora_up.weight"].shape[1] == 4, name
        alpha = state[f"{name}.alpha"]
        assert alpha.ndim == 0 and alpha.item() == 2.0, name
    parts: dict[str, set[str]] = {}
    for key in state:
        name, _, part = key.partition(".")
        parts.setdefault(name, set()).add(part)
    assert all(p == {"lora_down.weight", "lora_up.weight", "alpha"} for p in parts.values())
    assert len(state) == 3 * (192 + 12)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert not any("lora_te1" in k or "text_model_text_model" in k for k in state)
    live = roots["lora_unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(state[f"lora_unet_down_blocks_0_attentions_0_{Q}.lora_down.weight"],
                       live.lora_A["default"].weight)
    assert torch.equal(state[f"lora_unet_down_blocks_0_attentions_0_{Q}.lora_up.weight"],
                       live.lora_B["default"].weight)
    conv = state["lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight"]
    assert conv.shape == (4, 64, 1, 1)  # a 1x1 conv proj_in keeps its conv shape, as kohya writes it


def test_ldm_module_tree_gives_the_same_keys(tiny_components, _tiny_components):
    import copy

    diffusers_roots = {"lora_unet": copy.deepcopy(_tiny_components["unet"])}
    inject(diffusers_roots)
    ldm_roots = {"lora_unet": ldm_view(tiny_components["unet"])}
    inject(ldm_roots)
    assert set(to_kohya_state_dict(ldm_roots, 2.0)) == set(to_kohya_state_dict(diffusers_roots, 2.0))


@pytest.mark.parametrize(("path", "expected"), [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.8.1.proj_in", "down_blocks.2.attentions.1.proj_in"),
    ("middle_block.1.transformer_blocks.0.ff.net.2", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
    ("output_blocks.3.1.proj_out", "up_blocks.1.attentions.0.proj_out"),
    ("output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    ("input_blocks.1.0.emb_layers.1", "input_blocks.1.0.emb_layers.1"),
])
def test_ldm_and_diffusers_unet_paths(path, expected):
    assert ldm_to_diffusers_unet_path(path) == expected
    assert diffusers_to_ldm_unet_path(expected) == path


@pytest.mark.parametrize("path", [
    "encoder.layers.0.self_attn.q_proj",  # transformers 5 CLIPTextModel (no text_model level)
    "text_model.encoder.layers.0.self_attn.q_proj",  # transformers 4 CLIPTextModel
    "transformer.text_model.encoder.layers.0.self_attn.q_proj",  # the WebUI's FrozenCLIPEmbedder
    "wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj",
])
def test_text_encoder_paths_normalise(path):
    assert text_encoder_path(path) == "text_model.encoder.layers.0.self_attn.q_proj"
    assert kohya_names("lora_te", path)[0] == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_names("lora_te1", path)[0] == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def test_text_encoder_without_clip_layers_is_refused():
    with pytest.raises(ValueError, match="model.transformer.resblocks.0.attn"):
        text_encoder_path("model.transformer.resblocks.0.attn")


def test_wrapped_text_encoder_gets_the_same_keys(tiny_components):
    wrapper = nn.Module()
    wrapper.transformer = tiny_components["text_encoder"]
    roots = {"lora_te": wrapper}
    inject(roots)
    keys = set(to_kohya_state_dict(roots, 2.0))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys and len(keys) == 36


def test_from_kohya_round_trip_with_other_alpha(tiny_components, _tiny_components):
    import copy

    roots = {"lora_unet": tiny_components["unet"], "lora_te": tiny_components["text_encoder"]}
    randomize_lora(inject(roots, rank=4, alpha=8.0))
    kohya = to_kohya_state_dict(roots, 8.0)
    fresh = {"lora_unet": copy.deepcopy(_tiny_components["unet"]),
             "lora_te": copy.deepcopy(_tiny_components["text_encoder"])}
    inject(fresh, rank=4, alpha=2.0)  # a different alpha: the scale moves into lora_B
    loaded = from_kohya_state_dict(kohya, fresh)
    original = lora_state_dict(roots)
    assert loaded.keys() == original.keys()
    for key, value in loaded.items():
        factor = 4.0 if key.endswith("lora_B.weight") else 1.0
        assert torch.allclose(value, original[key] * factor), key


def test_from_kohya_accepts_ldm_names_and_rejects_unknown_keys(tiny_components):
    roots = {"lora_unet": tiny_components["unet"]}
    inject(roots, unet_targets=["to_q"])
    down = torch.randn(4, 32)
    state = {f"lora_unet_input_blocks_1_1_{Q}.lora_down.weight": down,
             f"lora_unet_input_blocks_1_1_{Q}.lora_up.weight": torch.randn(32, 4),
             f"lora_unet_input_blocks_1_1_{Q}.alpha": torch.tensor(4.0)}
    loaded = from_kohya_state_dict(state, roots)
    path = "lora_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert set(loaded) == {f"{path}.lora_A.weight", f"{path}.lora_B.weight"}
    assert torch.equal(loaded[f"{path}.lora_A.weight"], down)
    with pytest.raises(KeyError, match="lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"):
        from_kohya_state_dict({**state, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                               torch.zeros(4, 32)}, roots)
    with pytest.raises(ValueError, match="rank 2 in the file, 4"):
        from_kohya_state_dict({f"lora_unet_input_blocks_1_1_{Q}.lora_down.weight": torch.zeros(2, 32),
                               f"lora_unet_input_blocks_1_1_{Q}.lora_up.weight": torch.zeros(32, 2)}, roots)


# ---- SDXL, and what the WebUI makes of the names ----------------------------------------------------------------
def test_sdxl_names_from_diffusers_and_ldm_trees_agree(_tiny_sdxl_components):
    import copy

    unet = copy.deepcopy(_tiny_sdxl_components["unet"])
    diffusers_roots = {"lora_unet": unet}
    inject(diffusers_roots)
    ldm_roots = {"lora_unet": ldm_view(copy.deepcopy(_tiny_sdxl_components["unet"]))}
    inject(ldm_roots)
    keys = set(to_kohya_state_dict(diffusers_roots, 2.0))
    assert keys == set(to_kohya_state_dict(ldm_roots, 2.0))
    for name in ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_2_attentions_1_transformer_blocks_1_ff_net_2",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_k",
                 "lora_unet_up_blocks_0_attentions_2_proj_in",
                 "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"):
        assert f"{name}.lora_down.weight" in keys, name
    assert not any(k.startswith(("lora_unet_down_blocks_0_", "lora_unet_up_blocks_2_")) for k in keys)  # no attention


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_key_matches_a_webui_module_of_the_right_shape(family, _tiny_components, _tiny_sdxl_components):
    """The WebUI's own name resolution, against the module names of the model it loads from the single file."""
    import copy

    from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict, sdxl_to_ldm_state_dict
    from tests.lora.webui_names import unmatched_keys

    if family == "sd1":
        c = {k: copy.deepcopy(v) for k, v in _tiny_components.items() if k != "tokenizer"}
        checkpoint = diffusers_to_ldm_state_dict(c["unet"], c["vae"], c["text_encoder"])
        roots = {"lora_unet": c["unet"], "lora_te": c["text_encoder"]}
    else:
        c = {k: copy.deepcopy(v) for k, v in _tiny_sdxl_components.items() if not k.startswith("tokenizer")}
        checkpoint = sdxl_to_ldm_state_dict(c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"])
        roots = {"lora_unet": c["unet"], "lora_te1": c["text_encoder"], "lora_te2": c["text_encoder_2"]}
    inject(roots)
    state = to_kohya_state_dict(roots, 2.0)
    prefixes = {k.split("_text_model")[0] for k in state if "_text_model" in k}
    assert prefixes == ({"lora_te"} if family == "sd1" else {"lora_te1", "lora_te2"})
    assert unmatched_keys(state, checkpoint) == []
    broken = {k.replace("attn1", "attn9"): v for k, v in state.items()}  # the check does catch bad names
    assert unmatched_keys(broken, checkpoint)

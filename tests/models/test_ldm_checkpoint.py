"""diffusers SD1 modules -> LDM single-file names: the layout CompVis' UNetModel / Encoder / Decoder expect.

(Checked once, outside the suite, by loading the output strictly into the original LDM modules and comparing
outputs; here the names the WebUI's LDM model needs are pinned, and diffusers' converter must invert the map.)
"""

from __future__ import annotations

import torch

from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict


def test_ldm_names_of_the_tiny_model(tiny_components: dict) -> None:
    c = tiny_components
    state = diffusers_to_ldm_state_dict(c["unet"], c["vae"], c["text_encoder"])
    unet = "model.diffusion_model."
    # 2 res blocks per level: input_blocks 1-2 (level 0), 3 = downsampler, 4-5, 6 = downsampler, ...
    assert state[unet + "input_blocks.3.0.op.weight"].shape == (32, 32, 3, 3)
    assert unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert unet + "input_blocks.10.1.proj_in.weight" not in state  # the last level has no attention
    assert state[unet + "input_blocks.4.0.skip_connection.weight"].shape == (64, 32, 1, 1)
    # output level 0 (no attention): upsampler at .1; attention levels: at .2; no upsampler at the top level
    assert unet + "output_blocks.2.1.conv.weight" in state
    assert unet + "output_blocks.5.2.conv.weight" in state and unet + "output_blocks.8.2.conv.weight" in state
    assert not any(k.startswith(unet + "output_blocks.11.2.") for k in state)
    assert unet + "middle_block.1.proj_out.weight" in state and unet + "middle_block.2.out_layers.3.weight" in state
    assert state[unet + "time_embed.0.weight"].shape == (128, 32)
    vae = "first_stage_model."
    assert state[vae + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert vae + "encoder.down.0.downsample.conv.weight" in state and vae + "encoder.down.3.downsample.conv.weight" \
        not in state
    # decoder levels count from the bottom: up.3 is the first diffusers up block (lowest resolution)
    assert vae + "decoder.up.3.upsample.conv.weight" in state and vae + "decoder.up.0.upsample.conv.weight" not in state
    # the decoder has layers_per_block + 1 = 2 resnets per level, each norm1/conv1/norm2/conv2 weight + bias
    assert len({k for k in state if k.startswith(vae + "decoder.up.0.block.")}) == 2 * 8
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in state.values())
    params = sum(len(m.state_dict()) for m in (c["unet"], c["vae"], c["text_encoder"]))
    position_ids_added = 0 if any(k.endswith("position_ids") for k in c["text_encoder"].state_dict()) else 1
    assert len(state) == params + position_ids_added  # one LDM name per weight, nothing dropped


def test_diffusers_converter_inverts_the_map(tiny_components: dict) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    c = tiny_components
    state = diffusers_to_ldm_state_dict(c["unet"], c["vae"], c["text_encoder"])
    unet = convert_ldm_unet_checkpoint(state, dict(c["unet"].config))
    assert unet.keys() == c["unet"].state_dict().keys()
    assert all(torch.equal(unet[k], v) for k, v in c["unet"].state_dict().items())
    vae = convert_ldm_vae_checkpoint(state, dict(c["vae"].config))
    assert vae.keys() == c["vae"].state_dict().keys()
    assert all(torch.equal(vae[k], v) for k, v in c["vae"].state_dict().items())

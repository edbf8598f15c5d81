"""sample_images: deterministic previews of the right size, LoRA layers included, train/eval state restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_trainer.models.sampling import make_pipeline, sample_images

SIZE = {"steps": 2, "width": 64, "height": 48}


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_same_seed_same_image_and_the_requested_size(tiny_backbone) -> None:
    first = tiny_backbone.sample(["a red circle", "a blue square"], seed=3, **SIZE)
    again = sample_images(tiny_backbone, ["a blue square"], seed=3, **SIZE)
    other = sample_images(tiny_backbone, ["a blue square"], seed=4, **SIZE)
    assert [image.size for image in first] == [(64, 48), (64, 48)]
    assert np.array_equal(_pixels(first[1]), _pixels(again[0]))  # an image depends on (prompt, seed) only
    assert not np.array_equal(_pixels(again[0]), _pixels(other[0]))
    assert _pixels(first[0]).std() > 0


def test_train_and_eval_flags_are_restored(tiny_backbone) -> None:
    backbone = tiny_backbone
    backbone.unet.train()
    backbone.text_encoder.eval()
    backbone.vae.train()
    backbone.vae.decoder.eval()  # a mixed state must come back exactly
    before = {id(m): m.training for root in (backbone.unet, backbone.vae, backbone.text_encoder)
              for m in root.modules()}
    seen = []
    original = backbone.unet.forward

    def spy(*args, **kwargs):
        seen.append(backbone.unet.training)
        return original(*args, **kwargs)

    backbone.unet.forward = spy
    sample_images(backbone, ["a cat"], seed=0, guidance_scale=1.0, **SIZE)
    del backbone.unet.forward
    assert seen and not any(seen)
    after = {id(m): m.training for root in (backbone.unet, backbone.vae, backbone.text_encoder)
             for m in root.modules()}
    assert after == before


def test_lora_layers_change_the_image(tiny_backbone) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    plain = sample_images(tiny_backbone, ["a cat"], seed=1, negative_prompt="blurry", **SIZE)[0]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                            tiny_backbone.unet)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                            tiny_backbone.text_encoder)
    unchanged = sample_images(tiny_backbone, ["a cat"], seed=1, negative_prompt="blurry", **SIZE)[0]
    assert np.array_equal(_pixels(plain), _pixels(unchanged))  # lora_B starts at zero
    with torch.no_grad():
        for name, param in list(tiny_backbone.unet.named_parameters()) + list(
                tiny_backbone.text_encoder.named_parameters()):
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    trained = sample_images(tiny_backbone, ["a cat"], seed=1, negative_prompt="blurry", **SIZE)[0]
    assert np.abs(_pixels(trained) - _pixels(plain)).mean() > 1


def test_the_pipeline_shares_the_backbone_modules(tiny_backbone) -> None:
    pipe = make_pipeline(tiny_backbone)
    assert pipe.unet is tiny_backbone.unet and pipe.vae is tiny_backbone.vae
    assert pipe.text_encoder is tiny_backbone.text_encoder and pipe.tokenizer is tiny_backbone.tokenizer
    assert pipe.scheduler.config.prediction_type == tiny_backbone.prediction_type
    assert torch.equal(pipe.scheduler.alphas_cumprod, tiny_backbone.noise_scheduler.alphas_cumprod)


def test_bad_sizes_are_rejected(tiny_backbone) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        sample_images(tiny_backbone, ["a cat"], seed=0, steps=2, width=60, height=48)

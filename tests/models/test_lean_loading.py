"""Single-file loading holds the model once (assigned from the memory-mapped file) and changes no result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import load_memory
from lora_trainer.config import config_from_dict
from lora_trainer.models.loading import load_backbone
from lora_trainer.models.weights import CheckpointFile, ModelLoadError
from lora_trainer.train.trainer import Trainer

# Losses of the run below, per (torch, diffusers) stack: first recorded with the loader before lean loading (main at
# 100562f), re-recorded when AdamW became torch's fused implementation (rounding-level changes to each update).
RECORDED = {
    ("2.13.0+cpu", "0.42.1"): {
        False: [1.1913511753082275, 1.1045584678649902, 1.1229194402694702, 1.147606372833252, 1.1204559803009033,
                1.1902756690979004],
        True: [1.1913511753082275, 1.1034274101257324, 1.123291015625, 1.1473476886749268, 1.1197214126586914,
               1.189246416091919]},
    ("2.13.0+cpu", "0.31.0"): {
        False: [1.191388487815857, 1.1049317121505737, 1.1224846839904785, 1.135864496231079, 1.1074587106704712,
                1.173288106918335],
        True: [1.191388487815857, 1.1050355434417725, 1.1224253177642822, 1.1360292434692383, 1.107411503791809,
               1.1719990968704224]},
}


def _run(data: Path, out: Path, base_model: Path | str, backbone=None, **overrides) -> list[float]:
    cfg = config_from_dict({"train_data_dir": str(data), "base_model": str(base_model), "output_dir": str(out),
                            "resolution": 64, "batch_size": 2, "max_steps": 6, "lora_rank": 4, "lora_alpha": 4,
                            "learning_rate": 2e-3, "seed": 7, "device": "cpu", "preview": False, **overrides})
    return Trainer(cfg, backbone).run().losses


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_loss_sequence_is_unchanged(tiny_checkpoint: Path, shapes_dataset: Path, make_tiny_backbone, tmp_path,
                                        train_text_encoder: bool) -> None:
    """The same run, to the bit, on the loaded file (its matrices used where they lie in the mapped file), on the
    modules it was written from, and as recorded before the change."""
    import diffusers

    from_file = _run(shapes_dataset, tmp_path / "file", tiny_checkpoint, train_text_encoder=train_text_encoder)
    in_memory = _run(shapes_dataset, tmp_path / "memory", "given", make_tiny_backbone(),
                     train_text_encoder=train_text_encoder)
    assert from_file == in_memory
    recorded = RECORDED.get((torch.__version__, diffusers.__version__))
    if recorded is None:
        pytest.skip(f"no losses recorded for torch {torch.__version__} + diffusers {diffusers.__version__}")
    assert from_file == pytest.approx(recorded[train_text_encoder], rel=1e-6, abs=0)


def _aligned_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` saved with their data starting at a 64-byte offset in the file (the header padded to it)."""
    from safetensors.torch import save_file

    for pad in range(64):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        with open(path, "rb") as handle:
            if (8 + int.from_bytes(handle.read(8), "little")) % 64 == 0:
                return path
    raise AssertionError("no padding aligned the data")


def test_aligned_tensors_are_views_of_the_mapped_file(tmp_path: Path) -> None:
    """A tensor in the training dtype at a 64-byte offset is a view of a private mapping of the file (nothing
    copied; a write stays in the process); one at another offset, or converted, gets aligned memory of its own."""
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(16.0), "b": torch.ones(3), "c": torch.full((4, 4), 2.0), "d": torch.zeros(3)}
    path = _aligned_file(tmp_path / "aligned.safetensors", tensors)
    checkpoint = CheckpointFile(path)
    aligned = {name for name, (start, _) in checkpoint._places.items() if start % 64 == 0}
    assert aligned and aligned != set(tensors)  # the first tensor is aligned; one 12-byte tensor leaves the rest not
    got = checkpoint.tensors("")
    size = path.stat().st_size
    for name, tensor in got.items():  # the whole file mapped, or its own bytes
        assert tensor.untyped_storage().nbytes() == (size if name in aligned else tensor.numel() * 4), name
        assert tensor.data_ptr() % 64 == 0
    reference = load_file(str(path))
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    first = sorted(aligned)[0]
    got[first].add_(1.0)  # copy on write: the file keeps its bytes
    assert torch.equal(load_file(str(path))[first], tensors[first])
    converted = CheckpointFile(path).tensors("", dtype=torch.bfloat16)[first]
    assert converted.dtype == torch.bfloat16 and converted.untyped_storage().nbytes() == converted.numel() * 2


def test_weights_in_the_training_dtype_are_the_mapped_file_others_converted(tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    """Every weight of a loaded model is aligned as the allocator aligns: a view of the file's mapping (one per
    component) where the file has it aligned, in memory of its own otherwise; converted weights in their dtype."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    size = tiny_checkpoint.stat().st_size
    backbone = load_backbone(tiny_checkpoint)
    backbone.load_released()  # the UNet and the VAE decoder are read on first use
    params = [p for m in backbone.modules() for p in m.parameters()]
    assert not any(p.is_meta for p in params)
    mapped = {id(p) for p in params if p.untyped_storage().nbytes() == size}
    own = {id(p) for p in params if p.untyped_storage().nbytes() == p.numel() * p.element_size()}
    assert len(mapped) + len(own) == len(params)
    assert all(p.data_ptr() % 64 == 0 for p in params if p.is_contiguous())
    storages = [{p.untyped_storage().data_ptr() for p in m.parameters() if id(p) in mapped} for m in backbone.modules()]
    assert all(len(ptrs) <= 1 for ptrs in storages)
    assert len(set().union(*storages)) == sum(len(ptrs) for ptrs in storages)  # one mapping per component
    weight = backbone.unet.conv_in.weight

    half = load_backbone(write_tiny_checkpoint(tmp_path, "half", dtype=torch.float16))
    half.load_released()
    half_params = [p for m in half.modules() for p in m.parameters()]
    assert {p.dtype for p in half_params} == {torch.float32}
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in half_params
               if p.is_contiguous())
    assert all(p.data_ptr() % 64 == 0 for p in half_params if p.untyped_storage().data_ptr() == p.data_ptr())
    torch.testing.assert_close(half.unet.conv_in.weight, weight.half().float(), atol=0, rtol=0)
    bf16 = load_backbone(tiny_checkpoint, dtype=torch.bfloat16)
    bf16.load_released()
    assert {p.dtype for m in bf16.modules() for p in m.parameters()} == {torch.bfloat16}
    assert bf16.dtype == torch.bfloat16


def test_tensors_are_read_as_safetensors_reads_them(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Each tensor's bytes come from the file (mapped or read): the same values as safetensors' own reader,
    converted to the asked dtype; a file cut short is one clear error."""
    from safetensors.torch import load_file

    from lora_trainer.models.tiny import write_tiny_checkpoint

    half = write_tiny_checkpoint(tmp_path, "half", dtype=torch.float16)
    reference = load_file(str(half))
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        got = CheckpointFile(half).tensors("model.", "first_stage_model.", "cond_stage_model.", dtype=dtype)
        assert set(got) == {k for k in reference if k.startswith(("model.", "first_stage_model.", "cond_stage"))}
        for name, tensor in got.items():
            want = reference[name].to(dtype) if reference[name].is_floating_point() else reference[name]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    cut = tmp_path / "cut.safetensors"
    checkpoint = CheckpointFile(half)
    cut.write_bytes(half.read_bytes())
    checkpoint.path = cut
    cut.write_bytes(half.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="ends early"):
        checkpoint.tensors("model.")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident set size from /proc (Linux)")
def test_loading_holds_the_model_once(tmp_path: Path) -> None:
    """Peak RSS over the load and a first read of every weight: at most 1.2x the loaded model (~140 MB here,
    an SDXL-topology float16 file loaded for float32 training; SD1.x loads through the same code).

    The loader before this change (random-initialised modules, weights copied in) measures 1.96x on a float32
    SD1.5-topology file of the same size (``python benchmarks/load_memory.py --before <old checkout>``).
    """
    big, warm = load_memory.write_checkpoints(tmp_path, "sdxl", 3, "float16")
    result = load_memory.measure(big, warm)
    assert "error" not in result, result
    assert result["model_bytes"] > 100 * 2**20
    assert result["ratio"] <= 1.2, result


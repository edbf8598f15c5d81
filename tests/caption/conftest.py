"""Tiny captioning models built on the spot: a WD14-style ONNX tagger and a random BLIP, both predictable."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

SIZE = 16
# name, category, fixed probability (bias), weight on the mean of the B, G, R input channels (0-1 scale)
TAGS = [
    ("general", 9, 0.90, (0, 0, 0)),
    ("1girl", 0, 0.80, (0, 0, 0)),
    ("long_hair", 0, 0.60, (0, 0, 0)),
    ("^_^", 0, 0.50, (0, 0, 0)),
    ("blue_sky", 0, 0.20, (0, 0, 0)),
    ("hatsune_miku", 4, 0.90, (0, 0, 0)),
    ("other_character", 4, 0.70, (0, 0, 0)),
    ("red_theme", 0, None, (0, 0, 12)),   # logit -6 + 12 * mean(R): ~1 on red, ~0 on blue or black
    ("blue_theme", 0, None, (12, 0, 0)),  # driven by the B channel (index 0 of BGR)
]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def build_tagger_folder(folder: Path) -> Path:
    """model.onnx: NHWC float32 [N,16,16,3] -> sigmoid(mean_hw(x)/255 @ W + b); and its selected_tags.csv."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([w for *_, w in TAGS], dtype=np.float32).T  # (3, T)
    bias = np.array([_logit(p) if p is not None else -6.0 for _, _, p, _ in TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["ms"]),
        helper.make_node("MatMul", ["ms", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(TAGS)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category, _, _) in enumerate(TAGS):
            writer.writerow([1000 + index, name, category, 10 * index])
    return folder


@pytest.fixture(scope="session")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tagger_folder(tmp_path_factory.mktemp("tagger"))


WORDS = ["a", "dog", "cat", "on", "the", "grass", "red", "blue", "sitting", "photo", "of"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]


def build_tiny_blip(folder: Path, favourite: str = "dog") -> Path:
    """A 1-layer BLIP whose decoder always prefers ``favourite``: its captions are predictable."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(folder), bos_token="[DEC]", local_files_only=True)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**small, "image_size": 32, "patch_size": 16},
        text_config={**small, "vocab_size": len(VOCAB), "max_position_embeddings": 64,
                     "bos_token_id": VOCAB.index("[DEC]"), "sep_token_id": VOCAB.index("[SEP]"),
                     "eos_token_id": VOCAB.index("[SEP]"), "pad_token_id": 0},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[VOCAB.index(favourite)] = 1000.0
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip"))



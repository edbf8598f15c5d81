"""The job validator (through ``config_from_dict``, as YAML, tab and API use it): names, bounds, finite numbers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from lora_trainer import validation
from lora_trainer.config import FIELDS, ConfigError, config_from_dict, load_config
from lora_trainer.validation import UnsafePathError, inside, short_repr

BASE = {"train_data_dir": "data", "base_model": "model.safetensors"}
BAD_NAMES = ["../../../elsewhere/pwned", "../escaped", "/abs/pwned", "C:\\Windows\\pwned", "sub/name", "a\\b", "",
             "   ", ".", "..", ".hidden", "my..lora", "CON", "nul", "com1.backup", "LPT9", "x" * 101, "é" * 101,
             "name.safetensors", "tab\tname", "nul\x00byte", " leading", "trailing ", "trailing.", "what?", "a:b",
             "\ud800", "rtl\u202egnp.exe", "zero\u200bwidth", "line\u2028break", "no\u00a0break", "private\ue000"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_output_name_must_be_a_plain_file_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^output_name: ") as info:
        config_from_dict({**BASE, "output_name": name})
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("name", ["my_style", "tab lora", "v1.5-style_2", "日本語のスタイル", "x" * 100, "CONSOLE",
                                  "キャラ_v1", "café-style", "Ελληνικά (v2)"])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert config_from_dict({**BASE, "output_name": name}).output_name == name


@pytest.mark.parametrize(("key", "value", "message"), [
    ("trigger_word", "w" * (5 << 20), "trigger_word: 5242880 characters is too long; at most 200"),
    ("sample_prompts", ["p"] * 33, "sample_prompts: 33 entries is too many; at most 32"),
    ("sample_prompts", ["ok", "p" * 1001], r"sample_prompts\[1\]: 1001 characters is too long; at most 1000"),
    ("target_modules", ["to_q"] * 65, "target_modules: 65 entries is too many"),
    ("target_modules", ["to_q; rm -rf /"], "target_modules: 'to_q; rm -rf /' is not a module name"),
    ("train_data_dir", "d" * 5000, "train_data_dir: 5000 characters is too long; at most 4096"),
    ("resume_from", "r" * 5000, "resume_from: 5000 characters is too long"),
    ("device", "cuda; rm", "device: 'cuda; rm' is not allowed; use auto, cpu, cuda or cuda:N"),
    ("task_type", "x" * 10_000, "task_type: 10000 characters is too long"),
])
def test_oversized_or_malformed_text_is_refused_with_the_reason(key: str, value: object, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict({**BASE, key: value})
    assert len(str(info.value)) < 300, "the message must not embed the value"
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(("key", "value"), [
    ("max_steps", 1_000_000_000_000), ("epochs", 1_000_000), ("repeats", 100_000), ("resolution", 4096),
    ("lora_rank", 4096), ("batch_size", 4096), ("gradient_accumulation_steps", 100_000), ("save_steps", 10**9),
    ("sample_every", 10**9), ("sample_steps", 10_000), ("warmup_steps", 10**9), ("seed", 2**64), ("lora_alpha", 1e9),
    ("learning_rate", 10.0), ("weight_decay", 1e6), ("max_grad_norm", 1e9), ("min_snr_gamma", 1e9),
])
def test_numbers_that_are_surely_a_mistake_are_refused(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: .* is too large; allowed range is"):
        config_from_dict({**BASE, key: value})


FLOAT_KEYS = [name for name, f in FIELDS.items() if str(f.type).startswith("float")]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf", "'nan'", "'inf'"])
def test_non_finite_numbers_are_refused_everywhere(tmp_path: Path, key: str, literal: str) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(f"train_data_dir: data\nbase_model: m.safetensors\n{key}: {literal}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{key}: .*(not a finite number|expected float)"):
        load_config(config)


@pytest.mark.parametrize("key", ["max_steps", "lora_rank", "resolution", "seed"])
def test_non_finite_numbers_are_refused_for_integer_keys_too(key: str) -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=rf"^{key}: expected int"):
            config_from_dict({**BASE, key: value})


def test_huge_integers_do_not_break_the_message() -> None:
    with pytest.raises(ConfigError, match=r"max_steps: <an integer of \d+ bits> is too large") as info:
        config_from_dict({**BASE, "max_steps": 10**5000})
    assert len(str(info.value)) < 200
    with pytest.raises(ConfigError, match="learning_rate: .* is too large"):
        config_from_dict({**BASE, "learning_rate": 10**400})
    with pytest.raises(ConfigError, match="output_name: expected str"):
        config_from_dict({**BASE, "output_name": 10**5000})


def test_unknown_huge_key_is_reported_briefly() -> None:
    with pytest.raises(ConfigError, match="unknown config key") as info:
        config_from_dict({**BASE, "k" * 1_000_000: 1})
    assert len(str(info.value)) < 200


def test_resolution_code_error_and_readme_agree() -> None:
    assert config_from_dict({**BASE, "resolution": 576}).resolution == 576
    with pytest.raises(ConfigError, match="multiple of 64"):
        config_from_dict({**BASE, "resolution": 72})
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "| `resolution` | `512` | Training resolution in pixels (multiple of 64). |" in readme


def test_log_dir_must_stay_inside_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert config_from_dict({**BASE, "output_dir": str(out), "log_dir": str(out / "tb")}).log_dir == str(out / "tb")
    for outside in (str(tmp_path / "elsewhere"), str(out / ".." / "escaped"), "/tmp"):
        with pytest.raises(ConfigError, match="log_dir: .* is outside output_dir"):
            config_from_dict({**BASE, "output_dir": str(out), "log_dir": outside})


def test_yaml_relative_log_dir_resolves_inside(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": "out", "log_dir": "out/logs/run1"}), encoding="utf-8")
    assert load_config(path).log_dir == str(tmp_path / "out" / "logs" / "run1")
    path.write_text(yaml.safe_dump({**BASE, "output_dir": "out", "log_dir": "../logs"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="log_dir"):
        load_config(path)


def test_inside_refuses_paths_that_resolve_outside(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    assert inside(root, "a.safetensors") == root / "a.safetensors"
    assert inside(root, "checkpoints", "run", "step-000001") == root / "checkpoints" / "run" / "step-000001"
    for parts in (("..", "x"), ("/etc/passwd",), ("a", "..", "..", "x")):
        with pytest.raises(UnsafePathError, match="outside the output folder"):
            inside(root, *parts)
    os.symlink(tmp_path, root / "link")
    with pytest.raises(UnsafePathError):
        inside(root, "link", "escaped.safetensors")


def test_short_repr_is_bounded() -> None:
    assert len(short_repr("x" * 10**6)) < 80
    nested: list = ["p"]
    for _ in range(30):
        nested = [nested] * 10
    assert len(short_repr(nested)) < 80
    assert short_repr(10**10000).startswith("<an integer of")
    assert validation.short_repr(1.5) == "1.5"


# ---- fuzzing: whatever is accepted stays inside its output folder ----------------------------------------------
FRAGMENTS = ["../", "..\\", "..", ".", "/", "/etc/", "\\", "~/", "C:\\", "CON", "nul", "com1", " ", "\x00", "a", "é",
             "名", ".safetensors", "*", "%2e%2e", "\n", "-", "_", "out", "logs", "checkpoints", "\u202e"]
NUMBER_KEYS = [name for name, f in FIELDS.items() if str(f.type).split(" ")[0] in ("int", "float")]


def _names():
    from hypothesis import strategies as st

    pieces = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map("".join)
    return st.one_of(pieces, pieces, st.text(max_size=120))


def _numbers():
    from hypothesis import strategies as st

    return st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.booleans(), st.none())


def test_fuzz_no_accepted_job_writes_outside_its_folder(tmp_path: Path) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from lora_trainer.train.layout import RunLayout

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(name=_names(), out=st.one_of(st.just("out"), _names()), log=st.one_of(st.none(), _names()),
                      key=st.sampled_from(NUMBER_KEYS), number=_numbers(), step=st.integers(0, 10**7))
    def check(name: str, out: str, log: str | None, key: str, number: object, step: int) -> None:
        data = {**BASE, "output_dir": out, "output_name": name, key: number}
        if log is not None:
            data["log_dir"] = log
        try:
            cfg = config_from_dict(data, base_dir=tmp_path)
        except ConfigError:
            return
        root = Path(cfg.output_dir).resolve()
        for path in RunLayout.of(cfg).written_paths("0123456789ab", step):
            resolved = path.resolve()
            assert resolved == root or root in resolved.parents, (name, log, path)
        assert "/" not in cfg.output_name and "\\" not in cfg.output_name and not cfg.output_name.startswith(".")
        value = getattr(cfg, key)
        meta = FIELDS[key].metadata
        if isinstance(value, float):
            assert value == value and value not in (float("inf"), float("-inf"))
        if value is not None:
            assert meta["low"] is None or value >= meta["low"]
            assert meta["high"] is None or value <= meta["high"]

    check()

"""The optimizer: torch's fused AdamW where it exists for the device, the same update as the unfused one."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.train.optim import adamw, build_optimizer

FUSED_ON_CPU = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((16, 40), (24, 16), (7,))]


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch < 2.4 has no fused AdamW on a CPU")
def test_adamw_is_fused_on_a_cpu_and_updates_as_the_unfused_one() -> None:
    fused_params, plain_params = _params(), _params()
    groups = [{"params": fused_params, "lr": 1e-2}]
    optimizer = build_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.01), groups, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": plain_params, "lr": 1e-2}], weight_decay=0.01, foreach=False)
    _steps(optimizer, fused_params)
    _steps(plain, plain_params)
    for fused, reference, start in zip(fused_params, plain_params, _params(), strict=True):
        assert (fused - start).abs().max() > 1e-2  # five steps of lr 1e-2 moved every weight
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_to_torchs_default_where_fused_is_refused(monkeypatch) -> None:
    """torch < 2.4 on a CPU refuses ``fused=True`` in the constructor: the default implementation is used."""
    real = torch.optim.AdamW
    asked: list[dict] = []

    def refusing(params, **kwargs):
        asked.append(kwargs)
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'xpu', 'privateuseone']")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", refusing)
    params = _params()
    optimizer = adamw([{"params": params, "lr": 1e-2}], 0.0)
    assert [kwargs.get("fused") for kwargs in asked] == [True, None]
    assert not optimizer.defaults.get("fused")
    before = [p.detach().clone() for p in params]
    _steps(optimizer, params, steps=1)
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))

"""The memory plan: the expected peak device memory of a run, before its first step, and the ladder that fits it.

The estimate adds up what the run holds at its peak:

- the frozen weights on the device, per component (UNet, text encoders, VAE), in their dtype;
- the LoRA weights (float32) and the optimizer state (AdamW: two float32 moments; 8-bit AdamW: two bytes);
- the cached latents and text-encoder outputs;
- the larger of what a training step adds at its peak and what a VAE encode adds. The step's part comes from a
  dry run of the model's own forward pass on the ``meta`` device (parameters swapped for meta tensors of the same
  shapes and dtypes: no memory, no arithmetic), counting the tensors autograd keeps for the backward pass, with
  attention as the fused kernels the step uses (output and log-sum-exp kept, no attention matrix). With gradient
  checkpointing, only what the checkpointed blocks keep, plus the largest block recomputed in the backward pass and
  its gradient. It scales with the batch; the LoRA gradients are added.

When the peak does not fit the device's free memory, :func:`plan_memory` walks the ladder: batch down with gradient
accumulation up (same effective batch), gradient checkpointing, 8-bit AdamW, cached text-encoder outputs (always on
when the text encoder is frozen; reported), then, only with ``auto_fit: true``, a lower resolution. The same ladder
serves a real out-of-memory error mid-run (:mod:`lora_trainer.train.oom_guard`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

GIB = 2**30
HEADROOM = 0.9  # plan for 90 % of the free memory: allocator fragmentation, the CUDA context's own buffers
MIN_AUTO_RESOLUTION = 256
#: Blocks gradient checkpointing recomputes one at a time (diffusers and the original LDM code).
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "ResBlock")


@dataclass(frozen=True)
class Settings:
    """The settings the plan may change."""

    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optimizer: str
    resolution: int
    train_text_encoder: bool

    @classmethod
    def of(cls, cfg: Any) -> Settings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Estimate:
    """Bytes at the peak of a run, by part; ``step`` is what a training step adds at its peak (activations, their
    gradients, the LoRA gradients, temporaries), ``encode`` what a VAE encode adds; they do not overlap in time."""

    weights: dict[str, int]
    lora: int
    optimizer: int
    caches: int
    step: int | None
    encode: int | None

    @property
    def total(self) -> int:
        return (sum(self.weights.values()) + self.lora + self.optimizer + self.caches
                + max(self.step or 0, self.encode or 0))

    def describe(self) -> str:
        parts = [f"{name} {_gib(size)}" for name, size in self.weights.items() if size]
        parts += [f"LoRA {_gib(self.lora)}", f"optimizer {_gib(self.optimizer)}", f"caches {_gib(self.caches)}",
                  f"training step {_gib(self.step)}", f"VAE encode {_gib(self.encode)}"]
        return ", ".join(parts)


@dataclass
class Plan:
    """What the plan found and changed; ``settings`` are the ones to train with."""

    estimate: Estimate
    settings: Settings
    budget: int | None
    budget_source: str
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate.total <= self.budget

    def report(self) -> list[str]:
        """The lines the trainer prints."""
        budget = f"{_gib(self.budget)} {self.budget_source}" if self.budget is not None else self.budget_source
        lines = [f"memory plan: expected peak {_gib(self.estimate.total)} ({self.estimate.describe()}); "
                 f"available {budget}"]
        lines += [f"memory plan: {change}" for change in self.changes]
        lines += [f"memory plan: {note}" for note in self.notes]
        if not self.fits:
            lines.append("memory plan: the run may not fit; it starts anyway (an out-of-memory error steps down "
                         "the same ladder)")
        return lines


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / GIB:.2f} GiB"


# ---- what is free ----------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes this run can still use on ``device`` and where the figure comes from.

    CUDA: ``torch.cuda.mem_get_info`` (free) plus what torch already holds (the loaded model is part of the estimate).
    CPU: the available RAM (psutil, else /proc/meminfo), plus nothing: the estimate is then compared with RAM.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device), "on the GPU (free + held by torch)"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "of RAM (an estimate on CPU)"
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of RAM (an estimate on CPU)"
    except OSError:
        pass
    return None, "unknown (no psutil, no /proc/meminfo)"


def resident_bytes(modules: list[nn.Module], device: torch.device) -> int:
    """Bytes of the given modules' tensors that already live on ``device``."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == device.type and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# ---- the static part -------------------------------------------------------------------------------------------
def component_weights(backbone: Any, device: torch.device) -> dict[str, int]:
    """Bytes of frozen weights on ``device`` per component (``unet``, ``text_encoder``..., else ``model``)."""
    named = {name: module for name in ("unet", "text_encoder", "text_encoder_2", "vae")
             if isinstance(module := getattr(backbone, name, None), nn.Module)}
    modules = list(named.values()) or backbone.frozen_modules()
    names = list(named) or [f"model{index or ''}" for index in range(len(modules))]
    out: dict[str, int] = {}
    for name, module in zip(names, modules, strict=True):
        out[name] = sum(p.numel() * p.element_size() for n, p in module.named_parameters()
                        if p.device.type == device.type and "lora_" not in n)
        out[name] += sum(b.numel() * b.element_size() for b in module.buffers() if b.device.type == device.type)
    return out


def lora_parameter_count(roots: dict[str, nn.Module]) -> int:
    return sum(p.numel() for root in roots.values() for p in root.parameters() if p.requires_grad)


def optimizer_bytes(parameters: int, optimizer: str) -> int:
    """AdamW keeps two float32 moments per parameter; bitsandbytes' 8-bit AdamW two bytes (plus block scales)."""
    return parameters * (2 if optimizer == "adamw8bit" else 8)


def cache_bytes(num_latents: int, resolution: int, num_prompts: int, prompt_bytes: int) -> int:
    """Cached float32 latents (4 channels at 1/8 of the resolution) and text-encoder outputs."""
    return num_latents * 4 * (resolution // 8) ** 2 * 4 + num_prompts * prompt_bytes


# ---- activations: a dry run on the meta device -----------------------------------------------------------------
@contextlib.contextmanager
def _meta_tensors(modules: list[nn.Module], dtype: torch.dtype | None) -> Iterator[None]:
    """Swap every parameter and buffer of ``modules`` for a meta tensor of the same shape (dtype ``dtype`` for
    floating-point ones when given), then put the originals back."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in modules:
            for sub in module.modules():
                for table in (sub._parameters, sub._buffers):
                    for name, tensor in list(table.items()):
                        if tensor is None or tensor.device.type == "meta":
                            continue
                        kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                        meta = torch.empty_like(tensor, device="meta", dtype=kind)
                        if isinstance(tensor, nn.Parameter):
                            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                        swapped.append((table, name, tensor))
                        table[name] = meta
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the fused kernel's memory behaviour during a meta dry run.

    On meta tensors SDPA falls back to the math path, which keeps a [heads, N, N] attention matrix; the training
    step's kernels (flash / memory-efficient on CUDA, flash on CPU) keep only the output and log-sum-exp.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and not kwargs and q.device.type == "meta":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)[0]
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _meta_like(value: Any, dtype: torch.dtype) -> Any:
    """A meta copy of a conditioning structure (floating-point tensors in ``dtype``)."""
    def convert(t: Any) -> Any:
        if not torch.is_tensor(t):
            return t
        return torch.empty(t.shape, device="meta", dtype=dtype if t.is_floating_point() else t.dtype)
    return tree_map(convert, value)


def _structure_key(backbone: Any, roots: dict[str, nn.Module], *settings: Any) -> tuple:
    shapes = tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for root in roots.values()
                   for name, p in root.named_parameters())
    return (type(backbone).__name__, shapes, *settings)


_DRY_RUNS: dict[tuple, tuple[int, int, int]] = {}


def dry_run(backbone: Any, roots: dict[str, nn.Module], resolution: int, checkpointing: bool,
            dtype: torch.dtype, conditioning: Any = None) -> tuple[int, int, int]:
    """Per sample: bytes autograd keeps for the backward pass, bytes of the largest block the backward pass
    recomputes (with checkpointing; else 0), and the peak bytes of one VAE encode.

    A dry run of the backbone's own ``predict`` and ``encode_images`` on the ``meta`` device: every parameter and
    buffer is swapped for a meta tensor of the same shape (floating point in ``dtype``, as under autocast), so
    nothing is allocated or computed; attention runs as the fused kernels do (no attention matrix). Results are
    remembered per model structure and setting. ``conditioning``: one prompt's conditioning as
    ``encode_prompts`` gives it (only its shape is used), when the run has it cached already.
    """
    key = _structure_key(backbone, roots, resolution, checkpointing, dtype)
    if key not in _DRY_RUNS:
        devices = [backbone.device] if backbone.device.type == "cuda" else []
        if conditioning is None:
            with torch.random.fork_rng(devices=devices), torch.no_grad():  # the run's random stream is untouched
                conditioning = backbone.encode_prompts([""])
        with torch.random.fork_rng(devices=devices):
            _DRY_RUNS[key] = _dry_run(backbone, roots, _meta_like(conditioning, dtype), resolution, checkpointing,
                                      dtype)
    return _DRY_RUNS[key]


def _kept_for_backward(run, weights: set[int], units: list[nn.Module]) -> tuple[int, int]:
    """Bytes of the tensors autograd keeps during ``run()`` (weights excluded) and the most kept inside one of
    ``units`` (the blocks gradient checkpointing recomputes one at a time)."""
    kept: dict[int, torch.UntypedStorage] = {}
    per_unit: dict[int, int] = {}
    active: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in weights and key not in kept:
            kept[key] = storage  # held, so that no other storage takes its identity meanwhile
            for unit in active:
                per_unit[unit] = per_unit.get(unit, 0) + storage.nbytes()
        return tensor

    handles = [handle for unit in units for handle in (
        unit.register_forward_pre_hook(lambda m, _args: active.append(id(m))),
        unit.register_forward_hook(lambda m, _args, _out: active.remove(id(m))))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(s.nbytes() for s in kept.values()), max(per_unit.values(), default=0)


def _dry_run(backbone: Any, roots: dict[str, nn.Module], conditioning: Any, resolution: int, checkpointing: bool,
             dtype: torch.dtype) -> tuple[int, int, int]:
    from lora_trainer.train.memory_meter import TensorMemoryMeter

    modules = list(roots.values())
    encoders = [m for m in backbone.frozen_modules() if all(m is not r for r in modules)]
    units = [m for root in modules for m in root.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    side = resolution // 8
    device = backbone.device
    was_training = {m: m.training for m in modules}
    backbone.device = torch.device("meta")
    try:
        for module in modules:
            module.train()
        with _meta_tensors(modules + encoders, dtype if dtype != torch.float32 else None), _fused_attention():
            weights = {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}
            noisy = torch.empty(1, 4, side, side, device="meta", dtype=dtype)
            timesteps = torch.zeros(1, dtype=torch.long, device="meta")

            def forward() -> None:
                backbone.predict(noisy, timesteps, conditioning)

            backbone.set_gradient_checkpointing(False)
            kept, largest_unit = _kept_for_backward(forward, weights, units)
            if checkpointing:
                backbone.set_gradient_checkpointing(True)
                kept = _kept_for_backward(forward, weights, [])[0]
            pixels = torch.empty(1, 3, resolution, resolution, device="meta")
            with TensorMemoryMeter("meta") as encode, torch.no_grad():
                backbone.encode_images(pixels)
        return kept, largest_unit if checkpointing else 0, encode.peak
    finally:
        backbone.device = device
        backbone.set_gradient_checkpointing(False)
        for module, training in was_training.items():
            module.train(training)


# ---- the estimate and the ladder -------------------------------------------------------------------------------
@dataclass
class Model:
    """What the estimate needs from a run, gathered once; ``dry_run(resolution, checkpointing)`` gives the
    per-sample figures of :func:`dry_run` (kept activations, recomputed block, VAE encode peak)."""

    weights: dict[str, int]
    lora_parameters: int
    num_latents: int
    num_prompts: int
    prompt_bytes: int
    dry_run: Any = None
    failure: str | None = None

    def per_sample(self, resolution: int, checkpointing: bool) -> tuple[int, int, int] | None:
        if self.dry_run is None:
            return None
        try:
            return self.dry_run(resolution, checkpointing)
        except Exception as error:  # noqa: BLE001 - a model the dry run cannot run gets no activation figure
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            return None


def estimate(model: Model, settings: Settings, cached_latents: bool) -> Estimate:
    """The peak of a run at ``settings``.

    A training step's peak comes early in the backward pass: the kept activations of the whole batch, plus (with
    checkpointing) the largest block recomputed, plus the gradient flowing through it (as large again), plus the
    LoRA gradients. Latents are encoded one image at a time when cached, a batch at a time otherwise.
    """
    figures = model.per_sample(settings.resolution, settings.gradient_checkpointing)
    step = encode = None
    if figures is not None:
        kept, recomputed, encode_one = figures
        step = settings.batch_size * (kept + 2 * recomputed) + model.lora_parameters * 4
        encode = encode_one * (1 if cached_latents else settings.batch_size)
    caches = cache_bytes(model.num_latents if cached_latents else 0, settings.resolution, model.num_prompts,
                         model.prompt_bytes)
    return Estimate(weights=dict(model.weights), lora=model.lora_parameters * 4,
                    optimizer=optimizer_bytes(model.lora_parameters, settings.optimizer), caches=caches,
                    step=step, encode=encode)


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def eight_bit_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def next_rung(settings: Settings, *, device: torch.device, mid_run: bool = False) -> tuple[Settings, str] | None:
    """One step down the ladder from ``settings`` (the new settings and what changed), or None at the bottom."""
    if settings.batch_size > 1:
        factor = _smallest_factor(settings.batch_size)
        new = dataclasses.replace(settings, batch_size=settings.batch_size // factor,
                                  gradient_accumulation_steps=settings.gradient_accumulation_steps * factor)
        effective = settings.batch_size * settings.gradient_accumulation_steps
        return new, (f"batch_size {settings.batch_size} -> {new.batch_size}, gradient_accumulation_steps "
                     f"{settings.gradient_accumulation_steps} -> {new.gradient_accumulation_steps} "
                     f"(same effective batch {effective})")
    if not settings.gradient_checkpointing:
        return dataclasses.replace(settings, gradient_checkpointing=True), "gradient_checkpointing on"
    if settings.optimizer != "adamw8bit" and eight_bit_available(device) and not mid_run:
        return dataclasses.replace(settings, optimizer="adamw8bit"), "optimizer adamw -> adamw8bit"
    return None


def plan_memory(model: Model, settings: Settings, *, budget: int | None, budget_source: str, device: torch.device,
                cached_latents: bool, auto_fit: bool) -> Plan:
    """Estimate the peak at ``settings``; while it does not fit ``budget``, walk the ladder."""
    usable = None if budget is None else int(budget * HEADROOM)
    plan = Plan(estimate(model, settings, cached_latents), settings, usable, budget_source)
    while not plan.fits:
        step = next_rung(plan.settings, device=device)
        if step is None:
            break
        plan.settings, change = step
        plan.changes.append(change)
        plan.estimate = estimate(model, plan.settings, cached_latents)
    if not plan.fits and plan.settings.optimizer != "adamw8bit" and not eight_bit_available(device):
        plan.notes.append("8-bit AdamW not available (it needs CUDA and bitsandbytes)")
    if not plan.fits:
        plan.notes.append("text-encoder outputs: " + (
            "not cached while the text encoder is trained (train_text_encoder: false caches them)"
            if plan.settings.train_text_encoder else "already cached"))
    while not plan.fits and auto_fit and plan.settings.resolution - 64 >= MIN_AUTO_RESOLUTION:
        lower = plan.settings.resolution - 64
        plan.changes.append(f"resolution {plan.settings.resolution} -> {lower} (auto_fit)")
        plan.settings = dataclasses.replace(plan.settings, resolution=lower)
        plan.estimate = estimate(model, plan.settings, cached_latents)
    if not plan.fits and not auto_fit:
        plan.notes.append("auto_fit: true would also lower the resolution")
    return plan


def plan_run(cfg: Any, backbone: Any, roots: dict[str, nn.Module], device: torch.device, dtype: torch.dtype, *,
             num_latents: int, text_cache: dict | None) -> Plan:
    """The plan of a run about to start: LoRA injected, latents and text-encoder outputs cached as configured."""
    prompt = next(iter(text_cache.values()), None) if text_cache else None
    budget, source = available_memory(device)
    model = Model(
        weights=component_weights(backbone, device), lora_parameters=lora_parameter_count(roots),
        num_latents=num_latents, num_prompts=len(text_cache or {}),
        prompt_bytes=0 if prompt is None else prompt.numel() * prompt.element_size(),
        dry_run=lambda resolution, checkpointing: dry_run(backbone, roots, resolution, checkpointing, dtype,
                                                          None if prompt is None else prompt.unsqueeze(0)))
    if device.type == "cpu" and budget is not None:
        budget += resident_bytes(backbone.frozen_modules(), device)  # the loaded model is part of the estimate
    plan = plan_memory(model, Settings.of(cfg), budget=budget, budget_source=source, device=device,
                       cached_latents=cfg.cache_latents, auto_fit=cfg.auto_fit)
    if model.failure:
        plan.notes.append(f"activations unknown: the dry run of this model failed ({model.failure})")
    return plan

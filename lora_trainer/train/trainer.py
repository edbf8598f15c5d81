"""The training loop: one config and one backbone in, a kohya-format LoRA file out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_trainer.config import TrainConfig, dump_config
from lora_trainer.data.dataset import DatasetScan, TrainItem, load_pixels, scan_dataset
from lora_trainer.fsutil import atomic_write_text, reporting_os_errors
from lora_trainer.lora.export import save_lora
from lora_trainer.lora.inject import inject_lora, load_lora_state_dict, lora_state_dict, remove_lora
from lora_trainer.lora.kohya import to_kohya_state_dict
from lora_trainer.lora.metadata import training_metadata
from lora_trainer.models.backbone import Backbone
from lora_trainer.models.state import restore_model_state, snapshot_model_state
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train import preflight, runs
from lora_trainer.train.distributed import SINGLE, Distributed, PeerLost
from lora_trainer.train.events import CheckpointEvent, EventBus, MessageEvent, SampleEvent, StepEvent
from lora_trainer.train.fast_paths import fast_paths
from lora_trainer.train.layout import RunLayout
from lora_trainer.train.loss_log import LossLog
from lora_trainer.train.memory_plan import Settings as MemorySettings
from lora_trainer.train.memory_plan import plan_run as plan_memory
from lora_trainer.train.micro_batches import MicroBatches
from lora_trainer.train.noise import add_noise, min_snr_weights, sample_noise, sample_timesteps, training_target
from lora_trainer.train.non_finite import NonFiniteLossError, non_finite_message, refuse_non_finite_weights
from lora_trainer.train.oom_guard import OOM_ERRORS, OomGuard, SpillWatch, device_memory_fraction
from lora_trainer.train.optim import apply_update, build_optimizer, build_scheduler
from lora_trainer.train.preflight import StepPlan, resolve_device
from lora_trainer.train.preview import write_preview
from lora_trainer.train.quality import QualityReport, RunWatch, Validators, hold_out, prepare_validation, watch_due
from lora_trainer.train.tensorboard import open_summary_writer
from lora_trainer.train.transfer import to_device

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class TrainResult:
    """How a run ended: ``lora_path`` is set when it finished, ``checkpoint`` when state was saved."""

    steps_done: int
    total_steps: int
    losses: list[float]
    lora_path: Path | None = None
    checkpoint: Path | None = None
    interrupted: bool = False
    sample_paths: list[Path] = field(default_factory=list)
    preview_path: Path | None = None
    quality: QualityReport | None = None  # validation, best step, overfitting alarm, snapshots, grid


class _StoppedWhileCaching(Exception):
    """Interrupt asked for while latents or text embeddings were being cached."""


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "resolve_device", "train"]


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast and the frozen weights (LoRA weights stay float32)."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """A generator per micro-batch, so noise and timesteps depend only on (seed, position): resumable."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step)


class Trainer:
    """Runs one training job. ``should_stop`` is polled every micro-batch (Ctrl-C, the WebUI's Interrupt).

    ``dist`` is this process's place in a data-parallel run (:mod:`lora_trainer.train.distributed`): each
    process trains its share of every batch and only the main one writes files."""

    watch: RunWatch | None = None  # validation, snapshots and grid of the run in progress (the main process's)
    validators: Validators | None = None  # the held-out images' measure (main process), set by run() before the loop
    validating: bool = False  # the run has held-out images (the same in every process)

    def __init__(self, cfg: TrainConfig, backbone: Backbone | None = None, *,
                 events: EventBus | None = None, should_stop: Callable[[], bool] | None = None,
                 restore_backbone: bool = True, dist: Distributed = SINGLE) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.bus = events or EventBus()
        self.should_stop = should_stop or (lambda: False)
        self.restore_backbone = restore_backbone
        self.dist = dist

    # ---- setup ------------------------------------------------------------------------------------
    def _log(self, text: str, level: str = "info") -> None:
        self.bus.emit(MessageEvent(text, level))

    def _load_backbone(self, device: torch.device, dtype: torch.dtype) -> Backbone:
        if self.backbone is None:
            from lora_trainer.models.loading import load_backbone

            self._log(f"loading base model {self.cfg.base_model}")
            self.backbone = load_backbone(self.cfg.base_model, device=device, dtype=dtype)
        if self.cfg.v_parameterization or self.cfg.zero_terminal_snr:
            self.backbone.set_noise_options(v_parameterization=self.cfg.v_parameterization,
                                            zero_terminal_snr=self.cfg.zero_terminal_snr)
        return self.backbone

    def _scan(self) -> DatasetScan:
        cfg = self.cfg
        scan = scan_dataset(cfg.train_data_dir, metadata_path=cfg.metadata_path, trigger_word=cfg.trigger_word,
                            resolution=cfg.resolution, bucket=cfg.bucket)
        for line in scan.warnings():
            self._log(line, "warning")
        return scan

    def _encode_latents(self, items: list[TrainItem]) -> dict[tuple[int, bool], torch.Tensor]:
        """Encode every image once (and its mirror image when flips are on); kept on the training device."""
        torch.manual_seed(self.cfg.seed)
        cache: dict[tuple[int, bool], torch.Tensor] = {}
        flips = (False, True) if self.cfg.flip_aug else (False,)
        for index, item in enumerate(items):
            for flip in flips:
                if self.should_stop():
                    raise _StoppedWhileCaching("caching latents")
                pixels = load_pixels(item, flip=flip).unsqueeze(0)
                cache[(index, flip)] = self.backbone.encode_images(pixels)[0].float()
        return cache

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Check everything that can be checked before the model loads, then train; OSErrors become one line."""
        cfg = self.cfg
        self.dist.refuse_sharding("an image model fits one GPU, so image LoRAs train data-parallel")
        layout = RunLayout.of(cfg)
        device = self.dist.device or resolve_device(cfg.device)
        dtype = resolve_precision(cfg.mixed_precision, device)
        with reporting_os_errors(layout.output_dir):
            return self._run(layout, device, dtype)

    def _run(self, layout: RunLayout, device: torch.device, dtype: torch.dtype) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        dist.on_main(lambda: runs.prepare_output(layout, [layout.lora_file], overwrite=cfg.overwrite,
                                                 log=self._log))  # only the main process writes files
        scan, held_out = hold_out(self._scan(), cfg, self._log)
        self.validating = bool(held_out)
        if dist.enabled:
            dist.agree(runs.data_files(scan, with_times=False), "the training data")
        if self.backbone is None:
            from lora_trainer.models.loading import check_base_model

            check_base_model(cfg.base_model)
        steps = preflight.plan_steps(cfg, scan.items, dist.world_size)
        plan = dist.on_main(lambda: runs.plan_run(cfg, layout, runs.RunIdentity.of(cfg, scan, dist.world_size),
                                                  steps.total, log=lambda text: self._log(text, "warning")))
        for note in plan.notes:
            self._log(note)
        self._log(preflight.estimate_line(cfg, steps, len(scan.items), device, dist.world_size))
        backbone = self._load_backbone(device, dtype)
        states_before = [(m, snapshot_model_state(m)) for m in backbone.frozen_modules()]
        roots: dict = {}
        try:  # from here on, whatever happens, the backbone is put back as it was
            roots = backbone.lora_roots(cfg.train_text_encoder)
            for module in backbone.frozen_modules():
                module.requires_grad_(False)
            def captions_then_denoiser() -> dict | None:
                """The captions' embeddings cached; on the CPU, the text encoders then leave and the denoiser is
                read (host memory, while the VAE still encodes where this runs beside it)."""
                cache = self._text_cache(scan.items) if not cfg.train_text_encoder else None
                if device.type == "cpu":
                    backbone.offload_encoders(vae=False, text_encoders=cache is not None)
                    backbone.load_denoiser()
                return cache

            with backbone.text_encoders_meanwhile(captions_then_denoiser) as cached_captions:  # beside the VAE
                latents = self._encode_latents(scan.items) if cfg.cache_latents else None
            text_cache = cached_captions.result()
            # the encoders leave before the denoiser is read: the text encoders and the UNet never take memory
            # together (on the CPU the UNet's read overlaps the VAE's encoding: the VAE is the smallest part)
            backbone.offload_encoders(vae=latents is not None, text_encoders=text_cache is not None)
            backbone.load_denoiser()
            inject_lora(roots, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        unet_targets=list(cfg.target_modules), te_targets=TE_TARGETS)
            if self._plan_memory(backbone, roots, device, dtype, len(latents or ()), text_cache):
                scan, held_out = hold_out(self._scan(), self.cfg, lambda *_: None)  # auto_fit lowered the resolution
                with backbone.encoders_on_device():
                    latents = self._encode_latents(scan.items) if self.cfg.cache_latents else None
            self.validators = None
            if dist.is_main and held_out:  # the held-out images are encoded once
                with backbone.encoders_on_device():
                    self.validators = prepare_validation(self.cfg, backbone, scan.items, held_out,
                                                         lambda: self._autocast(device, dtype))
            with fast_paths(roots["lora_unet"], channels_last=cfg.channels_last, compile_model=cfg.torch_compile,
                            notify=self._log):
                return self._train(scan, backbone, roots, device, dtype, plan, layout, steps, latents, text_cache)
        except (_StoppedWhileCaching, PeerLost) as stopped:
            resumed = plan.resume
            why = str(stopped) if isinstance(stopped, PeerLost) else f"interrupted while {stopped}"
            self._log(f"{why}; nothing new to save"
                      + (f" (the run can still resume from {resumed.path})" if resumed else ""), "warning")
            return TrainResult(resumed.progress.global_step if resumed else 0, steps.total,
                               list(resumed.progress.losses) if resumed else [],
                               checkpoint=resumed.path if resumed else None, interrupted=True)
        finally:
            backbone.restore_encoders()
            if self.restore_backbone:
                remove_lora(roots)
                backbone.set_gradient_checkpointing(False)
                backbone.release_lora_roots()
                for module, state in states_before:
                    restore_model_state(module, state)

    def _plan_memory(self, backbone: Backbone, roots: dict, device: torch.device, dtype: torch.dtype,
                     num_latents: int, text_cache: dict | None) -> bool:
        """Print the memory plan and train with its settings (the effective config written at the end says
        them); True when it changed the resolution."""
        plan = plan_memory(self.cfg, backbone, roots, device, dtype, num_latents=num_latents,
                           text_cache=text_cache)
        for line in plan.report():
            self._log(line, "info" if plan.fits and not plan.changes else "warning")
        resolution = self.cfg.resolution
        settings = self.dist.from_main(plan.settings if plan.changes else None)  # every process the same
        if settings is not None:
            self.cfg = dataclasses.replace(self.cfg, **dataclasses.asdict(settings))
        return self.cfg.resolution != resolution

    def _train(self, scan: DatasetScan, backbone: Backbone, roots: dict, device: torch.device,
               dtype: torch.dtype, plan: runs.RunPlan, layout: RunLayout, steps: StepPlan, latents: dict | None,
               text_cache: dict | None) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        items = scan.items
        for p in (p for m in roots.values() for p in m.parameters() if p.requires_grad):
            p.data = p.data.float()
        unet_params = [p for p in roots["lora_unet"].parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": cfg.learning_rate}]
        te_params = [p for name, m in roots.items() if name != "lora_unet" for p in m.parameters() if p.requires_grad]
        if te_params:
            groups.append({"params": te_params, "lr": cfg.resolved_text_encoder_lr()})
        all_params = unet_params + te_params
        total = steps.total
        stream = MicroBatches(items, cfg.batch_size * dist.world_size, cfg.seed, cfg.repeats)
        optimizer = build_optimizer(cfg, groups, device, notify=self.bus.emit)
        scheduler = build_scheduler(cfg, optimizer, total)
        progress = ckpt.Progress(started_at=time.time())
        if plan.resume is not None:
            progress = ckpt.restore_training_state(plan.resume, lambda state: load_lora_state_dict(roots, state),
                                                   optimizer, scheduler, "LoRA layers")
            self._log(f"resumed from {plan.resume.path} at step {progress.global_step}/{total}")
        backbone.set_gradient_checkpointing(cfg.gradient_checkpointing)
        for module in roots.values():
            module.train()
        scaler = torch.cuda.amp.GradScaler() if device.type == "cuda" and dtype == torch.float16 else None
        writer = self._tensorboard(layout) if dist.is_main else None
        result = TrainResult(progress.global_step, total, progress.losses,
                             checkpoint=plan.resume.path if plan.resume else None)
        loss_log = LossLog(every_seconds=LossLog.interval_for(device))
        guard = OomGuard(MemorySettings.of(cfg), device)
        spill = SpillWatch(lambda: device_memory_fraction(device))
        if dist.is_main:
            self.watch = RunWatch(
                cfg, backbone, roots, self.validators, self.bus, writer, plan.resume.path if plan.resume else None,
                metadata=lambda step: self._metadata(dataclasses.replace(progress, global_step=step), scan, total),
                fallback_prompt=items[0].caption)
        watch, early_stopped = self.watch, False

        def log_steps() -> None:
            """Read every pending step's loss in one host transfer; report it, or stop on a non-finite one."""
            logged = loss_log.flush()
            for entry in logged:
                if not math.isfinite(entry.loss):
                    raise NonFiniteLossError(non_finite_message(entry.loss, entry.step, total, result.checkpoint,
                                                                cfg.learning_rate))
                progress.losses.append(entry.loss)
                self.bus.emit(StepEvent(entry.step, total, entry.epoch, entry.loss, entry.lr, entry.seconds))
                if writer:
                    writer.add_scalar("loss", entry.loss, entry.step)
                    writer.add_scalar("lr", entry.lr, entry.step)
            if logged and (warning := spill.observe(logged[-1].seconds, len(logged))):
                self._log(warning, "warning")

        stopping = False  # data-parallel: a stop asked for on any process, agreed at the last update
        try:
            while progress.global_step < total:
                if stopping or (not dist.enabled and self.should_stop()):
                    result.interrupted = True
                    break
                guard.begin(progress.micro_step)
                epoch_before = stream.epoch_of(progress.micro_step)
                optimizer.zero_grad(set_to_none=True)
                micro_losses = []
                failure = None
                try:
                    for _ in range(cfg.gradient_accumulation_steps):
                        indices = stream.at(progress.micro_step)
                        gen = step_generator(cfg.seed, progress.micro_step)
                        with self._autocast(device, dtype):
                            loss = self._micro_loss(indices, items, latents, text_cache, gen, device)
                        if loss is not None:  # None: this process's share of a short batch is empty
                            scaled = loss / cfg.gradient_accumulation_steps
                            (scaler.scale(scaled) if scaler else scaled).backward()
                            loss = loss.detach()
                        micro_losses.append(loss)
                        progress.micro_step += 1
                except OOM_ERRORS as error:
                    failure = error.with_traceback(None)  # its frames would keep the failed step's tensors alive
                if dist.enabled:
                    micro_losses, stopping, failure = self._sync_update(all_params, micro_losses, failure)
                if failure is not None:
                    loss = scaled = micro_losses = None
                    settings, change, progress.micro_step = guard.recover(failure, optimizer)
                    cfg = self.cfg = dataclasses.replace(cfg, **dataclasses.asdict(settings))
                    stream = MicroBatches(items, cfg.batch_size * dist.world_size, cfg.seed, cfg.repeats)
                    backbone.set_gradient_checkpointing(cfg.gradient_checkpointing)
                    self._log(f"out of memory at step {progress.global_step + 1}; {change}; the step runs again",
                              "warning")
                    continue
                lr = apply_update(optimizer, scheduler, all_params, cfg.max_grad_norm, scaler)
                progress.global_step += 1
                epoch = stream.epoch_of(progress.micro_step)
                loss_log.add(progress.global_step, epoch, lr, micro_losses)
                saving = cfg.save_steps and progress.global_step % cfg.save_steps == 0
                sampling = cfg.sample_every and progress.global_step % cfg.sample_every == 0
                new_epoch = epoch > epoch_before
                watching = watch_due(cfg, self.validating, progress.global_step, epoch, new_epoch, total)
                if loss_log.due() or ((saving or sampling) and progress.global_step < total) or watching:
                    log_steps()  # also the non-finite check: nothing after a bad step is ever saved
                if watching and dist.on_main(functools.partial(RunWatch.after_update, watch, progress.global_step,
                                                               epoch, new_epoch, total)):
                    early_stopped = True  # overfitting: the main process validated, every process stops here
                    break
                if saving and progress.global_step < total:
                    result.checkpoint = self._save_checkpoint(plan, progress, roots, optimizer, scheduler)
                if sampling and progress.global_step < total:
                    result.sample_paths += self._samples(layout, progress.global_step, writer)
        except KeyboardInterrupt:
            result.interrupted = True
        except PeerLost as lost:  # the update in flight was not applied: the run stands at its start
            self._log(str(lost), "warning")
            progress.micro_step = guard.rollback()
            result.interrupted = True
        finally:
            try:
                log_steps()
            finally:
                if writer:
                    writer.flush()
                    if not (result.interrupted or progress.global_step >= total or early_stopped):
                        writer.close()  # an error: nothing more comes
        result.steps_done = progress.global_step
        result.losses = progress.losses
        if result.interrupted:
            if progress.global_step > (plan.resume.progress.global_step if plan.resume else 0):
                result.checkpoint = self._save_checkpoint(plan, progress, roots, optimizer, scheduler)
                self._log(f"interrupted at step {progress.global_step}/{total}; checkpoint saved to "
                          f"{result.checkpoint} (resume with resume_from: latest)", "warning")
            elif result.checkpoint is not None:
                self._log(f"interrupted at step {progress.global_step}/{total}; {result.checkpoint} is kept "
                          "(resume with resume_from: latest)", "warning")
            else:
                self._log("interrupted before the first step; nothing to save", "warning")
            if writer:
                writer.close()
            return result
        if not dist.is_main:  # the main process writes the outputs; the others are done
            result.lora_path = layout.lora_file
            return result
        exported = watch.before_export(progress)  # early stop: the best step's weights
        if cfg.sample_prompts:
            result.sample_paths += self._samples(layout, exported.global_step, writer)
        result.lora_path = self._export(layout, exported, roots, scan, total)
        result.quality = watch.finish(result.lora_path, exported.global_step, self.should_stop)
        if writer:
            writer.close()
        atomic_write_text(layout.config_file, dump_config(cfg))  # only now: a failed run leaves the old one
        runs.mark_finished(plan, result.lora_path)
        if cfg.preview:
            result.preview_path = self._preview(scan, exported.global_step)
        return result

    def _sync_update(self, params: list[torch.Tensor], micro_losses: list[torch.Tensor | None],
                     failure: BaseException | None) -> tuple[list[torch.Tensor], bool, BaseException | None]:
        """Data-parallel: sum the gradients and losses over the processes and agree on stopping and on running
        the update again (out of memory anywhere); the global losses, the stop and the failure to recover from."""
        missing = self.cfg.gradient_accumulation_steps - len(micro_losses)  # a failure cut them short
        sync = self.dist.sync_update(params, micro_losses + [None] * missing, stop=self.should_stop(),
                                     failed=failure is not None)
        if sync.failed and failure is None:
            failure = torch.cuda.OutOfMemoryError("CUDA out of memory in another process of this run")
        return sync.losses, sync.stop, failure

    # ---- pieces of a step -------------------------------------------------------------------------
    @staticmethod
    def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
        """The step's autocast context: mixed precision on CUDA, nothing elsewhere."""
        if device.type == "cuda" and dtype != torch.float32:
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _captions(self, indices: list[int], items: list[TrainItem], gen: torch.Generator) -> list[str]:
        drop = torch.rand(len(indices), generator=gen).tolist()
        return ["" if d < self.cfg.caption_dropout else items[i].caption for i, d in zip(indices, drop, strict=True)]

    def _text_cache(self, items: list[TrainItem]) -> dict[str, torch.Tensor]:
        prompts = sorted({item.caption for item in items} | {""})
        cache: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            per_call = max(1, self.backbone.prompts_per_call)
            for start in range(0, len(prompts), per_call):
                if self.should_stop():
                    raise _StoppedWhileCaching("caching text embeddings")
                chunk = prompts[start:start + per_call]
                cache.update(zip(chunk, self.backbone.encode_prompts(chunk).detach(), strict=True))
        return cache

    def _micro_loss(self, indices: list[int], items: list[TrainItem], latents: dict | None,
                    text_cache: dict | None, gen: torch.Generator, device: torch.device) -> torch.Tensor | None:
        cfg, backbone = self.cfg, self.backbone
        flips = (torch.rand(len(indices), generator=gen) < 0.5).tolist() if cfg.flip_aug else [False] * len(indices)
        captions = self._captions(indices, items, gen)
        batch, share = len(indices), self.dist.share(len(indices))  # drawn for the global batch, this share kept
        indices, flips, captions = indices[share], flips[share], captions[share]
        if not indices:
            return None
        if latents is not None:
            x0 = torch.stack([latents[(i, f)] for i, f in zip(indices, flips, strict=True)])
        else:
            pixels = torch.stack([load_pixels(items[i], flip=f) for i, f in zip(indices, flips, strict=True)])
            x0 = backbone.encode_images(pixels).float()
        x0 = x0.to(device)
        noise = sample_noise(x0, gen, cfg.noise_offset, batch=batch, rows=share)
        timesteps = sample_timesteps(batch, len(backbone.alphas_cumprod), gen)[share]
        noisy = add_noise(x0, noise, timesteps, backbone.alphas_cumprod)
        if text_cache is not None:
            cond = torch.stack([text_cache[c] for c in captions]).to(device)
        else:
            cond = backbone.encode_prompts(captions)
        cond = backbone.add_size_conditioning(cond, [items[i] for i in indices])
        model_dtype = getattr(backbone, "dtype", torch.float32)
        pred = backbone.predict(noisy.to(model_dtype), to_device(timesteps, device), cond).float()
        target = training_target(x0, noise, timesteps, backbone.alphas_cumprod, backbone.prediction_type)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            weights = min_snr_weights(timesteps, backbone.alphas_cumprod, cfg.min_snr_gamma, backbone.prediction_type)
            per_sample = per_sample * weights.to(per_sample.device)
        # data-parallel: the share's part of the global batch's mean, so the processes' gradients sum to it
        return per_sample.sum() / batch if self.dist.enabled else per_sample.mean()

    # ---- outputs ----------------------------------------------------------------------------------
    def _tensorboard(self, layout: RunLayout):
        return open_summary_writer(layout.log_dir, notify=self.bus.emit)

    def _samples(self, layout: RunLayout, step: int, writer) -> list[Path]:
        cfg = self.cfg
        if not self.dist.is_main:
            return []
        with torch.random.fork_rng(devices=[]):
            images = self.backbone.sample(list(cfg.sample_prompts), seed=cfg.seed, steps=cfg.sample_steps,
                                          width=cfg.resolution, height=cfg.resolution)
        for module in self.backbone.lora_roots(cfg.train_text_encoder).values():
            module.train()
        layout.samples_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            path = layout.sample_file(step, index)
            image.save(path)
            paths.append(path)
            if writer:
                import numpy as np

                writer.add_image(f"sample/{index}", np.asarray(image), step, dataformats="HWC")
        self.bus.emit(SampleEvent(step, paths, images))
        return paths

    def _preview(self, scan: DatasetScan, step: int) -> Path | None:
        """The LoRA's card picture; failing to render it costs the picture, not the saved LoRA."""
        try:
            path, image = write_preview(self.backbone, self.cfg, [item.caption for item in scan.items])
        except Exception as err:  # noqa: BLE001 - the LoRA is saved already; say why there is no picture
            self._log(f"no preview picture: rendering it failed ({type(err).__name__}: {err})", "warning")
            return None
        self._log(f"preview {path}")
        self.bus.emit(SampleEvent(step, [path], [image]))
        return path

    def _metadata(self, progress: ckpt.Progress, scan: DatasetScan, total: int) -> dict[str, str]:
        cfg = self.cfg
        return training_metadata(
            cfg=cfg, model_version=self.backbone.model_version, prediction_type=self.backbone.prediction_type,
            captions=[item.caption for item in scan.items], steps=progress.global_step, total_steps=total,
            started_at=progress.started_at, num_images=len(scan.items),
            buckets=sorted({item.target for item in scan.items}), processes=self.dist.world_size)

    def _save_checkpoint(self, plan: runs.RunPlan, progress: ckpt.Progress, roots: dict, optimizer,
                         scheduler) -> Path:
        if not self.dist.is_main:  # the main process writes it (the state is the same in every process)
            return ckpt.step_folder(plan.run_dir, progress.global_step)
        path = ckpt.save_checkpoint(plan.run_dir, progress, lora_state_dict(roots), optimizer, scheduler,
                                    extra_files=self.watch.checkpoint_files() if self.watch else None)
        self.bus.emit(CheckpointEvent(progress.global_step, path))
        return path

    def _export(self, layout: RunLayout, progress: ckpt.Progress, roots: dict, scan: DatasetScan,
                total: int) -> Path:
        cfg = self.cfg
        kohya = to_kohya_state_dict(roots, cfg.lora_alpha)
        refuse_non_finite_weights(kohya, "LoRA")
        path = save_lora(layout.lora_file, kohya, self._metadata(progress, scan, total), overwrite=cfg.overwrite)
        self._log(f"saved {path}")
        return path


def train(cfg: TrainConfig, backbone: Backbone | None = None, **kwargs: Any) -> TrainResult:
    """Run a training job (see :class:`Trainer`)."""
    return Trainer(cfg, backbone, **kwargs).run()

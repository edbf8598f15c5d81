"""The text-generation training loop: a local causal LM and a folder of examples in, a peft adapter folder out.

The run machinery of image LoRAs: checks before the model loads (preflight), a run identity that includes the
data files (only the same run resumes; its checkpoints live and are pruned in its own folder), events for the
progress bar, TensorBoard, ``save_steps`` checkpoints, Ctrl-C saves a checkpoint, ``resume_from`` continues with
the same loss sequence, a NaN loss stops the run with nothing after it saved, outputs written atomically inside
``output_dir`` and never over an existing one unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config import TrainConfig, dump_config
from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text, reporting_os_errors
from lora_trainer.llm.adapter import add_lora, load_trainable_state, trainable_state
from lora_trainer.llm.batches import collate, split_validation, supervised_tokens
from lora_trainer.llm.dataset import DataReport, TokenizedExample, load_text_dataset
from lora_trainer.llm.evaluate import evaluate
from lora_trainer.llm.export import save_adapter, save_merged_model
from lora_trainer.llm.generate import generate_answers
from lora_trainer.llm.layout import TextRunLayout
from lora_trainer.llm.model import check_model_folder, check_quantization, load_causal_lm, load_tokenizer
from lora_trainer.llm.prompting import PromptRenderer
from lora_trainer.llm.records import data_file_stamps
from lora_trainer.llm.sharded import build_sharded_model, check_sharding
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train import preflight, runs
from lora_trainer.train.distributed import SINGLE, Distributed, PeerLost
from lora_trainer.train.events import CheckpointEvent, EvalEvent, EventBus, MessageEvent, SampleEvent, StepEvent
from lora_trainer.train.loss_log import LossLog
from lora_trainer.train.micro_batches import MicroBatches
from lora_trainer.train.non_finite import NonFiniteLossError, non_finite_message, refuse_non_finite_weights
from lora_trainer.train.oom_guard import UpdateStart
from lora_trainer.train.optim import apply_update, build_optimizer, build_scheduler
from lora_trainer.train.tensorboard import open_summary_writer
from lora_trainer.train.trainer import TrainResult, resolve_device, resolve_precision


@dataclass
class TextTrainResult(TrainResult):
    """A finished run's ``lora_path`` is the adapter folder; ``merged_path`` the merged model (when asked for)."""

    merged_path: Path | None = None
    evals: list[EvalEvent] = field(default_factory=list)
    report: DataReport | None = None


@dataclass
class _Run:
    """What the loop works with, set up by :meth:`TextTrainer.run`."""

    model: Any
    tokenizer: Any
    renderer: PromptRenderer
    train_set: list[TokenizedExample]
    val_set: list[TokenizedExample]
    device: torch.device
    dtype: torch.dtype
    pad_id: int
    layout: TextRunLayout
    plan: runs.RunPlan
    writer: Any = None

    def autocast(self) -> Any:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


class TextTrainer:
    """Runs one text-generation job. ``should_stop`` is polled before every update (Ctrl-C).

    ``dist``: this process's place in a data-parallel run (:mod:`lora_trainer.train.distributed`); each process
    takes its share of every batch, weighted by its supervised tokens, and only the main process writes files."""

    def __init__(self, cfg: TrainConfig, *, events: EventBus | None = None,
                 should_stop: Callable[[], bool] | None = None, dist: Distributed = SINGLE) -> None:
        self.cfg = cfg
        self.bus = events or EventBus()
        self.should_stop = should_stop or (lambda: False)
        self.dist = dist
        self.model: Any = None  # the peft model once set up (tests compare it with the saved adapter)

    def _log(self, text: str, level: str = "info") -> None:
        self.bus.emit(MessageEvent(text, level))

    @property
    def _runs_main_forwards(self) -> bool:
        """Whether this process runs the evaluation and samples: the main one, or every one when the weights are
        sharded (each forward then gathers them from all); only the main one writes."""
        return self.dist.is_main or self.dist.sharding is not None

    # ---- setup ------------------------------------------------------------------------------------
    def run(self) -> TextTrainResult:
        """Check what can be checked before the model loads, then train; OSErrors become one line."""
        cfg = self.cfg
        if cfg.task_type != "text-generation":
            raise UserError(f"task_type: {cfg.task_type!r} is trained by lora_trainer.train.trainer, not here")
        layout = TextRunLayout.of(cfg)
        device = self.dist.device or resolve_device(cfg.device)
        dtype = resolve_precision(cfg.mixed_precision, device)
        with reporting_os_errors(layout.output_dir):
            return self._run(layout, device, dtype)

    def _run(self, layout: TextRunLayout, device: torch.device, dtype: torch.dtype) -> TextTrainResult:
        cfg, dist = self.cfg, self.dist
        check_model_folder(cfg.base_model, cfg.trust_remote_code)  # nothing is written for a model that cannot load
        check_quantization(cfg.load_in_4bit, device)
        if dist.sharding is not None:
            check_sharding(cfg)
        outputs = [layout.adapter_dir] + ([layout.merged_dir] if cfg.save_merged else [])
        dist.on_main(lambda: runs.prepare_output(layout, outputs, overwrite=cfg.overwrite, log=self._log))
        tokenizer = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
        renderer = PromptRenderer(tokenizer)
        if not renderer.uses_chat_template:
            self._log("the tokenizer has no chat template; examples use the plain '### Instruction / "
                      "### Response' format")
        data = load_text_dataset(cfg.train_data_dir, tokenizer, renderer, max_seq_length=cfg.max_seq_length,
                                 train_on_prompt=cfg.train_on_prompt)
        self._log(data.report.summary())
        for line in data.report.warnings():
            self._log(line, "warning")
        dist.on_main(lambda: atomic_write_text(layout.data_report_file, data.report.text()))
        train_set, val_set = split_validation(data.examples, cfg.validation_split, cfg.seed)
        steps = preflight.plan_steps(cfg, train_set, dist.world_size)
        files = data_file_stamps(cfg.train_data_dir)
        dist.agree(files, "the training data")
        identity = runs.RunIdentity(cfg.output_name, files, runs.weight_settings(cfg, dist.world_size))
        plan = dist.on_main(lambda: runs.plan_run(cfg, layout, identity, steps.total,
                                                  log=lambda text: self._log(text, "warning")))
        for note in plan.notes:
            self._log(note)
        self._log(self._plan_line(steps, len(train_set), len(val_set)))
        self._log(f"loading base model {cfg.base_model}")
        if dist.sharding is not None:
            self._log(f"sharding the base model's weights over {dist.world_size} processes (FSDP)")
            model = build_sharded_model(cfg, device=device, dtype=dtype, dist=dist)
        else:
            model = load_causal_lm(cfg.base_model, device=device, dtype=dtype,
                                   trust_remote_code=cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
            torch.manual_seed(cfg.seed)  # the LoRA weights start the same in every run of this config
            model = add_lora(model, cfg)
        self.model = model
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run = _Run(model, tokenizer, renderer, train_set, val_set, device, dtype, pad_id or 0, layout, plan)
        result = self._train(run, steps.total)
        result.report = data.report
        if not result.interrupted:
            if dist.is_main:
                self._export(run, result)
            else:  # the main process writes the outputs; the others are done
                result.lora_path = layout.adapter_dir
        return result

    def _plan_line(self, steps: preflight.StepPlan, examples: int, held_out: int) -> str:
        cfg = self.cfg
        held = f" (+{held_out} held out)" if held_out else ""
        return (f"plan: {steps.total} steps ({steps.total / steps.updates_per_epoch:.3g} epochs of "
                f"{steps.updates_per_epoch} steps; {examples} examples{held} x {cfg.repeats} repeats, batch "
                f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}{self._processes()}, at most "
                f"{cfg.max_seq_length} tokens each)")

    def _processes(self) -> str:
        cfg, processes = self.cfg, self.dist.world_size
        if processes == 1:
            return ""
        return f" x {processes} processes = {cfg.batch_size * cfg.gradient_accumulation_steps * processes} per step"

    # ---- the loop ---------------------------------------------------------------------------------
    def _train(self, run: _Run, total: int) -> TextTrainResult:
        cfg, model, plan = self.cfg, run.model, run.plan
        params = [p for p in model.parameters() if p.requires_grad]
        stream = MicroBatches(run.train_set, cfg.batch_size * self.dist.world_size, cfg.seed, cfg.repeats)
        optimizer = build_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}], run.device,
                                    notify=self.bus.emit)
        scheduler = build_scheduler(cfg, optimizer, total)
        progress = ckpt.Progress(started_at=time.time())
        if plan.resume is not None:
            progress = ckpt.restore_training_state(plan.resume, lambda state: load_trainable_state(model, state),
                                                   optimizer, scheduler, "adapter")
            self._log(f"resumed from {plan.resume.path} at step {progress.global_step}/{total}")
        model.train()
        run.writer = open_summary_writer(run.layout.log_dir, notify=self.bus.emit) if self.dist.is_main else None
        result = TextTrainResult(progress.global_step, total, progress.losses,
                                 checkpoint=plan.resume.path if plan.resume else None)
        try:
            self._updates(run, result, progress, stream, optimizer, scheduler, params)
            result.steps_done, result.losses = progress.global_step, progress.losses
            if result.interrupted:
                self._keep_on_interrupt(run, result, progress, optimizer, scheduler)
            elif self._runs_main_forwards:
                if run.val_set:
                    result.evals.append(self._evaluate(run, progress.global_step))
                if cfg.sample_prompts:
                    result.sample_paths += self._samples(run, progress.global_step)
        finally:
            if run.writer:
                run.writer.close()
        return result

    def _updates(self, run: _Run, result: TextTrainResult, progress: ckpt.Progress, stream: MicroBatches,
                 optimizer: Any, scheduler: Any, params: list) -> None:
        """Updates until ``result.total_steps``; sets ``result.interrupted`` when a stop was asked for (Ctrl-C)."""
        cfg, total, dist = self.cfg, result.total_steps, self.dist
        scaler = torch.cuda.amp.GradScaler() if run.device.type == "cuda" and run.dtype == torch.float16 else None
        loss_log = LossLog(every_seconds=LossLog.interval_for(run.device))

        def log_steps() -> None:
            """Read the pending losses in one transfer; report them, or stop on a non-finite one."""
            for entry in loss_log.flush():
                if not math.isfinite(entry.loss):
                    raise NonFiniteLossError(non_finite_message(entry.loss, entry.step, total, result.checkpoint,
                                                                cfg.learning_rate))
                progress.losses.append(entry.loss)
                self.bus.emit(StepEvent(entry.step, total, entry.epoch, entry.loss, entry.lr, entry.seconds))
                if run.writer:
                    run.writer.add_scalar("loss", entry.loss, entry.step)
                    run.writer.add_scalar("lr", entry.lr, entry.step)

        stopping = False  # data-parallel: a stop asked for on any process, agreed at the last update
        start: UpdateStart | None = None
        try:
            while progress.global_step < total:
                if stopping or (not dist.enabled and self.should_stop()):
                    result.interrupted = True
                    break
                if dist.enabled:
                    start = UpdateStart.capture(progress.micro_step, run.device)
                optimizer.zero_grad(set_to_none=True)
                micro_losses = self._accumulate(run, progress, stream, scaler)
                if dist.enabled:  # sum the gradients and losses over the processes, agree on stopping
                    sync = dist.sync_update(params, micro_losses, stop=self.should_stop(), failed=False)
                    micro_losses, stopping = sync.losses, sync.stop
                lr = apply_update(optimizer, scheduler, params, cfg.max_grad_norm, scaler)
                progress.global_step += 1
                loss_log.add(progress.global_step, stream.epoch_of(progress.micro_step), lr, micro_losses)
                periodic = progress.global_step < total and any(
                    every and progress.global_step % every == 0
                    for every in (cfg.save_steps, cfg.eval_every if run.val_set else 0, cfg.sample_every))
                if loss_log.due() or periodic:
                    log_steps()  # also the non-finite check: nothing after a bad step is ever saved
                if periodic:
                    self._periodic(run, result, progress, optimizer, scheduler)
        except KeyboardInterrupt:
            result.interrupted = True
        except PeerLost as lost:  # the update in flight was not applied: the run stands at its start
            self._log(str(lost), "warning")
            progress.micro_step = start.restore() if start else progress.micro_step
            result.interrupted = True
        finally:
            log_steps()

    def _accumulate(self, run: _Run, progress: ckpt.Progress, stream: MicroBatches, scaler: Any
                    ) -> list[torch.Tensor | None]:
        """Forward and backward ``gradient_accumulation_steps`` micro-batches; their losses (on the device).

        Data-parallel, each process takes its share of the global micro-batch and weights its loss (the mean over
        its supervised tokens) by its share of the batch's supervised tokens: the processes' losses and gradients
        sum to those of the global batch. None: this process's share had no supervised token."""
        steps = self.cfg.gradient_accumulation_steps
        losses: list[torch.Tensor | None] = []
        for _ in range(steps):
            examples = [run.train_set[index] for index in stream.at(progress.micro_step)]
            weight = 1.0
            if self.dist.enabled:
                everyone, share = supervised_tokens(examples), examples[self.dist.share(len(examples))]
                weight = supervised_tokens(share) / max(everyone, 1)
                examples = share or examples[:1]  # sharded: every process runs every forward (a null one here)
            loss = None
            if not weight and self.dist.sharding is not None:
                self._null_step(run, examples)
            elif weight:
                batch = {k: v.to(run.device) for k, v in collate(examples, run.pad_id).items()}
                with run.autocast():
                    loss = run.model(**batch).loss.float()
                if self.dist.enabled:
                    loss = loss * weight
                (scaler.scale(loss / steps) if scaler else loss / steps).backward()
                loss = loss.detach()
            losses.append(loss)
            progress.micro_step += 1
        return losses

    def _null_step(self, run: _Run, examples: list[TokenizedExample]) -> None:
        """A forward and backward that change no gradient, for a process whose share of a batch has no trained
        token while the weights are sharded: the others need its part of every gather."""
        batch = {k: v.to(run.device) for k, v in collate(examples, run.pad_id).items()}
        with run.autocast():
            logits = run.model(**batch).logits
        (logits.float().sum() * 0.0).backward()

    def _periodic(self, run: _Run, result: TextTrainResult, progress: ckpt.Progress, optimizer: Any,
                  scheduler: Any) -> None:
        """Checkpoint, evaluation and samples due after this update (the final ones come after the loop)."""
        cfg, step = self.cfg, progress.global_step
        if cfg.save_steps and step % cfg.save_steps == 0:
            result.checkpoint = self._save_checkpoint(run, progress, optimizer, scheduler)
        if not self._runs_main_forwards:  # evaluation and samples: the main process's
            return
        if cfg.eval_every and run.val_set and step % cfg.eval_every == 0:
            result.evals.append(self._evaluate(run, step))
        if cfg.sample_every and step % cfg.sample_every == 0:
            result.sample_paths += self._samples(run, step)

    # ---- outputs ----------------------------------------------------------------------------------
    def _keep_on_interrupt(self, run: _Run, result: TextTrainResult, progress: ckpt.Progress, optimizer: Any,
                           scheduler: Any) -> None:
        """Save the state reached (unless nothing new was done since the checkpoint resumed) and say how to go on."""
        where = f"interrupted at step {progress.global_step}/{result.total_steps}"
        if progress.global_step > (run.plan.resume.progress.global_step if run.plan.resume else 0):
            result.checkpoint = self._save_checkpoint(run, progress, optimizer, scheduler)
            self._log(f"{where}; checkpoint saved to {result.checkpoint} (resume with resume_from: latest)", "warning")
        elif result.checkpoint is not None:
            self._log(f"{where}; {result.checkpoint} is kept (resume with resume_from: latest)", "warning")
        else:
            self._log("interrupted before the first step; nothing to save", "warning")

    def _save_checkpoint(self, run: _Run, progress: ckpt.Progress, optimizer: Any, scheduler: Any) -> Path:
        if not self.dist.is_main:  # the main process writes it (the state is the same in every process)
            return ckpt.step_folder(run.plan.run_dir, progress.global_step)
        path = ckpt.save_checkpoint(run.plan.run_dir, progress, trainable_state(run.model), optimizer, scheduler)
        self.bus.emit(CheckpointEvent(progress.global_step, path))
        return path

    def _export(self, run: _Run, result: TextTrainResult) -> None:
        """The adapter (and merged model) folders, the effective config, and the run marked finished."""
        cfg, layout = self.cfg, run.layout
        refuse_non_finite_weights(trainable_state(run.model), "adapter")
        result.lora_path = save_adapter(run.model, layout.adapter_dir, overwrite=cfg.overwrite)
        self._log(f"saved adapter {result.lora_path}")
        if cfg.save_merged:
            self._log("merging the adapter into the base model")
            result.merged_path = save_merged_model(cfg.base_model, layout.adapter_dir, layout.merged_dir,
                                                   overwrite=cfg.overwrite, trust_remote_code=cfg.trust_remote_code)
            self._log(f"saved merged model {result.merged_path}")
        atomic_write_text(layout.config_file, dump_config(cfg))  # only now: a failed run leaves the old one
        runs.mark_finished(run.plan, result.lora_path)

    def _evaluate(self, run: _Run, step: int) -> EvalEvent:
        loss, perplexity = evaluate(run.model, run.val_set, pad_id=run.pad_id, batch_size=self.cfg.batch_size,
                                    autocast=run.autocast)
        event = EvalEvent(step, loss, perplexity)
        if run.writer:
            run.writer.add_scalar("eval/loss", loss, step)
            run.writer.add_scalar("eval/perplexity", perplexity, step)
        self.bus.emit(event)
        return event

    def _samples(self, run: _Run, step: int) -> list[Path]:
        """Answer every sample prompt (greedy) into ``samples/<name>/step-NNNNNN.md``, TensorBoard and an event."""
        prompts = list(self.cfg.sample_prompts)
        with torch.random.fork_rng(devices=[]), run.autocast():
            answers = generate_answers(run.model, run.tokenizer, run.renderer, prompts,
                                       max_new_tokens=self.cfg.sample_max_new_tokens)
        pairs = list(zip(prompts, answers, strict=True))
        if not self.dist.is_main:  # sharded: every process generated, the main one writes
            return []
        path = atomic_write_text(run.layout.text_sample_file(step),
                                 "".join(f"## {prompt}\n\n{answer}\n\n" for prompt, answer in pairs))
        if run.writer:
            for index, (prompt, answer) in enumerate(pairs):
                run.writer.add_text(f"sample/{index}", f"**{prompt}**\n\n{answer}", step)
        self.bus.emit(SampleEvent(step, [path], texts=[f"{prompt!r} -> {answer!r}" for prompt, answer in pairs]))
        return [path]


def train_text(cfg: TrainConfig, **kwargs: Any) -> TextTrainResult:
    """Run a text-generation training job (see :class:`TextTrainer`)."""
    return TextTrainer(cfg, **kwargs).run()

"""The text-generation training loop: a local causal LM and a folder of examples in, a peft adapter folder out.

Same run semantics as image LoRAs: events for the progress bar, TensorBoard, ``save_steps`` checkpoints, Ctrl-C
saves a checkpoint, ``resume_from`` continues with the same loss sequence, outputs written atomically and never
over an existing one unless ``overwrite``.
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
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.llm.adapter import add_lora, load_trainable_state, trainable_state
from lora_trainer.llm.batches import EpochOrder, collate, split_validation
from lora_trainer.llm.dataset import DataReport, TokenizedExample, load_text_dataset
from lora_trainer.llm.evaluate import evaluate
from lora_trainer.llm.export import output_folder, save_adapter, save_merged_model
from lora_trainer.llm.generate import generate_answers
from lora_trainer.llm.model import check_model_folder, check_quantization, load_causal_lm, load_tokenizer
from lora_trainer.llm.prompting import PromptRenderer
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train.events import CheckpointEvent, EvalEvent, EventBus, MessageEvent, SampleEvent, StepEvent
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
    writer: Any = None

    def autocast(self) -> Any:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


class TextTrainer:
    """Runs one text-generation job. ``should_stop`` is polled before every update (Ctrl-C)."""

    def __init__(self, cfg: TrainConfig, *, events: EventBus | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.bus = events or EventBus()
        self.should_stop = should_stop or (lambda: False)
        self.output_dir = Path(cfg.output_dir)
        self.model: Any = None  # the peft model once set up (tests compare it with the saved adapter)

    def _log(self, text: str, level: str = "info") -> None:
        self.bus.emit(MessageEvent(text, level))

    # ---- setup ------------------------------------------------------------------------------------
    def run(self) -> TextTrainResult:
        cfg = self.cfg
        if cfg.task_type != "text-generation":
            raise UserError(f"task_type: {cfg.task_type!r} is trained by lora_trainer.train.trainer, not here")
        device = resolve_device(cfg.device)
        dtype = resolve_precision(cfg.mixed_precision, device)
        adapter_dir = output_folder(cfg.output_dir, cfg.output_name)
        merged_dir = output_folder(cfg.output_dir, cfg.output_name, "-merged") if cfg.save_merged else None
        for folder in (adapter_dir, merged_dir):
            if folder is not None and folder.exists() and not cfg.overwrite:
                raise FileExistsError(f"{folder} exists; set overwrite: true or choose another output_name")
        resume_path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
        check_model_folder(cfg.base_model, cfg.trust_remote_code)
        check_quantization(cfg.load_in_4bit, device)
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / f"{cfg.output_name}.data_report.txt", data.report.text())
        train_set, val_set = split_validation(data.examples, cfg.validation_split, cfg.seed)
        self._log(f"loading base model {cfg.base_model}")
        model = load_causal_lm(cfg.base_model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                               load_in_4bit=cfg.load_in_4bit)
        torch.manual_seed(cfg.seed)  # the LoRA weights start the same in every run of this config
        self.model = model = add_lora(model, cfg)
        atomic_write_text(self.output_dir / f"{cfg.output_name}.config.yaml", dump_config(cfg))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run = _Run(model, tokenizer, renderer, train_set, val_set, device, dtype, pad_id or 0)
        result = self._train(run, resume_path)
        result.report = data.report
        if result.interrupted:
            return result
        result.lora_path = save_adapter(model, adapter_dir, overwrite=cfg.overwrite)
        self._log(f"saved adapter {result.lora_path}")
        if merged_dir is not None:
            self._log("merging the adapter into the base model")
            result.merged_path = save_merged_model(cfg.base_model, adapter_dir, merged_dir, overwrite=cfg.overwrite,
                                                   trust_remote_code=cfg.trust_remote_code)
            self._log(f"saved merged model {result.merged_path}")
        return result

    # ---- the loop ---------------------------------------------------------------------------------
    def _train(self, run: _Run, resume_path: Path | None) -> TextTrainResult:
        cfg, model = self.cfg, run.model
        params = [p for p in model.parameters() if p.requires_grad]
        order = EpochOrder(run.train_set, cfg.batch_size, cfg.seed, cfg.repeats)
        total = cfg.max_steps or cfg.epochs * math.ceil(order.per_epoch / cfg.gradient_accumulation_steps)
        optimizer = build_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}], run.device,
                                    notify=self.bus.emit)
        scheduler = build_scheduler(cfg, optimizer, total)
        progress = self._resume(resume_path, model, optimizer, scheduler, total)
        model.train()
        run.writer = open_summary_writer(cfg.resolved_log_dir(), notify=self.bus.emit)
        result = TextTrainResult(progress.global_step, total, progress.losses)
        try:
            result.interrupted = self._updates(run, result, progress, order, optimizer, scheduler, params)
            result.steps_done, result.losses = progress.global_step, progress.losses
            if result.interrupted:
                result.checkpoint = self._save_on_interrupt(progress, model, optimizer, scheduler, total)
            else:
                if run.val_set:
                    result.evals.append(self._evaluate(run, progress.global_step))
                if cfg.sample_prompts:
                    result.sample_paths += self._samples(run, progress.global_step)
        finally:
            if run.writer:
                run.writer.close()
        return result

    def _resume(self, resume_path: Path | None, model: Any, optimizer: Any, scheduler: Any,
                total: int) -> ckpt.Progress:
        if resume_path is None:
            return ckpt.Progress(started_at=time.time())
        loaded = ckpt.load_checkpoint(resume_path)
        load_trainable_state(model, loaded.lora_state)
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        ckpt.restore_rng_state(loaded.rng)
        self._log(f"resumed from {resume_path} at step {loaded.progress.global_step}/{total}")
        return loaded.progress

    def _updates(self, run: _Run, result: TextTrainResult, progress: ckpt.Progress, order: EpochOrder,
                 optimizer: Any, scheduler: Any, params: list) -> bool:
        """Updates until ``result.total_steps``; True when a stop was asked for (Ctrl-C)."""
        scaler = torch.cuda.amp.GradScaler() if run.device.type == "cuda" and run.dtype == torch.float16 else None
        started = time.perf_counter()
        try:
            while progress.global_step < result.total_steps:
                if self.should_stop():
                    return True
                optimizer.zero_grad(set_to_none=True)
                loss = self._accumulate(run, progress, order, scaler)
                lr = apply_update(optimizer, scheduler, params, self.cfg.max_grad_norm, scaler)
                progress.global_step += 1
                progress.losses.append(loss)
                self.bus.emit(StepEvent(progress.global_step, result.total_steps, order.epoch_of(progress.micro_step),
                                        loss, lr, time.perf_counter() - started))
                if run.writer:
                    run.writer.add_scalar("loss", loss, progress.global_step)
                    run.writer.add_scalar("lr", lr, progress.global_step)
                self._periodic(run, result, progress, optimizer, scheduler)
                started = time.perf_counter()
        except KeyboardInterrupt:
            return True
        return False

    def _accumulate(self, run: _Run, progress: ckpt.Progress, order: EpochOrder, scaler: Any) -> float:
        """Forward and backward ``gradient_accumulation_steps`` micro-batches; their mean loss."""
        steps = self.cfg.gradient_accumulation_steps
        total = 0.0
        for _ in range(steps):
            batch = {k: v.to(run.device) for k, v in collate(order.at(progress.micro_step), run.pad_id).items()}
            with run.autocast():
                loss = run.model(**batch).loss.float()
            (scaler.scale(loss / steps) if scaler else loss / steps).backward()
            total += loss.item() / steps
            progress.micro_step += 1
        return total

    def _periodic(self, run: _Run, result: TextTrainResult, progress: ckpt.Progress, optimizer: Any,
                  scheduler: Any) -> None:
        """Checkpoint, evaluation and samples due after this update (the final ones come after the loop)."""
        cfg, step = self.cfg, progress.global_step
        if step >= result.total_steps:
            return
        if cfg.save_steps and step % cfg.save_steps == 0:
            result.checkpoint = self._save_checkpoint(progress, run.model, optimizer, scheduler)
        if cfg.eval_every and run.val_set and step % cfg.eval_every == 0:
            result.evals.append(self._evaluate(run, step))
        if cfg.sample_every and step % cfg.sample_every == 0:
            result.sample_paths += self._samples(run, step)

    # ---- outputs ----------------------------------------------------------------------------------
    def _save_on_interrupt(self, progress: ckpt.Progress, model: Any, optimizer: Any, scheduler: Any,
                           total: int) -> Path | None:
        if progress.global_step == 0:
            self._log("interrupted before the first step; nothing to save", "warning")
            return None
        path = self._save_checkpoint(progress, model, optimizer, scheduler)
        self._log(f"interrupted at step {progress.global_step}/{total}; checkpoint saved to {path} (resume with "
                  "resume_from: latest)", "warning")
        return path

    def _save_checkpoint(self, progress: ckpt.Progress, model: Any, optimizer: Any, scheduler: Any) -> Path:
        path = ckpt.save_checkpoint(self.output_dir, progress, trainable_state(model), optimizer, scheduler)
        self.bus.emit(CheckpointEvent(progress.global_step, path))
        return path

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
        """Answer every sample prompt (greedy) into ``samples/step-NNNNNN.md``, TensorBoard and an event."""
        prompts = list(self.cfg.sample_prompts)
        with torch.random.fork_rng(devices=[]), run.autocast():
            answers = generate_answers(run.model, run.tokenizer, run.renderer, prompts,
                                       max_new_tokens=self.cfg.sample_max_new_tokens)
        text = "".join(f"## {prompt}\n\n{answer}\n\n" for prompt, answer in zip(prompts, answers, strict=True))
        path = atomic_write_text(self.output_dir / "samples" / f"step-{step:06d}.md", text)
        if run.writer:
            for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
                run.writer.add_text(f"sample/{index}", f"**{prompt}**\n\n{answer}", step)
        self.bus.emit(SampleEvent(step, [path], texts=[f"{p!r} -> {a!r}" for p, a in zip(prompts, answers,
                                                                                          strict=True)]))
        return [path]


def train_text(cfg: TrainConfig, **kwargs: Any) -> TextTrainResult:
    """Run a text-generation training job (see :class:`TextTrainer`)."""
    return TextTrainer(cfg, **kwargs).run()

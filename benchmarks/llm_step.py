"""Step time and peak memory of our text-generation loop vs a plain transformers + peft loop, same model and batch.

    python benchmarks/llm_step.py                          # a small random Llama on the CPU
    python benchmarks/llm_step.py --device cuda --hidden 2048 --layers 16 --seq 1024 --batch 4

Both loops train the same LoRA (all-linear, rank 16) on the same tokenized examples, every one exactly ``--seq``
tokens long, with AdamW, gradient clipping and a constant schedule; autocast in the model's dtype on CUDA.

- Peak memory: each loop runs alone in its own process (peak RSS; peak VRAM on CUDA).
- Speed: the two loops take turns step by step in one process (our trainer runs, and after each of its steps the
  plain loop does one), so whatever else the machine is doing slows both alike; the ratio is the median of the
  per-step ratios after ``--warmup`` steps. The single-process medians are printed too.

Goal: ours / plain <= 1.05 for s/step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = "river hill stone cloud lantern garden copper violet harbour meadow signal winter".split()


def prepare(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random Llama folder and a jsonl of prompt/response examples long enough to fill ``--seq`` tokens."""
    import random

    from lora_trainer.llm.tiny import build_tokenizer, write_tiny_causal_lm

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(args.seq * 2)) for _ in range(args.batch * 4)]
    tokenizer = build_tokenizer(texts[:4], vocab_size=300)
    model = write_tiny_causal_lm(workdir / "model", "llama", tokenizer, vocab_size=args.vocab, hidden=args.hidden,
                                 layers=args.layers, heads=args.heads, max_positions=args.seq + 8)
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Go on:", "response": t}) + "\n" for t in texts), encoding="utf-8")
    return model, data


def our_trainer(workdir: Path, model: Path, data: Path, args: argparse.Namespace, on_step: Callable) -> None:
    """Run our loop for ``--warmup + --steps`` updates, calling ``on_step(StepEvent)`` after each."""
    from lora_trainer.config import config_from_dict
    from lora_trainer.llm.trainer import TextTrainer
    from lora_trainer.train.events import EventBus, StepEvent

    cfg = config_from_dict({
        "task_type": "text-generation", "base_model": str(model), "train_data_dir": str(data),
        "output_dir": str(workdir / "out"), "max_seq_length": args.seq, "batch_size": args.batch,
        "max_steps": args.steps + args.warmup, "lora_rank": 16, "lora_alpha": 16, "device": args.device,
        "learning_rate": 1e-4, "seed": 0, "overwrite": True})
    TextTrainer(cfg, events=EventBus(lambda e: on_step(e) if isinstance(e, StepEvent) else None)).run()


def plain_loop(model_dir: Path, data: Path, args: argparse.Namespace) -> Callable[[int], float]:
    """The loop people write from the transformers and peft docs; returns ``step(n) -> seconds``."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_trainer.llm.batches import collate
    from lora_trainer.llm.dataset import load_text_dataset
    from lora_trainer.llm.model import dtype_argument
    from lora_trainer.llm.prompting import PromptRenderer
    from lora_trainer.train.trainer import resolve_precision

    device = torch.device(args.device)
    dtype = resolve_precision("auto", device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    examples = load_text_dataset(data, tokenizer, PromptRenderer(tokenizer), max_seq_length=args.seq).examples
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **dtype_argument(dtype))
    model.to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else contextlib.nullcontext()
    model.train()

    def step(index: int) -> float:
        start = time.perf_counter()
        chosen = [examples[(index * args.batch + i) % len(examples)] for i in range(args.batch)]
        batch = {k: v.to(device) for k, v in collate(chosen, tokenizer.eos_token_id).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    return step


def run_alone(loop: str, workdir: Path, args: argparse.Namespace) -> dict:
    """One loop in this process: median s/step and peak memory."""
    import torch

    model, data = prepare(workdir, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if loop == "ours":
        times: list[float] = []
        our_trainer(workdir, model, data, args, lambda event: times.append(event.seconds_per_step))
    else:
        step = plain_loop(model, data, args)
        times = [step(index) for index in range(args.steps + args.warmup)]
    result = {"s_per_step": statistics.median(times[args.warmup:]),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if args.device.startswith("cuda"):
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_paired(workdir: Path, args: argparse.Namespace) -> dict:
    """Both loops taking turns step by step; the median of the per-step ratios ours / plain.

    Our step is the time from the end of one step report to the next, so the plain step run inside the report is
    not counted as ours; our losses are read every step here (as the plain loop's ``loss.item()`` does), so each
    report follows its own step.
    """
    from lora_trainer.train.loss_log import LossLog

    model, data = prepare(workdir, args)
    plain_step = plain_loop(model, data, args)
    pairs: list[tuple[float, float]] = []
    ended = [time.perf_counter()]

    def on_step(event) -> None:
        ours = time.perf_counter() - ended[0]
        pairs.append((ours, plain_step(event.step - 1)))
        ended[0] = time.perf_counter()

    LossLog.interval_for = staticmethod(lambda device: 0.0)
    our_trainer(workdir, model, data, args, on_step)
    timed = pairs[args.warmup:]
    return {"ratio": statistics.median(ours / plain for ours, plain in timed),
            "ours": statistics.median(ours for ours, _ in timed), "plain": statistics.median(p for _, p in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--run", choices=("ours", "plain", "paired"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            found = run_paired(Path(tmp), args) if args.run == "paired" else run_alone(args.run, Path(tmp), args)
        print(json.dumps(found))
        return
    figures = {}
    for run in ("plain", "ours", "paired"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", run], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{run} run failed:\n{done.stderr[-3000:]}")
        figures[run] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq} tokens, {args.device}, {args.steps} timed steps")
    print(f"{'loop':6} {'s/step alone':>12} {'s/step paired':>13} {'peak RSS GiB':>12} {'peak VRAM GiB':>13}")
    for loop in ("plain", "ours"):
        r = figures[loop]
        vram = f"{r['peak_vram_gib']:.2f}" if "peak_vram_gib" in r else "-"
        print(f"{loop:6} {r['s_per_step']:>12.3f} {figures['paired'][loop]:>13.3f} {r['peak_rss_gib']:>12.2f} "
              f"{vram:>13}")
    ours, plain = figures["ours"], figures["plain"]
    line = f"ratio ours/plain: s/step {figures['paired']['ratio']:.3f}x (median of paired steps), peak RSS " \
           f"{ours['peak_rss_gib'] / plain['peak_rss_gib']:.3f}x"
    if "peak_vram_gib" in ours:
        line += f", peak VRAM {ours['peak_vram_gib'] / plain['peak_vram_gib']:.3f}x"
    print(line + " (goal: s/step <= 1.05x)")


if __name__ == "__main__":
    main()

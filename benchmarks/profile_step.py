"""Where a training step's time goes: torch.profiler over a few steps of the real trainer.

    python benchmarks/profile_step.py --model tiny               # tiny model, 64 px, batch 4
    python benchmarks/profile_step.py --model mid --resolution 256 --batch 1 --threads 2
    python benchmarks/profile_step.py --model tiny --option channels_last   # an option under test

Prints the operators with the most self time, the host syncs (``aten::item`` / ``_local_scalar_dense``) per
step, and the mean step time of the profiled steps (profiler overhead included: compare runs, not absolutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def build(model: str):
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone

    if model == "tiny":
        from lora_trainer.models.tiny import build_tiny_components

        parts = build_tiny_components()
    else:
        from sizes import build_sd15

        parts = build_sd15(model)
    return DiffusersBackbone(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "mid", "full"), default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps (after 2 unprofiled ones)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--option", action="append", default=[], help="a true boolean config key, e.g. channels_last")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from benchmarks.train_step import make_images
    from lora_trainer.config import config_from_dict
    from lora_trainer.train.events import EventBus, StepEvent
    from lora_trainer.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    backbone = build(args.model)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_images(data, 8, args.resolution)
        cfg = config_from_dict({
            "train_data_dir": str(data), "base_model": "given", "output_dir": str(Path(tmp) / "out"),
            "resolution": args.resolution, "batch_size": args.batch, "max_steps": args.steps + 2, "device": "cpu",
            "gradient_checkpointing": args.checkpointing, "lora_rank": 16, "lora_alpha": 16,
            **{key: True for key in args.option}})
        plan = schedule(wait=1, warmup=1, active=args.steps, repeat=1)
        with profile(activities=[ProfilerActivity.CPU], schedule=plan, record_shapes=False) as prof:
            def on_step(event) -> None:
                if isinstance(event, StepEvent):
                    times.append(event.seconds_per_step)
                    prof.step()

            Trainer(cfg, backbone, events=EventBus(on_step)).run()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    syncs = sum(e.count for e in table if e.key in SYNC_OPS[:1])
    print(f"host syncs (aten::item) per profiled step: {syncs / args.steps:.1f}")
    timed = times[2:]
    print(f"mean s/step over the profiled steps: {sum(timed) / len(timed):.4f} "
          f"(model {args.model}, {args.resolution} px, batch {args.batch}, threads {args.threads})")


if __name__ == "__main__":
    main()

"""Data-parallel scaling: samples per second of the same training run with 1, 2 ... processes under torchrun, and
the scaling efficiency (samples/s with N processes / (N x samples/s with one)).

    python benchmarks/scaling.py                                   # CPU, tiny model, 1 and 2 processes
    python benchmarks/scaling.py --device cuda --processes 1 2 4   # one process per GPU
    python benchmarks/scaling.py --width 4 --resolution 256        # a wider tiny model (more work per sample)
    python benchmarks/scaling.py --base-model /path/to/v1-5.safetensors --device cuda --resolution 512

Each case is ``torchrun --standalone --nproc_per_node N`` running this file as the worker: every process trains
``batch_size`` samples per step (the global batch grows with N, as in real data-parallel use); the main process
times the steps after the first ``--warmup`` ones (model loading, caching and the first steps are not counted).
On the CPU each process gets ``--threads`` threads: efficiency there mostly says how many free cores the machine
has (two processes on two shared cores cannot be twice as fast as one); on GPUs it says what the gradient
all-reduce costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(spec_path: str) -> None:
    """One process of a case (started by torchrun): train, and on the main process write the step times."""
    import torch

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    from lora_trainer.config import config_from_dict
    from lora_trainer.train import distributed
    from lora_trainer.train.events import EventBus, StepEvent
    from lora_trainer.train.trainer import Trainer

    cfg = config_from_dict(spec["config"])
    group = distributed.start(cfg.device)
    stamps: list[float] = []
    bus = EventBus(lambda event: stamps.append(time.perf_counter()) if isinstance(event, StepEvent) else None)
    try:
        Trainer(cfg, events=bus, dist=group).run()
    finally:
        group.close()
    if group.is_main:
        Path(spec["result"]).write_text(json.dumps({"stamps": stamps, "world_size": group.world_size}),
                                        encoding="utf-8")


def run_case(processes: int, args: argparse.Namespace, base_model: Path, data: Path, workdir: Path) -> dict:
    """Samples/s of one case: ``processes`` processes, ``batch_size`` samples each per step."""
    result = workdir / f"result-{processes}.json"
    spec = {"threads": args.threads, "result": str(result), "config": {
        "train_data_dir": str(data), "base_model": str(base_model), "output_dir": str(workdir / f"out-{processes}"),
        "output_name": "scaling", "resolution": args.resolution, "batch_size": args.batch_size,
        "max_steps": args.warmup + args.steps, "lora_rank": 16, "lora_alpha": 16, "device": args.device,
        "preview": False, "overwrite": True, "seed": 0}}
    spec_path = workdir / f"spec-{processes}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", __file__, "--worker", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    stamps = json.loads(result.read_text(encoding="utf-8"))["stamps"]
    timed = stamps[args.warmup - 1:]  # from the end of the last warm-up step to the end of the last step
    seconds = timed[-1] - timed[0]
    samples = (len(timed) - 1) * args.batch_size * processes
    return {"processes": processes, "steps": len(timed) - 1, "seconds": seconds, "samples_per_s": samples / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--base-model", help="a checkpoint to train (default: a tiny random SD1.5-topology one)")
    parser.add_argument("--width", type=int, default=1, help="width multiplier of the tiny model")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="samples per process and step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before the clock starts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    if args.device.startswith("cuda") and max(args.processes) > torch.cuda.device_count():
        raise SystemExit(f"{max(args.processes)} processes need as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="lora_scaling_") as tmp:
        workdir = Path(tmp)
        if args.base_model:
            base_model = Path(args.base_model).resolve()
        else:
            from lora_trainer.models.tiny import write_tiny_checkpoint

            base_model = write_tiny_checkpoint(workdir / "model", width=args.width)
        from benchmarks.train_step import make_images

        data = workdir / "data"
        make_images(data, max(args.batch_size * max(args.processes) * 2, 8), args.resolution)
        print(f"device {args.device}, {base_model.name} (width {args.width}), {args.resolution} px, batch "
              f"{args.batch_size} per process, {args.steps} timed steps after {args.warmup}, {args.threads} "
              f"thread(s) per process, {os.cpu_count()} CPU cores")
        print(f"{'processes':>9} {'samples/s':>10} {'efficiency':>10}")
        single = None
        for processes in args.processes:
            case = run_case(processes, args, base_model, data, workdir)
            if processes == 1:
                single = case["samples_per_s"]
            efficiency = f"{case['samples_per_s'] / (processes * single):.0%}" if single else "-"
            print(f"{processes:>9} {case['samples_per_s']:>10.2f} {efficiency:>10}", flush=True)


if __name__ == "__main__":
    main()

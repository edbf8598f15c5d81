"""Our trainer and kohya sd-scripts' train_network.py side by side, on the same checkpoint, data and settings.

    python benchmarks/compare_kohya.py --sd-scripts PATH --kohya-python PATH/venv/bin/python --size mid
    python benchmarks/compare_kohya.py --sd-scripts PATH --kohya-python ... --size full --resolution 256

Writes one random SD1.5-topology single-file checkpoint (``--size mid``: half the UNet width, the real CLIP-L and
VAE; ``full``: SD1.5 exactly) and one data set of random images with captions, then runs both trainers in
alternation (``--rounds`` times each, ours first in odd rounds, kohya first in even ones), each in a fresh process:
batch 1, LoRA rank/alpha 16 on the same 192 UNet modules (every Linear and 1x1 conv in the transformer blocks),
UNet only, latents cached, fp32, SDPA, AdamW, constant learning rate, ``--threads`` torch threads.

Per run: time to first step (process start to the end of the first optimizer step), s/step (mean interval
between later optimizer steps), peak RSS (the process's ru_maxrss), peak VRAM on CUDA (torch's counter, printed
by the runs themselves is not available for kohya, so it is left out). Each figure is printed per run and as the
median over rounds, with the ratio ours/kohya. The trained parameter counts of both LoRA files are printed.
Kohya needs its own Python environment (``--kohya-python``); its SD1.5 UNet width is fixed in its code at 320, so
for ``--size mid`` it runs through ``step_clock.py --unet-width``, which sets those constants and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sizes import SD15_WIDTHS, build_sd15  # noqa: E402

UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CLOCK = REPO / "benchmarks" / "step_clock.py"
STEP_CLOCK = re.compile(r"STEP_CLOCK (\d+\.\d+)")


def write_checkpoint(path: Path, size: str) -> None:
    from safetensors.torch import save_file

    from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict

    parts = build_sd15(size)
    state = diffusers_to_ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])
    save_file(state, str(path), {"format": "pt"})


def write_dataset(folder: Path, count: int, size: int) -> Path:
    """``folder/1_bench/NNN.png`` + ``NNN.txt``: kohya's ``<repeats>_<name>`` layout; ours reads the same files."""
    import numpy as np
    from PIL import Image

    images = folder / "1_bench"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{index:03d}.png")
        (images / f"{index:03d}.txt").write_text(f"a picture number {index}", encoding="utf-8")
    return images


def our_command(args, work: Path, checkpoint: Path, images: Path, out: Path) -> list[str]:
    import yaml

    config = {
        "train_data_dir": str(images), "base_model": str(checkpoint), "output_dir": str(out),
        "output_name": "ours", "overwrite": True, "resolution": args.resolution, "batch_size": 1,
        "max_steps": args.steps, "lora_rank": 16, "lora_alpha": 16.0, "target_modules": UNET_MODULES,
        "learning_rate": 1e-4, "optimizer": "adamw", "mixed_precision": "no", "cache_latents": True,
        "gradient_checkpointing": args.checkpointing, "device": args.device, "seed": 42,
    }
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return [sys.executable, str(CLOCK), "--", "-m", "lora_trainer", "train", "--config", str(path)]


def kohya_command(args, work: Path, checkpoint: Path, images: Path, out: Path) -> list[str]:
    probe = subprocess.run([args.kohya_python, "-c", "import torchvision"], capture_output=True, text=True)
    shim = ["--torchvision-shim"] if "torchvision::nms does not exist" in probe.stderr else []
    if shim:
        print("kohya's environment has a CUDA build of torchvision: its two C++ operators are declared for the "
              "import (step_clock.py --torchvision-shim)")
    command = [
        args.kohya_python, str(CLOCK), "--unet-width", str(SD15_WIDTHS[args.size]), *shim, "--",
        str(Path(args.sd_scripts) / "train_network.py"),
        "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(images.parent),
        "--output_dir", str(out), "--output_name", "kohya", "--save_model_as", "safetensors",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--network_train_unet_only", "--resolution", str(args.resolution), "--train_batch_size", "1",
        "--max_train_steps", str(args.steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--lr_scheduler", "constant", "--mixed_precision", "no", "--save_precision", "float", "--cache_latents",
        "--sdpa", "--seed", "42", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
        "--tokenizer_cache_dir", str(work / "tokenizers"),
    ]
    if args.checkpointing:
        command.append("--gradient_checkpointing")
    return command


def run_once(name: str, command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Start ``command``, collect its STEP_CLOCK lines and its peak RSS (wait4)."""
    started = time.time()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    clocks: list[float] = []
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:  # progress bars redraw with \r: a clock can follow one on the same line
            clocks.extend(float(value) for value in STEP_CLOCK.findall(line))
            lines.extend(part for part in STEP_CLOCK.sub("", line).replace("\r", "\n").splitlines() if part.strip())

    reader = threading.Thread(target=read)
    reader.start()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    log.write_text("\n".join(lines), encoding="utf-8")
    if process.returncode != 0 or len(clocks) < 3:
        raise SystemExit(f"{name} failed (exit {process.returncode}, {len(clocks)} steps); see {log}:\n"
                         + "\n".join(lines[-25:]))
    intervals = [b - a for a, b in zip(clocks[1:], clocks[2:], strict=False)] or [clocks[1] - clocks[0]]
    return {"first_step_s": clocks[0] - started, "s_per_step": statistics.mean(intervals),
            "peak_rss_gib": usage.ru_maxrss / 2**20, "load": os.getloadavg()[0]}


def lora_parameters(path: Path) -> tuple[int, int]:
    """(modules, parameters) of a kohya-format LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = [k for k in handle.keys() if k.endswith((".lora_down.weight", ".lora_up.weight"))]
        count = sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1]
                    * (1 if len(handle.get_slice(k).get_shape()) == 2 else
                       handle.get_slice(k).get_shape()[2] * handle.get_slice(k).get_shape()[3]) for k in keys)
    return len(keys) // 2, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", required=True, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--kohya-python", default=sys.executable, help="the Python of kohya's environment")
    parser.add_argument("--size", choices=tuple(SD15_WIDTHS), default="mid")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="keep the checkpoint and data here (default: a temp dir)")
    args = parser.parse_args()
    if not (Path(args.sd_scripts) / "train_network.py").is_file():
        raise SystemExit(f"{args.sd_scripts} has no train_network.py: give a checkout of kohya-ss/sd-scripts")

    import tempfile

    from lora_trainer.models.tokenizer import write_clip_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / f"sd15-{args.size}.safetensors"
        if not checkpoint.is_file():
            write_checkpoint(checkpoint, args.size)
        images = write_dataset(work / "data", args.images, args.resolution)
        write_clip_tokenizer_files(work / "tokenizers" / "openai_clip-vit-large-patch14")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        commands = {"ours": (our_command(args, work, checkpoint, images, work / "out-ours"), REPO),
                    "kohya": (kohya_command(args, work, checkpoint, images, work / "out-kohya"),
                              Path(args.sd_scripts))}
        print(f"checkpoint: SD1.5 topology, size {args.size} ({checkpoint.stat().st_size / 2**30:.2f} GiB fp32); "
              f"{args.images} images at {args.resolution} px; batch 1, rank 16, UNet only, latents cached, fp32, "
              f"SDPA, AdamW, {args.steps} steps, {args.threads} threads, gradient checkpointing "
              f"{'on' if args.checkpointing else 'off'}", flush=True)
        results: dict[str, list[dict]] = {"ours": [], "kohya": []}
        for round_index in range(args.rounds):
            order = ("ours", "kohya") if round_index % 2 == 0 else ("kohya", "ours")
            for name in order:
                command, cwd = commands[name]
                r = run_once(name, command, cwd, env, work / f"{name}-{round_index}.log")
                results[name].append(r)
                print(f"round {round_index + 1} {name:5}: first step {r['first_step_s']:6.1f} s, "
                      f"{r['s_per_step']:6.2f} s/step, peak RSS {r['peak_rss_gib']:5.2f} GiB "
                      f"(load average {r['load']:.1f})", flush=True)
        ours_lora = lora_parameters(work / "out-ours" / "ours.safetensors")
        kohya_lora = lora_parameters(work / "out-kohya" / "kohya.safetensors")
        print(f"LoRA modules / trained parameters: ours {ours_lora[0]} / {ours_lora[1]:,}, "
              f"kohya {kohya_lora[0]} / {kohya_lora[1]:,}")
        print(f"\n| median of {args.rounds} | ours | kohya | ours/kohya |\n|---|---|---|---|")
        for key, label, unit in (("s_per_step", "s/step", ""), ("peak_rss_gib", "peak RSS", " GiB"),
                                 ("first_step_s", "process start -> first step", " s")):
            ours = statistics.median(r[key] for r in results["ours"])
            kohya = statistics.median(r[key] for r in results["kohya"])
            print(f"| {label} | {ours:.2f}{unit} | {kohya:.2f}{unit} | {ours / kohya:.2f} |")
        print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Our trainer and kohya sd-scripts' train_network.py side by side, on the same checkpoint, data and settings.

    python benchmarks/compare_kohya.py --sd-scripts PATH --kohya-python PATH/venv/bin/python --size mid
    python benchmarks/compare_kohya.py --sd-scripts PATH --kohya-python ... --size full --resolution 256
    python benchmarks/compare_kohya.py --sd-scripts PATH --kohya-python ... --model sdxl --size mid

Writes one random SD1.5-topology single-file checkpoint (``--size mid``: half the UNet width, the real CLIP-L and
VAE; ``full``: SD1.5 exactly), or with ``--model sdxl`` an SDXL-topology one in the sgm layout (``mid``: half the
UNet width, OpenCLIP bigG with 8 of its 32 layers, the real CLIP-L and VAE, 4.3 GiB; ``full``: SDXL base; see
``sizes.py``), and one data set of random images with captions, then runs both trainers in
alternation (``--rounds`` times each, ours first in odd rounds, kohya first in even ones), each in a fresh process:
batch 1, LoRA rank/alpha 16 on the same UNet modules (every Linear and 1x1 conv in the transformer blocks: 192 in
SD1.5, 722 in SDXL), UNet only, latents cached (and for SDXL the text encoders' outputs: kohya's
``--cache_text_encoder_outputs``, which ours always does when the text encoders are not trained), fp32, SDPA,
AdamW, constant learning rate, no samples or preview picture, ``--threads`` torch threads.

Per run: time to first step (process start to the end of the first optimizer step), s/step (mean interval
between later optimizer steps), peak RSS (the run's own peak, ``VmHWM``, printed by ``step_clock.py`` at exit;
``ru_maxrss`` where that is missing, which also counts this process's peak, e.g. from writing the checkpoint);
peak VRAM on CUDA is left out (torch's counter is not available for kohya). Each figure is printed per run and as the
median over rounds, with the ratio ours/kohya. The trained parameter counts of both LoRA files are printed.
Kohya needs its own Python environment (``--kohya-python``); its SD1.5 UNet width is fixed in its code at 320, so
for ``--size mid`` it runs through ``step_clock.py --unet-width``, which sets those constants and nothing else;
for SDXL, ``--sdxl-unet-width`` and ``--sdxl-text-encoder-2-layers`` do the same for its SDXL model code.
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

from sizes import SD15_WIDTHS, SDXL_SIZES, build_sd15, build_sdxl  # noqa: E402

UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CLOCK = REPO / "benchmarks" / "step_clock.py"
STEP_CLOCK = re.compile(r"STEP_CLOCK (\d+\.\d+)")
PEAK_RSS = re.compile(r"STEP_PEAK_RSS (\d+)")


#: kohya's SDXL tokenizers, looked up in --tokenizer_cache_dir under these names (both are CLIP's vocabulary)
KOHYA_TOKENIZERS = {"sd15": ("openai_clip-vit-large-patch14",),
                    "sdxl": ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")}


def write_checkpoint(path: Path, model: str, size: str) -> None:
    """A random single-file checkpoint of ``model`` (sd15 / sdxl) at ``size``: LDM / sgm layout, fp32."""
    from safetensors.torch import save_file

    from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict, sdxl_to_ldm_state_dict

    if model == "sdxl":
        parts = build_sdxl(size)
        state = sdxl_to_ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"])
    else:
        parts = build_sd15(size)
        state = diffusers_to_ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])
    del parts
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
        "preview": False,  # kohya renders no picture at the end either: both runs do the same work
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
    if args.model == "sdxl":
        width, layers = SDXL_SIZES[args.size]
        sizes = ["--sdxl-unet-width", str(width), "--sdxl-text-encoder-2-layers", str(layers)]
        script, extra = "sdxl_train_network.py", ["--cache_text_encoder_outputs"]
    else:
        sizes, script, extra = ["--unet-width", str(SD15_WIDTHS[args.size])], "train_network.py", []
    command = [
        args.kohya_python, str(CLOCK), *sizes, *shim, "--", str(Path(args.sd_scripts) / script),
        "--pretrained_model_name_or_path", str(checkpoint), "--train_data_dir", str(images.parent),
        "--output_dir", str(out), "--output_name", "kohya", "--save_model_as", "safetensors",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--network_train_unet_only", "--resolution", str(args.resolution), "--train_batch_size", "1",
        "--max_train_steps", str(args.steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--lr_scheduler", "constant", "--mixed_precision", "no", "--save_precision", "float", "--cache_latents",
        "--sdpa", "--seed", "42", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
        "--tokenizer_cache_dir", str(work / "tokenizers"), *extra,
    ]
    if args.checkpointing:
        command.append("--gradient_checkpointing")
    return command


def sample_rss(pid: int, lines: list[str], clocks: list[float], started: float, peak: dict) -> None:
    """Every 0.2 s until ``pid`` ends, its resident memory (Linux /proc); ``peak`` gets the largest with when it
    came (seconds from the start, steps done by then, the last line printed before it): where the peak comes from;
    and ``steps_gib``, the largest once the first step is done (what training itself holds)."""
    page = os.sysconf("SC_PAGE_SIZE")
    statm = Path(f"/proc/{pid}/statm")
    while True:
        try:
            resident = int(statm.read_text().split()[1]) * page / 2**30
        except (OSError, IndexError, ValueError):
            return
        if resident > peak.get("gib", 0.0):
            peak.update(gib=resident, at_s=time.time() - started, steps=len(clocks), after=lines[-1] if lines else "")
        if clocks and resident > peak.get("steps_gib", 0.0):
            peak["steps_gib"] = resident
        time.sleep(0.2)


def run_once(name: str, command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Start ``command``, collect its STEP_CLOCK lines, its peak RSS (wait4) and when the peak came (sampled)."""
    started = time.time()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    clocks: list[float] = []
    lines: list[str] = []
    reported: list[int] = []

    def read() -> None:
        for line in process.stdout:  # progress bars redraw with \r: a clock can follow one on the same line
            clocks.extend(float(value) for value in STEP_CLOCK.findall(line))
            reported.extend(int(value) for value in PEAK_RSS.findall(line))
            line = PEAK_RSS.sub("", STEP_CLOCK.sub("", line))
            lines.extend(part for part in line.replace("\r", "\n").splitlines() if part.strip())

    peak: dict = {}
    reader = threading.Thread(target=read)
    reader.start()
    sampler = threading.Thread(target=sample_rss, args=(process.pid, lines, clocks, started, peak), daemon=True)
    sampler.start()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    log.write_text("\n".join(lines), encoding="utf-8")
    if process.returncode != 0 or len(clocks) < 3:
        raise SystemExit(f"{name} failed (exit {process.returncode}, {len(clocks)} steps); see {log}:\n"
                         + "\n".join(lines[-25:]))
    intervals = [b - a for a, b in zip(clocks[1:], clocks[2:], strict=False)] or [clocks[1] - clocks[0]]
    # the child's own peak (step_clock.py); ru_maxrss also holds this process's peak (carried over by fork/vfork)
    peak_bytes = reported[-1] if reported else usage.ru_maxrss * 1024
    return {"first_step_s": clocks[0] - started, "s_per_step": statistics.mean(intervals),
            "peak_rss_gib": peak_bytes / 2**30, "load": os.getloadavg()[0], "sampled_peak": peak}


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
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15", help="the checkpoint's topology")
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
    script = "sdxl_train_network.py" if args.model == "sdxl" else "train_network.py"
    if not (Path(args.sd_scripts) / script).is_file():
        raise SystemExit(f"{args.sd_scripts} has no {script}: give a checkout of kohya-ss/sd-scripts")

    import tempfile

    from lora_trainer.models.tokenizer import write_clip_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / f"{args.model}-{args.size}.safetensors"
        if not checkpoint.is_file():
            write_checkpoint(checkpoint, args.model, args.size)
        images = write_dataset(work / "data", args.images, args.resolution)
        for name in KOHYA_TOKENIZERS[args.model]:
            write_clip_tokenizer_files(work / "tokenizers" / name)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        commands = {"ours": (our_command(args, work, checkpoint, images, work / "out-ours"), REPO),
                    "kohya": (kohya_command(args, work, checkpoint, images, work / "out-kohya"),
                              Path(args.sd_scripts))}
        topology = "SDXL" if args.model == "sdxl" else "SD1.5"
        print(f"checkpoint: {topology} topology, size {args.size} ({checkpoint.stat().st_size / 2**30:.2f} GiB fp32); "
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
                if r["sampled_peak"]:
                    at = r["sampled_peak"]
                    print(f"    sampled peak {at['gib']:.2f} GiB at {at['at_s']:.1f} s, {at['steps']} steps done, "
                          f"after: {at['after'][:120]}; largest after the first step {at.get('steps_gib', 0):.2f} GiB",
                          flush=True)
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

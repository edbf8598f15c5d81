"""Peak memory while loading a single-file checkpoint, against the size of the loaded model.

    python benchmarks/load_memory.py                        # SD1.5 and SDXL topologies, float32 and float16 files
    python benchmarks/load_memory.py --width 8 --family sd15
    python benchmarks/load_memory.py --before ../lora-trainer-main   # also measure another checkout's loader

The checkpoints are tiny random SD1.5- / SDXL-topology models with their widths multiplied by ``--width``
(``width`` 4: about 230 MB in float32), written in the original single-file layout. Each measurement runs in
a fresh process: it imports everything and loads a tiny checkpoint once (lazy imports, tokenizer), resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``; a sampling thread where that is not allowed), loads the
checkpoint for float32 CPU training, then reads every weight once (a memory-mapped weight is read from disk on
first use, so this is when it becomes resident), and reports the peak RSS above the level before the load
next to the bytes of the loaded model. ``--before PATH`` runs the same measurement with the ``lora_trainer``
of another checkout (the loader before lean loading: modules built with random initialisation, then the
checkpoint's tensors copied in); SDXL rows are skipped for it when it cannot load SDXL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

_CHILD = r"""
import gc, json, os, sys, threading, time
import torch
torch.set_num_threads(1)
from lora_trainer.models.loading import load_backbone

def status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

load_backbone(sys.argv[2])  # warm: imports, tokenizer files, lazily built tables
gc.collect()
peak = [0]
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    sampler = None
except OSError:
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], status("VmRSS"))
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
before = status("VmRSS")
started = time.perf_counter()
backbone = load_backbone(sys.argv[1])
seconds = time.perf_counter() - started
if hasattr(backbone, "load_released"):  # the UNet and the VAE's decoder are read on first use: the whole model
    backbone.load_released()
modules = [m for m in (getattr(backbone, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")) if m]
checksum = sum(float(t.detach().float().sum()) for m in modules for t in [*m.parameters(), *m.buffers()])
if sampler is not None:
    stop.set()
    sampler.join()
high = max(peak[0], status("VmRSS")) if sampler is not None else status("VmHWM")
print(json.dumps({"peak_growth": high - before, "seconds": seconds, "checksum": checksum,
                  "model_bytes": sum(t.numel() * t.element_size() for m in modules
                                     for t in [*m.parameters(), *m.buffers()]),
                  "rss_anon_after": status("RssAnon"), "rss_file_after": status("RssFile")}))
"""


def write_checkpoints(folder: Path, family: str, width: int, dtype_name: str) -> tuple[Path, Path]:
    """(the checkpoint to measure, a tiny one of the same family to warm up with)."""
    import torch

    dtype = getattr(torch, dtype_name)
    if family == "sdxl":
        from lora_trainer.models.tiny_sdxl import write_tiny_sdxl_checkpoint as write
    else:
        from lora_trainer.models.tiny import write_tiny_checkpoint as write
    big = folder / f"{family}-w{width}-{dtype_name}.safetensors"
    if not big.is_file():
        write(folder, big.stem, width=width, dtype=dtype)
    warm = folder / f"{family}-warm.safetensors"
    if not warm.is_file():
        write(folder, warm.stem)
    return big, warm


def measure(checkpoint: Path, warm: Path, source: Path = REPO) -> dict:
    """Load ``checkpoint`` in a fresh process with ``source``'s lora_trainer; peak RSS growth and model bytes."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(warm)], env=env, capture_output=True,
                          text=True, cwd=str(source))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    result = json.loads(lines[-1])
    result["ratio"] = result["peak_growth"] / result["model_bytes"]
    return result


def _row(label: str, result: dict) -> str:
    if "error" in result:
        return f"{label:<34} {'-':>10} {'-':>10} {'-':>7} {'-':>8}   (failed: ...{result['error'][-70:]})"
    return (f"{label:<34} {result['model_bytes'] / MIB:>8.0f} MB {result['peak_growth'] / MIB:>7.0f} MB "
            f"{result['ratio']:>6.2f}x {result['seconds']:>7.2f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--dtype", choices=("float32", "float16", "both"), default="both",
                        help="dtype of the checkpoint file (the model is loaded for float32 CPU training)")
    parser.add_argument("--width", type=int, default=4, help="width multiplier of the tiny models (4: ~230 MB)")
    parser.add_argument("--before", type=Path, help="another checkout of lora-trainer to measure too")
    parser.add_argument("--workdir", type=Path, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    families = ("sd15", "sdxl") if args.family == "both" else (args.family,)
    dtypes = ("float32", "float16") if args.dtype == "both" else (args.dtype,)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"{'checkpoint / loader':<34} {'model':>10} {'peak RSS+':>10} {'ratio':>7} {'load':>8}")
        for family in families:
            for dtype_name in dtypes:
                big, warm = write_checkpoints(folder, family, args.width, dtype_name)
                size = big.stat().st_size / MIB
                name = f"{family} {dtype_name} file ({size:.0f} MB)"
                if args.before:
                    print(_row(f"{name}, before", measure(big, warm, args.before.resolve())), flush=True)
                print(_row(f"{name}, now", measure(big, warm)), flush=True)
    print("peak RSS+: the highest resident memory above the level before loading, over the load and one read of "
          "every weight; ratio: peak RSS+ / model (float32 weights in memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

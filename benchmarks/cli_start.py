"""How long the command line takes to answer when it needs no model: ``--help``, a config error, a missing BLIP.

    python benchmarks/cli_start.py              # 3 runs of each, median printed
    python benchmarks/cli_start.py --runs 5

Each case is a fresh ``python -m lora_trainer`` process (what a user waits for), timed from start to exit.
torch, transformers and diffusers are imported only inside the commands that train or caption, after the
paths have been checked, so these answers should take well under a second on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lora_trainer", *args], cwd=cwd, env=env, capture_output=True)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "pictures").mkdir()
        (folder / "bad.yaml").write_text("train_data_dir: pictures\nbase_model: m.safetensors\nlora_rnak: 8\n",
                                         encoding="utf-8")
        cases = {
            "--help": ["--help"],
            "train, config typo": ["train", "--config", "bad.yaml"],
            "train, unsafe output_name": ["train", "--config", "bad.yaml"],
            "caption, missing BLIP model": ["caption", "--input", "pictures", "--model", "no/such/blip"],
        }
        (folder / "unsafe.yaml").write_text("train_data_dir: pictures\nbase_model: m.safetensors\n"
                                            "output_name: ../../escaped\n", encoding="utf-8")
        cases["train, unsafe output_name"] = ["train", "--config", "unsafe.yaml"]
        print(f"{'case':32s} {'median s':>9s} {'min s':>7s}  exit")
        for name, argv in cases.items():
            results = [timed(argv, folder) for _ in range(args.runs)]
            times = [seconds for seconds, _ in results]
            print(f"{name:32s} {statistics.median(times):9.2f} {min(times):7.2f}  {results[0][1]}")


if __name__ == "__main__":
    main()

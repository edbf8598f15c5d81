"""Install what lora-trainer needs and the Python environment lacks, never moving what is there.

The WebUI runs this file at every start (``launch.py`` -> ``run_extension_installer``); it also works by hand:
``python install.py``. Rules:

- a distribution that is already installed is never upgraded, downgraded or reinstalled, whatever its version;
- a missing one is installed in a version known to work beside what is installed (A1111 1.10 pins
  transformers 4.30.2 and protobuf 3.20.0: diffusers 0.31.0, peft 0.13.2 and tensorboard 2.20.0 work there),
  with a pip constraints file that pins every installed distribution to its present version, so pip cannot
  move one as a side effect;
- when nothing is missing no pip process starts: a second start costs a few milliseconds.

``LORA_TRAINER_REQUIREMENTS`` (comma-separated names) replaces the list of needed distributions (for tests).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time

# distribution name -> the oldest version lora-trainer works with
NEEDED = {
    "diffusers": "0.31.0",
    "peft": "0.13.2",
    "imagehash": "4.3",
    "tensorboard": "2.14",
    "safetensors": "0.4.2",
    "transformers": "4.30.2",
    "pyyaml": "5.4",
    "tqdm": "4.60",
    "pillow": "9.5",
    "open-clip-torch": "2.20",  # only for the CLIP BPE vocabulary; installed without its dependencies
}
NO_DEPS = {"open-clip-torch"}


def normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` -> ``pyyaml``, ``open_clip_torch`` -> ``open-clip-torch``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``2.13.0+cpu`` -> (2, 13, 0)."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in numbers.group(0).split(".")) if numbers else (0,)


def installed_distributions() -> dict[str, str]:
    """Every installed distribution: normalized name -> version."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def requirement_for(name: str, installed: dict[str, str]) -> str:
    """The pip requirement for a missing distribution, chosen to fit what is installed."""
    old_transformers = version_tuple(installed.get("transformers", "999")) < (4, 47)
    old_protobuf = version_tuple(installed.get("protobuf", "999")) < (6, 31)
    if name == "diffusers":
        # 0.32+ needs transformers classes that 4.30 lacks (StableDiffusionPipeline import fails)
        return "diffusers==0.31.0" if old_transformers else "diffusers>=0.31.0"
    if name == "peft":
        return "peft==0.13.2" if old_transformers else "peft>=0.13.2"
    if name == "tensorboard":
        return "tensorboard==2.20.0" if old_protobuf else "tensorboard>=2.20.0"
    return f"{name}>={NEEDED.get(name, '0')}"


def needed_names() -> list[str]:
    override = os.environ.get("LORA_TRAINER_REQUIREMENTS")
    if override is not None:
        return [normalize(n) for n in override.split(",") if n.strip()]
    return list(NEEDED)


def plan_install(installed: dict[str, str], names: list[str] | None = None) -> list[str]:
    """Requirements to install: only distributions that are missing; installed ones are left as they are."""
    return [requirement_for(name, installed) for name in (names or needed_names()) if name not in installed]


def too_old(installed: dict[str, str], names: list[str] | None = None) -> list[str]:
    """Installed distributions older than lora-trainer needs (reported, never changed)."""
    return [f"{name} {installed[name]} (needs >= {NEEDED[name]})" for name in (names or needed_names())
            if name in installed and name in NEEDED and version_tuple(installed[name]) < version_tuple(NEEDED[name])]


def constraints_text(installed: dict[str, str]) -> str:
    """A pip constraints file holding every installed distribution at its present version."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def pip_install(args: list[str], desc: str) -> None:
    """``pip install args``: through the WebUI's ``launch.run_pip`` when there (honours --skip-install and
    the index URL), else a subprocess of this interpreter."""
    try:
        import launch  # the WebUI's module; importable when the WebUI runs this file
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--prefer-binary", *args], check=True)
        return
    launch.run_pip("install " + " ".join(f'"{a}"' for a in args), desc)


def install_missing() -> list[str]:
    """Install what is missing; return the requirements installed (empty when nothing was missing)."""
    installed = installed_distributions()
    plan = plan_install(installed)
    if not plan:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write(constraints_text(installed))
        with_deps = [r for r in plan if normalize(re.split(r"[=<>]", r)[0]) not in NO_DEPS]
        without_deps = [r for r in plan if r not in with_deps]
        if with_deps:
            pip_install(["-c", constraints, *with_deps], f"lora-trainer requirements: {', '.join(with_deps)}")
        if without_deps:
            pip_install(["--no-deps", *without_deps], f"lora-trainer requirements: {', '.join(without_deps)}")
    return plan


def main() -> None:
    started = time.perf_counter()
    try:
        done = install_missing()
    except (subprocess.CalledProcessError, RuntimeError) as err:
        print(f"[lora-trainer] could not install its requirements; the WebUI itself is untouched: {err}")
        return
    old = too_old(installed_distributions())
    if old:
        print(f"[lora-trainer] left as installed, but older than it supports: {'; '.join(old)}")
    if done:
        print(f"[lora-trainer] installed {', '.join(done)} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

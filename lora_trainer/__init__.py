"""lora-trainer: LoRA training for Stable Diffusion, as a WebUI tab and a YAML-driven CLI."""

__version__ = "0.1.0"

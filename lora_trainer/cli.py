"""Command line: ``python -m lora_trainer {train,demo,generate,clean,caption}``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_trainer.config import load_config
from lora_trainer.errors import UserError
from lora_trainer.fsutil import describe_os_error


class StopFlag:
    """Set by the first Ctrl-C (the run saves a checkpoint and exits); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self) -> bool:
        return self.stopped

    def install(self, *, launched: bool = False, quiet: bool = False) -> None:
        """Handle Ctrl-C; ``launched`` (by torchrun or accelerate, which pass a Ctrl-C on as SIGINT, and a
        failed process or a scheduler's stop as SIGTERM, then kill after a grace period): SIGTERM too."""
        def handler(signum, frame):  # noqa: ARG001
            if self.stopped:
                raise KeyboardInterrupt
            self.stopped = True
            if not quiet:
                print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...",
                      file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
        if launched:
            signal.signal(signal.SIGTERM, handler)


def _make_trainer(cfg, backbone, bus, stop, dist):
    """The image trainer, or the language-model one for ``task_type: text-generation``."""
    if cfg.task_type == "text-generation":
        from lora_trainer.llm.trainer import TextTrainer

        return TextTrainer(cfg, events=bus, should_stop=stop, dist=dist)
    from lora_trainer.train.trainer import Trainer

    return Trainer(cfg, backbone, events=bus, should_stop=stop, dist=dist)


def run_training(cfg, backbone=None, dist=None) -> int:
    """Train with a tqdm bar and Ctrl-C handling; print where the LoRA went. In a data-parallel run (``dist``)
    only the main process shows the bar and prints."""
    from lora_trainer.config import ignored_keys
    from lora_trainer.train.distributed import SINGLE
    from lora_trainer.train.events import EventBus, MessageEvent
    from lora_trainer.train.progress_bar import ProgressBar

    dist = dist or SINGLE
    stop = StopFlag()
    stop.install(launched=dist.enabled, quiet=not dist.is_main)
    bar = ProgressBar() if dist.is_main else None
    bus = EventBus(bar)
    if ignored_keys(cfg):
        bus.emit(MessageEvent(f"task_type {cfg.task_type} ignores {', '.join(ignored_keys(cfg))}", "warning"))
    try:
        result = _make_trainer(cfg, backbone, bus, stop, dist).run()
    except RuntimeError as err:
        if type(err).__name__ != "OutOfMemoryError":
            raise
        from lora_trainer.ui.job import oom_message

        raise UserError(oom_message(cfg)) from None
    finally:
        if bar is not None:
            bar.close()
    if not dist.is_main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        where = f"checkpoint: {result.checkpoint}" if result.checkpoint else "nothing saved"
        print(f"Interrupted at step {result.steps_done}/{result.total_steps}; {where}")
        print("Resume with: python -m lora_trainer train --config <file> --resume")
        return 130
    print(f"{'Adapter' if cfg.task_type == 'text-generation' else 'LoRA'} saved: {result.lora_path}")
    if getattr(result, "merged_path", None):
        print(f"Merged model saved: {result.merged_path}")
    return 0


def fail(message: str) -> int:
    """Print one error line (no traceback) and give the exit code of an ordinary failure."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {}
    if args.resume is not None:
        overrides["resume_from"] = args.resume
    cfg = load_config(args.config, overrides)
    from lora_trainer.train import distributed

    dist = distributed.start(cfg.device)  # torchrun / accelerate launch: join the others; alone: nothing
    try:
        return run_training(cfg, dist=dist)
    except distributed.PeerFailed:
        return 2  # the main process failed and prints why
    finally:
        dist.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from lora_trainer.demo import demo_config

    cfg = demo_config(Path(args.workdir), steps=args.steps)
    print(f"demo: tiny random SD1.5-topology checkpoint and synthetic data set in {args.workdir}")
    return run_training(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA from a YAML config")
    train.add_argument("--config", required=True, help="YAML file (see README for every key)")
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="continue this run from its newest checkpoint (or the given checkpoint folder of "
                            "this run); an error when it has none")
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help="train a tiny LoRA end to end on a built-in random model and data set")
    demo.add_argument("--workdir", default="lora_trainer_demo", help="folder for the demo's files")
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    demo.set_defaults(func=cmd_demo)
    from lora_trainer.llm.generate_command import add_generate_arguments, run_generate

    generate = sub.add_parser("generate", help="answer a prompt with a trained text-generation adapter")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """The data-set commands live in their own modules."""
    try:
        from lora_trainer.data.clean import add_clean_arguments, run_clean
    except ImportError:
        pass
    else:
        clean = sub.add_parser("clean", help="check, de-duplicate and crop a folder of images into a new one")
        add_clean_arguments(clean)
        clean.set_defaults(func=run_clean)
    try:
        from lora_trainer.caption.run import add_caption_arguments, run_caption
    except ImportError:
        pass
    else:
        caption = sub.add_parser("caption", help="write captions for a folder of images")
        add_caption_arguments(caption)
        caption.set_defaults(func=run_caption)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; ordinary failures (bad input, disk full, read-only, not UTF-8...) are one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileExistsError, FileNotFoundError) as err:
        return fail(str(err))
    except OSError as err:
        return fail(describe_os_error(err))
    except UnicodeDecodeError as err:
        return fail(f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8")

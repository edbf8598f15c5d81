"""Command line: ``python -m lora_trainer {train,demo,clean,caption}``."""

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

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.stopped:
                raise KeyboardInterrupt
            self.stopped = True
            print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...",
                  file=sys.stderr)

        signal.signal(signal.SIGINT, handler)


def run_training(cfg, backbone=None) -> int:
    """Train with a tqdm bar and Ctrl-C handling; print where the LoRA went."""
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.progress_bar import ProgressBar
    from lora_trainer.train.trainer import Trainer

    stop = StopFlag()
    stop.install()
    bar = ProgressBar()
    try:
        result = Trainer(cfg, backbone, events=EventBus(bar), should_stop=stop).run()
    except RuntimeError as err:
        if type(err).__name__ != "OutOfMemoryError":
            raise
        from lora_trainer.ui.job import oom_message

        raise UserError(oom_message(cfg)) from None
    finally:
        bar.close()
    if result.interrupted:
        where = f"checkpoint: {result.checkpoint}" if result.checkpoint else "nothing saved"
        print(f"Interrupted at step {result.steps_done}/{result.total_steps}; {where}")
        print("Resume with: python -m lora_trainer train --config <file> --resume")
        return 130
    print(f"LoRA saved: {result.lora_path}")
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
    return run_training(cfg)


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

"""``lora-diffusion train`` and ``examples/train_style.py``: flags (built from ``TrainConfig``) -> ``train``.

Example:
    $ lora-diffusion train --pretrained_model_name_or_path ./sd15 --train_data_dir data/style \\
        --output_dir out --token "<my-style>" --max_train_steps 500
    $ accelerate launch --num_processes 2 examples/train_style.py --config style.toml
"""

from __future__ import annotations

import argparse
import sys

from ..cli import setup_logging
from .config import ConfigError, add_config_arguments, config_from_args, write_config_file
from .data import DataError

__all__ = ["register", "build_parser", "main", "run"]

DESCRIPTION = (
    "Train a style or subject (DreamBooth) LoRA for a Stable Diffusion 1.x/2.x or SDXL model. Writes "
    "pytorch_lora_weights.safetensors (loads with pipe.load_lora_weights(output_dir)), checkpoints/, samples/, "
    "log.csv and loss.png into --output_dir. Flags may also come from --config FILE (TOML/YAML, same names)."
)
EPILOG = "Multi-GPU or multi-process: accelerate launch --num_processes N examples/train_style.py ..."


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # after the subcommand too (`lora-diffusion train ... -v`); SUPPRESS keeps a `-v` given before it
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    add_config_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def register(subparsers) -> None:
    """Add the ``train`` command to the ``lora-diffusion`` dispatcher."""
    _configure(subparsers.add_parser("train", help="train a style or subject LoRA", description=DESCRIPTION, epilog=EPILOG))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The standalone parser of ``examples/train_style.py`` (the same flags as ``lora-diffusion train``)."""
    return _configure(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG))


def run(args: argparse.Namespace) -> int:
    """Train from parsed flags. Exit status: 0 done, 1 stopped on NaN/Inf loss, 2 bad settings or data, 130 cancelled."""
    from .loop import train

    try:
        if getattr(args, "output_config", False):  # (kohya's: the settings given written into --config's file, then stop)
            if not getattr(args, "config", None):
                raise ConfigError("--output_config writes the settings into --config's file: give its name")
            given = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "config"}))
            print(f"settings written to {write_config_file(given, args.config)}")
            return 0
        result = train(config_from_args(args))
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C while saving: files on disk stay whole
        print("cancelled (Ctrl-C); the newest checkpoint on disk, if any, is intact", file=sys.stderr)
        return 130
    print(result.message, file=sys.stderr if result.status != "completed" else sys.stdout)
    return {"completed": 0, "diverged": 1, "cancelled": 130}[result.status]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

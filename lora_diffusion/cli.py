"""``lora-diffusion`` command line: ``train``, ``merge``, ``convert``, ``bake``, ``inspect``, ``ui``.

Each command lives beside the code it drives and registers itself through a ``register(subparsers)``
function; this file only lists the modules and dispatches.

Example:
    $ lora-diffusion inspect style.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> what it provides; each module defines register(subparsers) adding parsers with set_defaults(func=...)
COMMAND_MODULES = {
    "lora_diffusion.training.cli": "train",
    "lora_diffusion.tools": "merge, convert, bake, inspect",
    "ui.cli": "ui",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-diffusion", description="LoRA for Stable Diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # that part of the toolkit is not installed
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

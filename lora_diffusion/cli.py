"""``lora-diffusion`` command line: ``train``, ``merge``, ``convert``, ``bake``, ``inspect``, ``ui``.

Each command lives beside the code it drives and registers itself through a ``register(subparsers)``
function; this file only lists the modules and dispatches. A user error (a bad file, path or argument) prints one
``error: ...`` line and exits with status 2; ``--debug`` (or ``LORA_DIFFUSION_DEBUG=1``) shows the traceback.

Example:
    $ lora-diffusion inspect style.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# module -> what it provides; each module defines register(subparsers) adding parsers with set_defaults(func=...)
COMMAND_MODULES = {
    "lora_diffusion.training.cli": "train",
    "lora_diffusion.tools": "merge, convert, bake, inspect",
    "lora_diffusion.generate": "generate",
    "ui.cli": "ui",
}


class _DropTorchvisionFallback(logging.Filter):
    """transformers >= 5 says once, when diffusers' pipeline classes load, that ``CLIPImageProcessor`` falls back to
    its PIL backend without torchvision (the CPU install the README gives). Our pipelines run no image processor (no
    safety checker), so the commands drop that line; every other message of transformers stands."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def setup_logging(verbose: bool = False) -> None:
    """The commands' logging: ``WARNING`` (``verbose``: ``INFO``) as ``LEVEL logger: message``, without
    transformers' torchvision notice (``_DropTorchvisionFallback``)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fallback = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in fallback.filters):
        fallback.addFilter(_DropTorchvisionFallback())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-diffusion", description="LoRA for Stable Diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # that part of the toolkit is not installed
            raise
        module.register(sub)
    for command in sub.choices.values():  # `lora-diffusion inspect x --debug` too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    return parser


def error_message(e: BaseException) -> str:
    """One line for a user error: LoRA format, file or path, bad value, unknown name, not a model folder."""
    if type(e).__name__ == "HFValidationError":  # huggingface_hub: neither an existing folder nor a valid hub id
        return f"not a diffusers folder or hub id ({' '.join(str(e).split())})"
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    return " ".join(str(text).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("LORA_DIFFUSION_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError) as e:  # LoraFormatError and HFValidationError are ValueErrors
        if debug:
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

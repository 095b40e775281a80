"""``lora-diffusion ui`` / ``python -m ui``: options, then ``build_demo(backend).launch(...)``.

Binds to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public gradio.live link) is off by default.
gradio is imported only when the app starts, so ``lora-diffusion --help`` stays fast.

Example:
    $ lora-diffusion ui --model ./my-sd15 --lora-dir loras --data-root ~/datasets --auth me:secret
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from lora_diffusion.cli import setup_logging

logger = logging.getLogger(__name__)

__all__ = ["register", "main", "add_arguments", "parse_auth", "launch_kwargs", "run"]

DESCRIPTION = ("Start the web UI (train, generate, merge, library). It listens on 127.0.0.1 unless --host says "
               "otherwise; --auth USER:PASS guards every route.")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local diffusers folder, hub id or single-file .safetensors checkpoint (default: the "
                             "bundled tiny model; where that is not installed, lora_diffusion.testing.tiny_pipeline(0) built in code)")
    parser.add_argument("--model-config", default=None, metavar="DIR",
                        help="for a single-file --model: a diffusers folder or hub id of the same architecture to take its "
                             "configs and tokenizers from (default: fetched from the Hub)")
    parser.add_argument("--lora-dir", default="./loras", help="the LoRA library folder (default ./loras)")
    parser.add_argument("--data-root", default=None, help="folder whose sub-folders may be picked as training images")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login for every page and API route")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload (default 512 MB)")
    parser.add_argument("--fp8-weight", action="store_true", help="A1111's FP8 weight: the UNet's Linear and Conv2d "
                        "weights stored in float8 (about half their memory), each cast up for its own call")


def register(subparsers) -> None:
    """Add the ``ui`` command to the ``lora-diffusion`` dispatcher."""
    parser = subparsers.add_parser("ui", help="start the Gradio web UI (train, generate, merge, library)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` -> ``("user", "pass")`` (the password may contain ``:``)."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth expects USER:PASS")
    return user, password


def launch_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for ``gr.Blocks.launch`` from the parsed options."""
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):  # (0 or less: gradio refused every upload)
        raise ValueError(f"--max-upload-mb must be a positive number, got {args.max_upload_mb}")
    return {
        "server_name": args.host,
        "server_port": args.port,
        "auth": parse_auth(args.auth),
        "share": bool(args.share),
        "max_file_size": int(args.max_upload_mb * 1024 * 1024),  # gradio refuses larger uploads before they land
        "show_error": False,
    }


def run(args: argparse.Namespace) -> int:
    """Build the backend and the app from ``args`` and serve until interrupted."""
    from ui.handlers import Backend

    kwargs = launch_kwargs(args)  # (a bad --auth is refused before anything loads)
    backend = Backend(args.model, args.lora_dir, args.data_root, max_upload_mb=args.max_upload_mb, model_config=args.model_config,
                      fp8_weight=args.fp8_weight)
    try:
        from ui.app import build_demo, launch
    except ModuleNotFoundError as e:  # the `ui` extra is not installed: one line, not a traceback
        if e.name not in ("gradio", "pandas"):
            raise
        raise OSError(f"the UI needs {e.name}: pip install 'lora-diffusion[ui]'") from None
    if kwargs["server_name"] not in ("127.0.0.1", "localhost", "::1") and not kwargs["auth"]:
        logger.warning("serving on %s without --auth: anyone who can reach this port can use the UI", args.host)
    launch(build_demo(backend), **kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ui [options]``."""
    parser = argparse.ArgumentParser(prog="python -m ui", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # as lora-diffusion does: one line, status 2
        print(f"error: {e}", file=sys.stderr)
        return 2

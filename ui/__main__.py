"""``python -m ui``: start the Gradio app (same options as ``lora-diffusion ui``)."""

import sys

from ui.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The ``lora-diffusion ui`` Gradio app: ``ui.app.build_demo`` (widgets) over ``ui.handlers.Backend`` (plain Python).

Importing this package imports neither gradio nor a model.

Example:
    $ lora-diffusion ui --lora-dir loras          # or: python -m ui
"""

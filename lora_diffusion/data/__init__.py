"""Procedural shape data, image metrics and the bundled tiny text-to-image model.

Everything here is offline and deterministic: the images are drawn with numpy/PIL from a seed, and
``TINY_MODEL`` points at a complete diffusers ``StableDiffusionPipeline`` folder shipped with the package.

Example:
    >>> from lora_diffusion.data import TINY_MODEL, caption_for, sample_spec
    >>> import numpy as np
    >>> caption_for(sample_spec(np.random.default_rng(0)))  # doctest: +SKIP
    'a green triangle on a gray background'
"""

from __future__ import annotations

import os

from lora_diffusion.data.metrics import (
    background_color,
    classify_shape,
    dominant_color,
    estimate_background,
    foreground_mask,
    saturation,
    shape_iou,
    shape_scores,
    stripe_energy,
)
from lora_diffusion.data.shapes import (
    BACKGROUNDS,
    BASE_SHAPES,
    COLORS,
    NEW_SHAPES,
    SHAPES,
    STYLES,
    ShapeSpec,
    caption_for,
    generate_dataset,
    render,
    render_array,
    render_mask,
    sample_spec,
)

#: Absolute path of the bundled tiny ``StableDiffusionPipeline`` (64x64 images, fp16 safetensors).
TINY_MODEL: str = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-shapes")

__all__ = [
    "BACKGROUNDS",
    "BASE_SHAPES",
    "COLORS",
    "NEW_SHAPES",
    "SHAPES",
    "STYLES",
    "TINY_MODEL",
    "ShapeSpec",
    "background_color",
    "caption_for",
    "classify_shape",
    "dominant_color",
    "estimate_background",
    "foreground_mask",
    "generate_dataset",
    "render",
    "render_array",
    "render_mask",
    "sample_spec",
    "saturation",
    "shape_iou",
    "shape_scores",
    "stripe_energy",
]

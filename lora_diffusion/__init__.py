"""lora_diffusion: LoRA for Stable Diffusion — inject, train, blend, fuse, merge and convert adapters.

Example:
    >>> from lora_diffusion import inject_lora, save_lora, load_lora, set_adapters, fuse
    >>> params = inject_lora(pipe.unet, rank=4)                       # train these
    >>> save_lora("style.safetensors", unet=pipe.unet)               # loads in stock diffusers too
    >>> load_lora(other_pipe, "style.safetensors", weight=0.8)
"""

__version__ = "0.1.0"

from .blend import apply_prompt_loras, merge_loras, parse_prompt
from .formats import LoraFormatError, read_lora_file, write_lora_file
from .inject import TARGET_PRESETS, inject_lora, remove_lora
from .layers import LoraConv2d, LoraDropout, LoraLayer, LoraLinear
from .pipeline import (
    cache_merged_weights,
    delete_adapter,
    disable_lora,
    enable_lora,
    fuse,
    list_adapters,
    load_embedding,
    load_lora,
    load_single_file,
    save_lora,
    set_adapters,
    unfuse,
)

__all__ = [
    "__version__",
    "inject_lora",
    "remove_lora",
    "save_lora",
    "load_lora",
    "load_embedding",
    "set_adapters",
    "disable_lora",
    "enable_lora",
    "list_adapters",
    "delete_adapter",
    "fuse",
    "unfuse",
    "cache_merged_weights",
    "load_single_file",
    "TARGET_PRESETS",
    "LoraLayer",
    "LoraLinear",
    "LoraConv2d",
    "LoraDropout",
    "LoraFormatError",
    "read_lora_file",
    "write_lora_file",
    "merge_loras",
    "parse_prompt",
    "apply_prompt_loras",
]

"""Shared helpers for the UI tests: LoRA files on the tiny pipeline, image files, a tiny model folder."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion import inject_lora, save_lora
from lora_diffusion.formats import LoraWeights, write_lora_file
from lora_diffusion.testing import tiny_pipeline

from conftest import randomize_lora

SIZE = 32  # generate 32x32 images (16x16 latents) in tests
STEPS = 3


def make_lora(path, seed: int, *, te: bool = True, rank: int = 4, std: float = 0.3, metadata: dict | None = None,
              base=None) -> Path:
    """A LoRA file with random (non-zero) factors for ``base()`` (default ``tiny_pipeline(0)``)."""
    pipe = base() if base else tiny_pipeline(0)
    inject_lora(pipe.unet, rank=rank)
    randomize_lora(pipe.unet, seed=seed, std=std)
    if te:
        inject_lora(pipe.text_encoder, rank=2)
        randomize_lora(pipe.text_encoder, seed=seed + 100, std=std)
    return save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder if te else None,
                     metadata=metadata or {"trigger_words": [f"<s{seed}>"], "base_model": "tiny"}, dtype=torch.float32)


def make_foreign_lora(path) -> Path:
    """A LoRA made for an SD 1.x UNet (320 channels, 768-d cross-attention): no layer of the tiny model matches."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    write_lora_file(path, {key: LoraWeights(torch.randn(4, 768), torch.randn(320, 4), 4.0)})
    return Path(path)


def make_images(folder, n: int = 3, *, corrupt: int = 0) -> list[Path]:
    """``n`` small PNGs of coloured squares (with ``.txt`` captions) and ``corrupt`` unreadable ``.png`` files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[16:48, 16:48] = rng.integers(0, 255, 3)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        p.with_suffix(".txt").write_text(f"a square number {i}")
        paths.append(p)
    for i in range(corrupt):
        p = folder / f"broken{i}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        paths.append(p)
    return paths


def bundled_pipeline():
    """The bundled tiny model (the UI's default ``--model``)."""
    from diffusers import StableDiffusionPipeline

    from lora_diffusion.data import TINY_MODEL

    return StableDiffusionPipeline.from_pretrained(TINY_MODEL, safety_checker=None)


def tiny_model_dir(folder) -> str:
    """``tiny_pipeline(0)`` saved as a diffusers folder (what ``--model`` points at), its text encoder's final norm
    given a bias as CLIP's has (A1111's emphasis keeps the states' mean, which is ~0 without one)."""
    pipe = tiny_pipeline(0)
    with torch.no_grad():
        getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm.bias.normal_(
            0.3, 0.1, generator=torch.Generator().manual_seed(0))
    pipe.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else Image.open(image).convert("RGB"), dtype=np.int16)

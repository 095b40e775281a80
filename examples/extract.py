"""A fine-tuned model's change as a LoRA: extract it, resize it, and generate with it.

    python examples/extract.py                                          # offline: the tiny pipeline and a stand-in fine-tune
    python examples/extract.py --base models/sd15 --tuned models/sd15-finetuned --rank 32

Writes extracted.safetensors (rank --rank), resized.safetensors (a rank per layer keeping 90 % of each change's
Frobenius norm, at most half of --rank) and tuned.png / extracted.png (the same seed) into --out, and prints the
errors of both.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion import fuse, load_lora, merge_loras
from lora_diffusion.extract import extract_lora
from lora_diffusion.formats import write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline

logger = logging.getLogger("extract")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="the original model: a diffusers folder or single file (default: the tiny pipeline)")
    parser.add_argument("--tuned", help="the fine-tuned model (default: the tiny pipeline with a rank-8 change fused in)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt", default="a red circle on a blue square")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="extract_out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.base and args.tuned:
        from lora_diffusion.tools import load_model

        base, tuned = load_model(args.base), load_model(args.tuned)
    else:  # a stand-in fine-tune: a random rank-8 change (UNet attention, text encoder) fused into the tiny model
        base, tuned = tiny_pipeline(0), tiny_pipeline(0)
        write_lora_file(out / "finetune.safetensors", random_lora(tuned, seed=3, rank=8, alpha=8), dtype=torch.float32)
        load_lora(tuned, out / "finetune.safetensors")
        fuse(tuned)

    report = extract_lora(base, tuned, out / "extracted.safetensors", rank=args.rank, dtype=torch.float32, overwrite=True)
    logger.info("extracted %d layers at rank %d: relative error %.2e (worst layer %.2e)", len(report.lora), args.rank,
                report.error, max(report.errors.values()))
    resized = merge_loras({out / "extracted.safetensors": 1.0}, out / "resized.safetensors", mode="svd",
                          rank=max(1, args.rank // 2), fro=0.9, dtype=torch.float32)
    logger.info("resized: ranks %s, relative error %.2e", resized.ranks, resized.error)

    load_lora(base, out / "extracted.safetensors")  # the original model with the extracted LoRA
    images = {}
    for name, pipe in (("tuned", tuned), ("extracted", base)):
        g = torch.Generator().manual_seed(0)
        image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size, generator=g,
                     output_type="np").images[0]
        images[name] = (image * 255).round().astype(np.uint8)
        Image.fromarray(images[name]).save(out / f"{name}.png")
    diff = np.abs(images["tuned"].astype(int) - images["extracted"].astype(int)).max()
    logger.info("wrote %s: the tuned model and the base with the extracted LoRA differ by at most %d / 255", out, diff)


if __name__ == "__main__":
    main()

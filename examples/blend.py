"""Two LoRAs in a plain diffusers pipeline: weighted blend, unfused and fused, then a merged file.

    python examples/blend.py                                   # offline: tiny pipeline and two random LoRAs
    python examples/blend.py --model models/sd15 --lora style.safetensors:0.8 --lora subject.safetensors:1.0

Writes blend_unfused.png, blend_fused.png and merged.safetensors into --out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion import fuse, load_lora, merge_loras, set_adapters, unfuse
from lora_diffusion.formats import write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline

logger = logging.getLogger("blend")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a diffusers model folder (default: the tiny offline pipeline)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE:WEIGHT")
    parser.add_argument("--prompt", default="a red circle on a blue square")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="blend_out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model)
    else:
        pipe = tiny_pipeline(0)
    files = {}
    for spec in args.lora:
        path, _, weight = spec.rpartition(":")
        files[Path(path)] = float(weight)
    if not files:  # two random LoRAs with different ranks and alphas stand in for real ones
        for name, seed, rank, alpha, weight in (("style", 1, 4, 8.0, 0.8), ("subject", 2, 8, 4.0, 1.0)):
            path = out / f"{name}.safetensors"
            write_lora_file(path, random_lora(pipe, seed=seed, rank=rank, alpha=alpha), dtype=torch.float32)
            files[path] = weight

    names = {load_lora(pipe, path): w for path, w in files.items()}
    set_adapters(pipe, names)  # e.g. {"style": 0.8, "subject": 1.0}; text_encoder= and blocks= refine it

    def render(name: str) -> np.ndarray:
        g = torch.Generator().manual_seed(0)
        image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size, generator=g, output_type="np").images[0]
        Image.fromarray((image * 255).round().astype("uint8")).save(out / f"{name}.png")
        return image

    unfused = render("blend_unfused")
    fuse(pipe)  # zero added latency from here on
    fused = render("blend_fused")
    logger.info("fused vs unfused: max abs difference %.2e", np.abs(fused - unfused).max())
    set_adapters(pipe, {n: w / 2 for n, w in names.items()})  # re-weighting while fused: no reload
    render("blend_fused_half")
    unfuse(pipe)

    report = merge_loras(files, out / "merged.safetensors")  # exact: ranks add up
    logger.info("merged %d files into %s (ranks %s)", len(files), report.path, report.ranks)


if __name__ == "__main__":
    main()

"""Quickstart: the LoRA life cycle on a tiny offline pipeline, in seconds, with no downloads.

Builds a tiny Stable Diffusion pipeline, injects two adapters (random "trained" factors stand in for training),
saves them in the diffusers format, loads them back into a fresh pipeline, blends them, fuses, and writes
`out/quickstart.png` (base | adapter a | adapter b | 50/50 blend, fused).

Run: python examples/quickstart.py [--out out]
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion import fuse, inject_lora, load_lora, save_lora, set_adapters, unfuse
from lora_diffusion.inject import lora_parameters
from lora_diffusion.testing import tiny_pipeline


def generate(pipe, seed=0):
    out = pipe("a red circle", num_inference_steps=10, height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    out = Path(args.out)

    for name, seed in (("a", 1), ("b", 2)):
        pipe = tiny_pipeline(0)
        inject_lora(pipe.unet, rank=4, alpha=8)
        with torch.no_grad():  # stand-in for training: give B non-zero values
            g = torch.Generator().manual_seed(seed)
            for p in lora_parameters(pipe.unet):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        print("saved", save_lora(out / f"{name}.safetensors", unet=pipe.unet, metadata={"trigger_words": [name]}))

    pipe = tiny_pipeline(0)
    tiles = [generate(pipe)]
    load_lora(pipe, out / "a.safetensors")
    load_lora(pipe, out / "b.safetensors")
    for weights in ({"a": 1.0}, {"b": 1.0}):
        set_adapters(pipe, weights)
        tiles.append(generate(pipe))
    set_adapters(pipe, {"a": 0.5, "b": 0.5})
    fuse(pipe)  # zero added latency from here on
    tiles.append(generate(pipe))
    unfuse(pipe)
    grid = (np.concatenate(tiles, axis=1) * 255).round().astype("uint8")
    Image.fromarray(grid).save(out / "quickstart.png")
    print("wrote", out / "quickstart.png", "(base | a | b | 0.5a + 0.5b fused)")


if __name__ == "__main__":
    main()

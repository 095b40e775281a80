"""What a LoRA step on fp8-stored weights holds, measured on any device: the weights' bytes and the bytes autograd
saves for the backward (``torch.autograd.graph.saved_tensors_hooks``), for the bf16 model, kohya's ``--fp8_base``
(the weights cast to fp8, autocast casting each back at every call) and ours (``lora_diffusion.fp8.store_fp8``).

An SD1.5-shaped UNet with random weights (the GPU bench's shapes), bf16, LoRA r=4 on the attention projections,
batch 1. The GPU's allocator peak (``bench/gpu.py --fp8``) adds workspace and transient casts; this counts what
stays alive across the step. One JSON line per variant, its total against the bf16 model's.

    python bench/fp8_memory.py                  # 32x32 latents (256 px): ~10 minutes on 2 CPU cores
    python bench/fp8_memory.py --latent 8 --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SD15_UNET, TINY_UNET, Context, cpu_name, emit, kohya_fp8, log, quiet  # noqa: E402

import lora_diffusion as ld  # noqa: E402
from lora_diffusion.fp8 import store_fp8  # noqa: E402


def held_bytes(unet: nn.Module, x: torch.Tensor, context: torch.Tensor) -> tuple[int, int]:
    """(the parameters' bytes, the bytes saved for the backward that are not parameters) of one step."""
    parameters = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = unet(x, 500, context).sample
    out.float().square().mean().backward()
    return sum(parameters.values()), sum(saved.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (64: 512 px)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (smoke run)")
    parser.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    args = parser.parse_args(argv)
    quiet()
    from diffusers import UNet2DConditionModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY_UNET if args.tiny else SD15_UNET
    torch.manual_seed(0)
    with torch.device(device):
        proto = UNet2DConditionModel(**shapes).to(torch.bfloat16).requires_grad_(False)
    ctx = Context(device=torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(), dtype="bfloat16",
                  threads=torch.get_num_threads(), extra={"model": "tiny" if args.tiny else "SD1.5 UNet", "latent": args.latent,
                                                          "gradient_checkpointing": args.checkpointing})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device, torch.bfloat16)
    context = torch.randn(1, 77, shapes["cross_attention_dim"], generator=gen).to(device, torch.bfloat16)
    reference = None
    for variant in ("bf16", "fp8, kohya's", "fp8, ours"):
        log(f"{variant}: one LoRA step")
        unet = copy.deepcopy(proto)
        ld.inject_lora(unet, rank=4, targets="attn")
        if args.checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        if variant == "fp8, ours":
            store_fp8([("unet", unet)], torch.bfloat16)
        elif variant != "bf16":
            kohya_fp8(unet)
        weights, saved = held_bytes(unet, x, context)
        total = (weights + saved) / 2**20
        reference = reference or total
        emit(ctx, "fp8_held", f"LoRA step, batch 1, {variant} base", total, reference, "bf16_base", unit="mb",
             weights_mb=round(weights / 2**20, 1), saved_for_backward_mb=round(saved / 2**20, 1))
        del unet


if __name__ == "__main__":
    main()

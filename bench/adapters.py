"""Micro-benchmark: cost of one unfused UNet call with 0, 1, 4 and 8 active adapters, ours beside diffusers+PEFT.

Ours runs all active adapters of a layer as one concatenated pair of low-rank matmuls, so the cost should stay
flat as adapters are added; PEFT loops over adapters in Python. Both UNets get the same random LoRAs (rank 8 on
attention q/k/v/out) at the same weights. Prints the best-of-reps ms per call and the ratio to the no-adapter call.

    python bench/adapters.py                     # small SD-shaped UNet on CPU, well under a minute
    python bench/adapters.py --sd15 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch


def build_unet(sd15: bool):
    from diffusers import UNet2DConditionModel

    if sd15:
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), 768, 64
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet, 64, 16


def timed(fn, reps: int, sync) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3  # the least disturbed call: CPU machines are often shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 UNet shapes (use a GPU)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--counts", default="0,1,4,8")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    import diffusers
    import peft

    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.inject import lora_layers
    from lora_diffusion.pipeline import apply_lora
    from lora_diffusion.testing import random_lora

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counts = [int(c) for c in args.counts.split(",")]
    torch.manual_seed(0)
    ours, ctx, size = build_unet(args.sd15)
    ref, _, _ = build_unet(args.sd15)
    ref.load_state_dict(ours.state_dict())
    loras = [random_lora(SimpleNamespace(unet=ours), seed=i, rank=8, text_encoder_targets=None, std=0.02) for i in range(max(counts))]
    tmp = Path(tempfile.mkdtemp())
    for i, lora in enumerate(loras):
        apply_lora(ours, "unet", lora, f"a{i}")
        write_lora_file(tmp / f"a{i}.safetensors", lora, dtype=torch.float32)
        ref.load_lora_adapter(str(tmp / f"a{i}.safetensors"), prefix="unet", adapter_name=f"a{i}")
    ours.to(device, dtype).eval()
    ref.to(device, dtype).eval()
    sample = torch.randn(2, 4, size, size, device=device, dtype=dtype)  # one CFG call: batch 2
    text = torch.randn(2, 77, ctx, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"{args.dtype}, {'SD1.5' if args.sd15 else 'small'} UNet, batch 2, rank 8 attention adapters")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, threads {torch.get_num_threads()}")
    print(f"{'adapters':>8} {'ours ms':>9} {'x base':>7} {'peft ms':>9} {'x base':>7}")
    base = {}
    with torch.inference_mode():
        for n in counts:
            names = [f"a{i}" for i in range(n)]
            for _, layer in lora_layers(ours):
                layer.set_weights({name: 0.5 for name in names})
            if n:
                ref.enable_adapters()
                ref.set_adapters(names, [0.5] * n)
            else:
                ref.disable_adapters()
            row = []
            for label, model in (("ours", ours), ("peft", ref)):
                ms = timed(lambda: model(sample, t, encoder_hidden_states=text), args.reps, sync)
                base.setdefault(label, ms)
                row += [ms, ms / base[label]]
            print(f"{n:>8} {row[0]:>9.2f} {row[1]:>7.2f} {row[2]:>9.2f} {row[3]:>7.2f}")


if __name__ == "__main__":
    main()

"""Shared helpers for the training tests (SD 1.x and SDXL): flat training images, the denoising objective measured
at fixed noise, a model's base (non-LoRA) state."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from lora_diffusion.training.loop import condition, diffusion_target

RED = (220, 30, 30)
PROMPT = "an image in the style of <s>"


def flat_images(folder: Path, n: int = 4, colour=RED, size=(32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")
    return folder


def denoising_loss(pipe, n: int = 8) -> float:
    """Loss of the pipeline's UNet on red 32x32 images with ``PROMPT`` at fixed noise and timesteps (the training
    objective, measured; SDXL conditioned as training conditions it, the images uncropped)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(123)
    pixels = (torch.tensor(RED, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(n, 3, 32, 32)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
        states, added = condition(pipe, [PROMPT] * n, torch.tensor([[32, 32, 0, 0, 32, 32]] * n), "cpu", torch.float32)
        extra = {"added_cond_kwargs": added} if added is not None else {}
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, states, **extra).sample
    return torch.nn.functional.mse_loss(pred, diffusion_target(scheduler, latents, noise, t)).item()


def base_state(model) -> dict[str, torch.Tensor]:
    """``model``'s state without its LoRA factors, under the base model's keys."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}

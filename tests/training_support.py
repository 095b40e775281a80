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


def same_lora_from_a_single_file(base: str, tmp_path: Path, config, monkeypatch) -> None:
    """``base`` written as one original-layout checkpoint (as A1111 and Civitai share models) loads as the same
    model class with the same weights, its configs and tokenizer(s) from ``--single_file_config`` (offline; by
    default diffusers fetches those from the Hub), and trains into the LoRA the folder trains, bit for bit. (With
    every weight copied afresh after loading, in both runs: a checkpoint's tensors sit at other memory alignments
    than a folder's, which steers some CPU backward kernels' rounding, and Adam turns that into lr-sized steps
    where a gradient is near zero.)"""
    from lora_diffusion.formats import atomic_save, read_safetensors
    from lora_diffusion.tools import to_ldm_checkpoint
    from lora_diffusion.training import loop, train

    load = loop.load_pipeline
    single = tmp_path / "model.safetensors"
    folder = load(base)
    atomic_save(to_ldm_checkpoint(folder), single, {"format": "pt"})
    loaded = load(str(single), base)
    assert type(loaded) is type(folder)
    parts = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(folder, name, None) is not None]
    for name in parts:
        theirs = getattr(loaded, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(folder, name).state_dict().items()), name

    def realigned(*args):
        pipe = load(*args)
        for name in parts:
            for p in getattr(pipe, name).parameters():
                p.data = p.data.clone()
        return pipe

    monkeypatch.setattr(loop, "load_pipeline", realigned)
    runs = [config(str(single), tmp_path / "single", single_file_config=base, max_train_steps=2),
            config(base, tmp_path / "folder", max_train_steps=2)]
    files = [read_safetensors(train(c).lora_path)[0] for c in runs]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])

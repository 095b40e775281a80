"""The training loop: data -> latents -> noise -> loss -> step, on accelerate, resumable, with progress.

``train(config)`` runs one LoRA training (style or DreamBooth subject, UNet and optionally text encoder) and
returns a ``TrainResult``. Every random draw of optimizer step ``s`` comes from a generator seeded by
``(seed, s, micro-batch, process)`` and the batch order is a pure function of the seed, so a run resumed from a
checkpoint produces the same weights as one that never stopped. With several processes (``accelerate launch``)
each takes its own batches and the LoRA gradients are averaged across processes before every step; only the main
process writes files.

Example:
    >>> from lora_diffusion.training import TrainConfig, train
    >>> config = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
    ...                      train_data_dir="data/style", output_dir="out", token="<my-style>", max_train_steps=500)
    >>> result = train(config, progress=lambda p: print(p["step"], p["loss"]))
    >>> pipe.load_lora_weights(result.output_dir)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import atomic_save, read_lora_file, read_safetensors
from ..fp8 import restore_fp8, store_fp8
from ..inject import inject_lora, set_backward
from ..layers import LoraDropout
from ..pipeline import SDXL_EMBEDDING_KEYS, _unet_architecture, load_single_file, load_vae, lora_from_model, save_lora
from ..tools import convert_lora
from . import outputs
from .config import COMPILE_MODES, ConfigError, TrainConfig
from ..prompts import (apply_token_weights, check_clip_skip, encode_text, join_chunks, prompt_embeds, prompt_kwargs, token_ids,
                       weighted_token_ids)
from .dataset_config import read_dataset_config
from .data import (BatchPlan, DataError, DatasetSize, Example, ImageDataset, KohyaBuckets, StepBatchSampler, attach_masks, collate,
                   dataset_summary, mix_seed, read_fine_tuning_metadata, scan_images, stack_masks)
from .samples import read_sample_prompts, sample_due, sample_file_name, scheduler_for_sampler

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "diffusion_target", "load_pipeline", "compile_unet"]

ProgressCallback = Callable[[dict], Any]
LOG_EVERY = 10  # steps between rewrites of log.csv / loss.png
PREVIOUS_RUN = ".previous-run-"  # prefix of the hidden folder holding a run that --overwrite replaces


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --save_precision


@dataclass
class TrainResult:
    """What a run produced. ``status`` is ``"completed"``, ``"cancelled"`` or ``"diverged"`` (NaN/Inf loss)."""

    status: str
    message: str
    output_dir: Path
    global_step: int
    max_steps: int
    lora_path: Path | None = None  # the final LoRA (completed runs only)
    kohya_path: Path | None = None  # its kohya copy (``save_kohya``)
    checkpoint: Path | None = None  # the newest checkpoint on disk
    final_loss: float | None = None
    val_loss: float | None = None  # the last validation loss (``validation_split``)
    sample_paths: list[Path] = field(default_factory=list)
    log_path: Path | None = None
    pipeline: Any = field(default=None, repr=False)  # the pipeline with the trained adapter "default" in it


# ---------------------------------------------------------------------------------------------- building blocks
def _model_index(path: Path) -> dict:
    """A diffusers folder's ``model_index.json`` (``{}`` where it is missing or unreadable)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def load_pipeline(name_or_path: str, single_file_config: str | None = None):
    """``StableDiffusionPipeline`` (or, for a folder whose ``model_index.json`` says so or an SDXL single file,
    ``StableDiffusionXLPipeline``) from a diffusers folder, a hub id or a single checkpoint file (no safety checker).
    ``single_file_config``: for a single file, a diffusers folder or hub id of the same architecture whose configs
    and tokenizers to use (default: diffusers fetches those of the base model it infers from the weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(name_or_path).expanduser()
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if path.is_file():
        pipe = load_single_file(path, config=single_file_config)
    elif path.is_dir() and _model_index(path).get("_class_name") == StableDiffusionXLPipeline.__name__:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_model(name_or_path: str, single_file_config: str = ""):
    """``load_pipeline``, with a failure turned into a one-line ``ConfigError`` naming the model and, in a diffusers
    folder, the component that did not load (the original exception stays chained)."""
    try:
        pipe = load_pipeline(name_or_path, single_file_config or None)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError, pickle.UnpicklingError) as e:
        flag = f"--pretrained_model_name_or_path {name_or_path}"
        cause = _first_line(e)
        path = Path(name_or_path).expanduser()
        if path.is_file():
            raise ConfigError(f"{flag}: cannot load it as a single-file Stable Diffusion checkpoint ({cause})") from e
        if path.is_dir():
            components = [k for k, v in _model_index(path).items() if isinstance(v, list) and v and v[0]]
            failed = next((c for c in components if str(path / c) in str(e)), None)
            raise ConfigError(f"{path}: cannot load the {failed or 'model'} ({cause})") from e
        raise ConfigError(f"{flag}: no such model folder, and it did not load from the Hugging Face Hub "
                          f"(offline, a typo, or a private model?)") from e
    _check_sd_model(pipe, name_or_path)
    return pipe


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` is an SDXL pipeline (two text encoders, size and crop conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def _check_sd_model(pipe, name_or_path: str) -> None:
    """A model whose parts do not fit together as SD 1.x/2.x or SDXL fails here in one line, not on the first
    step's shapes: e.g. an SDXL folder without ``_class_name`` loads as a StableDiffusionPipeline without a word (its
    second text encoder left out, its UNet expecting wider text features)."""
    unet = pipe.unet.config
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl(pipe) else [])
    width = sum(e.config.hidden_size for e in encoders)
    kind = "SDXL" if is_sdxl(pipe) else "Stable Diffusion 1.x/2.x"
    if (getattr(unet, "addition_embed_type", None) == "text_time") != is_sdxl(pipe):
        what = ("an SDXL pipeline whose UNet lacks SDXL's size conditioning" if is_sdxl(pipe)
                else "an SDXL UNet without SDXL's second text encoder")
        raise ConfigError(f"--pretrained_model_name_or_path {name_or_path}: {what} (model_index.json's _class_name "
                          f"should be StableDiffusionXLPipeline for SDXL)")
    if isinstance(unet.cross_attention_dim, int) and unet.cross_attention_dim != width:
        raise ConfigError(f"--pretrained_model_name_or_path {name_or_path}: the UNet expects {unet.cross_attention_dim}-wide "
                          f"text features but the text encoder{'s give' if len(encoders) > 1 else ' gives'} {width}: "
                          f"not a {kind} model")


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_path(name_or_path: str, flag: str = "--pretrained_model_name_or_path") -> None:
    """A local-looking path that does not exist fails here, before anything is loaded."""
    path = Path(name_or_path).expanduser()
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
                   or len(path.parts) > 1 and Path(path.parts[0]).is_dir())  # models/sd15 where ./models exists
    if looks_local and not path.exists():
        raise ConfigError(f"{flag} {name_or_path}: no such file or folder")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ConfigError(f"{flag} {path}: not a diffusers pipeline folder (no model_index.json)")


def _check_model_paths(config: TrainConfig) -> None:
    _check_model_path(config.pretrained_model_name_or_path)
    if config.vae and not Path(config.vae).expanduser().exists():
        raise ConfigError(f"--vae {config.vae}: no such file or folder")
    _base_weight_files(config.base_weights)
    if config.single_file_config:
        if not Path(config.pretrained_model_name_or_path).expanduser().is_file():
            raise ConfigError(f"--single_file_config {config.single_file_config}: only for a single-file "
                              f"--pretrained_model_name_or_path (a folder or hub id brings its own configs)")
        _check_model_path(config.single_file_config, "--single_file_config")
        if Path(config.single_file_config).expanduser().is_file():
            raise ConfigError(f"--single_file_config {config.single_file_config}: a file; give a diffusers folder or hub id")


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (``epsilon``), the velocity (``v_prediction``) or the image."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's multires noise (``pyramid_noise_like``): ``iterations`` noises at ever coarser sizes (each a random
    2-4x smaller than the last), bilinearly upsampled and weighted by ``discount ** level``, added to ``noise``, which
    is then scaled back to unit standard deviation. Its randomness comes from ``generator`` (a resumed run draws the
    same)."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for level in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        h, w = max(1, int(height / r**level)), max(1, int(width / r**level))
        coarse = torch.randn((batch, channels, h, w), generator=generator).to(noise)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break  # (the coarsest: 1 x 1)
    return noise / noise.std()


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, config: TrainConfig, scheduler, timesteps) -> torch.Tensor:
    """kohya's ``conditional_loss`` without reduction: ``--loss_type`` l2 (MSE), l1, or huber / smooth_l1 (pseudo-Huber,
    ``2c(sqrt(d^2 + c^2) - c)`` and ``2(sqrt(d^2 + c^2) - c)``) with the threshold ``c`` of each sample's timestep by
    ``--huber_schedule``: ``snr`` ``(1 - huber_c) / (1 + sigma)^2 + huber_c``, ``exponential``
    ``exp(ln(huber_c) * t / T) * huber_scale``, ``constant`` ``huber_c * huber_scale``."""
    if config.loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if config.loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    t = timesteps.cpu()
    if config.huber_schedule == "snr":
        alphas = scheduler.alphas_cumprod[t].float()
        c = (1 - config.huber_c) / (1 + ((1 - alphas) / alphas) ** 0.5) ** 2 + config.huber_c
    elif config.huber_schedule == "exponential":
        c = torch.exp(math.log(config.huber_c) * t.float() / scheduler.config.num_train_timesteps) * config.huber_scale
    else:
        c = torch.full(t.shape, config.huber_c * config.huber_scale)
    c = c.to(prediction).view(-1, *[1] * (prediction.dim() - 1))
    pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * pseudo if config.loss_type == "huber" else 2 * pseudo


def masked(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A per-pixel loss ``[B, C, h, w]`` weighed by kohya's loss mask (``[B, 1, H, W]`` in pixels, area-averaged to
    ``h x w``, as its ``apply_masked_loss``); the loss as it is without one."""
    return loss if mask is None else loss * F.interpolate(mask.to(loss), size=loss.shape[2:], mode="area")


def timestep_range(config: TrainConfig, scheduler) -> tuple[int, int]:
    """The timesteps trained, ``[--min_timestep, --max_timestep)`` (0 for the latter: the scheduler's
    ``num_train_timesteps``); ``ConfigError`` where they do not fit the scheduler."""
    total = scheduler.config.num_train_timesteps
    top = config.max_timestep or total
    if not config.min_timestep < top <= total:
        raise ConfigError(f"--min_timestep / --max_timestep {config.min_timestep} / {config.max_timestep}: the scheduler "
                          f"has {total} timesteps")
    return config.min_timestep, top


def diffusion_loss(unet, scheduler, latents, encoder_hidden_states, generator: torch.Generator, config: TrainConfig,
                   added_cond_kwargs: dict | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean denoising loss of one batch: noise the latents at random timesteps and compare the UNet's prediction
    (``added_cond_kwargs``: SDXL's pooled text and size conditioning, from ``condition``; ``mask``: kohya's masked
    loss, ``[B, 1, H, W]`` in pixels, area-averaged to the latents' size, weighing each latent pixel's loss)."""
    batch, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if config.noise_offset:
        offset = config.noise_offset  # (kohya's: a random share of it, plus a share of each channel's mean latent)
        if config.noise_offset_random_strength:
            offset = offset * torch.rand(1, generator=generator).to(latents)
        if config.adaptive_noise_scale:
            offset = (offset + config.adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=generator).to(latents)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, config.multires_noise_iterations, config.multires_noise_discount)
    timesteps = torch.randint(*timestep_range(config, scheduler), (batch,), generator=generator).to(latents.device)
    start = noise
    if config.ip_noise_gamma:  # (kohya's input perturbation: the target keeps the noise)
        gamma = config.ip_noise_gamma
        if config.ip_noise_gamma_random_strength:
            gamma = gamma * torch.rand(1, generator=generator).to(latents)
        start = noise + gamma * torch.randn(latents.shape, generator=generator).to(latents)
    noisy = scheduler.add_noise(latents, start, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
    prediction = unet(noisy, timesteps, encoder_hidden_states, **extra).sample
    loss = masked(elementwise_loss(prediction.float(), target.float(), config, scheduler, timesteps), mask)
    loss = loss.mean(dim=list(range(1, prediction.dim())))
    if config.snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps).float()
        weight = torch.clamp(snr, max=config.snr_gamma)
        weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
        loss = loss * weight
    if config.scale_v_pred_loss_like_noise_pred or config.v_pred_like_loss or config.debiased_estimation_loss:  # (kohya's
        from diffusers.training_utils import compute_snr  # order, its cap)

        snr = torch.clamp(compute_snr(scheduler, timesteps).float(), max=1000)
        if config.scale_v_pred_loss_like_noise_pred:
            loss = loss * snr / (snr + 1)
        if config.v_pred_like_loss:
            loss = loss + loss / (snr / (snr + 1)) * config.v_pred_like_loss
        if config.debiased_estimation_loss:
            loss = loss / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr.sqrt())
    return loss.mean()


def training_scheduler(scheduler_config, config: TrainConfig):
    """The DDPM noise schedule a run trains on, from the model's scheduler config (``--zero_terminal_snr``: its betas
    rescaled so that the last timestep is pure noise, diffusers' ``rescale_betas_zero_snr``, kohya's formula;
    ``--v_parameterization``: v-prediction whatever the config says);
    ``ConfigError`` for the weightings that the model's prediction type cannot take."""
    from diffusers import DDPMScheduler

    forced = {"prediction_type": "v_prediction"} if config.v_parameterization else {}  # (kohya's --v_parameterization)
    scheduler = DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=bool(config.zero_terminal_snr), **forced)
    kind = scheduler.config.prediction_type
    if config.scale_v_pred_loss_like_noise_pred and kind != "v_prediction":
        raise ConfigError(f"--scale_v_pred_loss_like_noise_pred is for v-prediction models; this one predicts {kind}")
    if config.v_pred_like_loss and kind == "v_prediction":
        raise ConfigError("--v_pred_like_loss adds a v-prediction-like loss to an epsilon model's; this one predicts v_prediction")
    if config.zero_terminal_snr and config.v_pred_like_loss:
        raise ConfigError("--zero_terminal_snr leaves an SNR of 0 at the last timestep, by which --v_pred_like_loss divides: "
                          "leave one of them off")
    if config.zero_terminal_snr and kind == "epsilon":
        if config.snr_gamma or config.debiased_estimation_loss:
            raise ConfigError("--zero_terminal_snr leaves an SNR of 0 at the last timestep, by which an epsilon model's "
                              "--snr_gamma / --debiased_estimation_loss weights divide: train a v-prediction model or "
                              "leave those off")
        logger.warning("--zero_terminal_snr on an epsilon-prediction model: kohya warns that the result is unexpected; "
                       "it is meant for v-prediction models")
    return scheduler


def _check_compile(mode: str, backend: str) -> None:
    import torch._dynamo

    if mode not in COMPILE_MODES or mode == "none":
        raise ConfigError(f"--compile {mode!r}: choose one of {', '.join(m for m in COMPILE_MODES if m != 'none')}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(f"--compile_backend {backend!r}: choose one of {', '.join(sorted(backends))}")


def compile_unet(unet: nn.Module, mode: str = "default", backend: str = "inductor"):
    """``torch.compile`` of ``unet`` for LoRA training; returns the compiled callable and leaves ``unet`` itself
    eager (sampling and saving use it). ``mode="reduce-overhead"`` runs CUDA graphs: call
    ``torch.compiler.cudagraph_mark_step_begin()`` before each step's forward.

    Example:
        >>> step_unet = compile_unet(unet, "reduce-overhead")
        >>> loss = diffusion_loss(step_unet, scheduler, latents, states, generator, config)
    """
    _check_compile(mode, backend)
    if backend != "inductor":  # modes are inductor options
        return torch.compile(unet, backend=backend)
    return torch.compile(unet, mode=None if mode == "default" else mode)


def encode_text_sdxl(pipe, captions: list[str], device, max_token_length: int | None = None,
                     weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as its pipeline's ``encode_prompt`` computes it: each encoder's penultimate hidden
    states side by side, and the second encoder's pooled (projected) output; ``max_token_length`` past 75: each chunk
    encoded alone and joined, the pooled output the first chunk's, as kohya trains long captions; ``weighted``: each
    encoder's states weighed by the captions' emphasis (kohya's ``--weighted_captions``; not the pooled output)."""
    states, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        weights = None
        if weighted:
            ids, weights = weighted_token_ids(tokenizer, captions, device, max_token_length)
        else:
            ids = token_ids(tokenizer, captions, device, max_token_length)
        out = encoder(ids.flatten(0, 1) if ids.dim() == 3 else ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        if ids.dim() == 3:
            pooled, hidden = out[0].reshape(ids.shape[0], ids.shape[1], -1)[:, 0], join_chunks(hidden, ids.shape[0])
        else:
            pooled = out[0]
        states.append(hidden if weights is None else apply_token_weights(hidden, weights))
    return torch.cat(states, dim=-1), pooled


def condition(pipe, captions: list[str], size_conditioning: torch.Tensor | None, device, dtype,
              clip_skip: int = 1, max_token_length: int | None = None, weighted: bool = False) -> tuple[torch.Tensor, dict | None]:
    """The UNet's text conditioning of a batch, and (SDXL) its ``added_cond_kwargs``: the pooled text and the
    size and crop conditioning (``ImageDataset.size_conditioning``, ``[B, 6]``) in ``dtype``; captions of up to
    ``max_token_length`` tokens (kohya's chunks past 75); ``weighted``: their ``(word:1.2)`` emphasis weighs the
    states, as kohya's ``--weighted_captions``."""
    if not is_sdxl(pipe):
        return encode_text(pipe.tokenizer, pipe.text_encoder, captions, device, clip_skip, max_token_length, weighted), None
    states, pooled = encode_text_sdxl(pipe, captions, device, max_token_length, weighted)
    return states, {"text_embeds": pooled, "time_ids": size_conditioning.to(device, dtype)}


class Latents:
    """Latents of a batch: encoded by the VAE each step, or (``cache``) once per image and flip at the start."""

    def __init__(self, vae, dataset: ImageDataset, device, dtype, cache: bool) -> None:
        self.vae, self.dataset, self.device, self.dtype = vae, dataset, device, dtype
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        if cache:
            for index in range(len(dataset)):
                for flip in (False, True) if dataset.options_of(index).random_flip else (False,):
                    pixels = dataset.load(index, flip, 0.5, 0.5)[None]
                    self.cache[(index, flip)] = self._moments(pixels)

    @torch.no_grad()
    def _moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean, dist.std

    def sample(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.cache:
            moments = [self.cache[(i, f)] for i, f in zip(batch["indices"], batch["flips"])]
            mean = torch.cat([m for m, _ in moments])
            std = torch.cat([s for _, s in moments])
        else:
            mean, std = self._moments(batch["pixel_values"])
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        return ((mean + std * eps) - self.shift) * self.scale


@torch.no_grad()
def scale_weight_norms(models: list[nn.Module], max_norm: float, adapter: str = "default") -> tuple[int, float, float]:
    """kohya's ``--scale_weight_norms`` (``apply_max_norm_regularization``): each layer's LoRA change ``alpha/r * B A``
    (a convolution's as the matrix of its flattened kernels) whose Frobenius norm exceeds ``max_norm`` has both
    factors scaled by the square root of ``max_norm / norm``, in place. Returns kohya's log figures: the layers
    scaled, and the mean and largest norm after it."""
    from ..inject import lora_layers

    scaled, norms = 0, []
    for model in models:
        for _, layer in lora_layers(model):
            if adapter not in layer.specs:
                continue
            a, b, spec = layer.lora_A[adapter], layer.lora_B[adapter], layer.specs[adapter]
            norm = float((b.flatten(1).float() @ a.flatten(1).float()).norm()) * spec.alpha / spec.rank
            if norm > max_norm:
                ratio = max_norm / norm
                a.mul_(ratio**0.5)
                b.mul_(ratio**0.5)
                scaled, norm = scaled + 1, max_norm
            norms.append(norm)
    return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


def split_validation(examples: list, share: float, seed: int) -> tuple[list, list]:
    """``(training, held out)``: ``share`` of the images (at least one where ``share`` > 0, at most all but one),
    drawn by ``seed``, held out for the validation loss (kohya's ``--validation_split``); the order of each part is
    the scan's."""
    if not share:
        return examples, []
    if len(examples) < 2:
        raise ConfigError(f"--validation_split {share}: {len(examples)} image; holding one out needs at least 2")
    count = min(len(examples) - 1, max(1, round(len(examples) * share)))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def kohya_buckets(config: TrainConfig) -> KohyaBuckets | None:
    """kohya's bucket settings of a run (its defaults where a setting is 0), or ``None`` for this trainer's buckets."""
    return DatasetSize.of(config).kohya_buckets


class Validation:
    """kohya's validation loss: the held-out images (centre-cropped, unflipped, their VAE means), each denoised at 4
    timesteps evenly inside ``[--min_timestep, --max_timestep]`` (kohya's 200, 400, 600, 800 by default) with noise
    drawn from one seeded generator, so that every validation sees the same noise and the losses compare."""

    TIMESTEPS = 4

    def __init__(self, examples: list, config: TrainConfig, vae, device, vae_dtype, seed: int,
                 group_sizes: dict[int, DatasetSize] | None = None) -> None:
        self.dataset = ImageDataset(examples, resolution=config.resolution, height=config.resolution_height or None, center_crop=True, random_flip=False,
                                    enable_bucket=config.enable_bucket, kohya_buckets=kohya_buckets(config), group_sizes=group_sizes,
                                    resize_interpolation=config.resize_interpolation)
        encoded = Latents(vae, self.dataset, device, vae_dtype, cache=True)
        self.latents = [(encoded.cache[(i, False)][0] - encoded.shift) * encoded.scale for i in range(len(self.dataset))]
        self.config, self.seed, self.device = config, seed, device

    @torch.no_grad()
    def loss(self, pipe, unet, scheduler, dtype) -> float:
        """The mean loss over the held-out images and the timesteps (the UNet in eval mode: no LoRA dropout)."""
        config = self.config
        timesteps = torch.linspace(*timestep_range(config, scheduler), self.TIMESTEPS + 2)[1:-1].long()
        generator = torch.Generator().manual_seed(self.seed)
        was_training = unet.training
        unet.eval()
        losses = []
        try:
            for index, latent in enumerate(self.latents):
                size = torch.tensor([self.dataset.size_conditioning(index, False, 0.5, 0.5)])
                states, added = condition(pipe, [self.dataset.caption(index, 0)], size, self.device, dtype, config.clip_skip,
                                          config.max_token_length, config.weighted_captions)
                extra = {"added_cond_kwargs": added} if added is not None else {}
                mask = stack_masks([self.dataset.mask(index, False, 0.5, 0.5)], self.dataset.bucket_of[index]) \
                    if config.masked_loss or config.alpha_mask else None
                for t in timesteps.tolist():
                    step = torch.tensor([t], device=self.device)
                    noise = torch.randn(latent.shape, generator=generator).to(latent)
                    noisy = scheduler.add_noise(latent, noise, step)
                    prediction = unet(noisy, step, states, **extra).sample
                    target = diffusion_target(scheduler, latent, noise, step)
                    loss = elementwise_loss(prediction.float(), target.float(), config, scheduler, step)
                    losses.append(float(masked(loss, mask).mean()))  # (the mask as the step's)
        finally:
            unet.train(was_training)
        return sum(losses) / len(losses)


class PivotalToken:
    """A new word whose embedding is learned (pivotal tuning): one fp32 vector per text encoder (SDXL: two),
    swapped in by forward hooks.

    Each tokenizer gains the token and each embedding matrix one row; the existing rows are never touched. Saved
    in diffusers' textual-inversion form: ``{token: vector}`` for one encoder; for SDXL ``{"clip_l": [1, w1],
    "clip_g": [1, w2]}`` (what A1111 and diffusers' SDXL trainers write), the token in the file's metadata.
    """

    SDXL_KEYS = tuple(key for key, _, _ in SDXL_EMBEDDING_KEYS)

    def __init__(self, pairs: list, token: str, initializer: str = "") -> None:
        """``pairs``: ``[(tokenizer, text_encoder)]``, one per text encoder, in the pipeline's order."""
        self.token = token
        self.vectors: list[nn.Parameter] = []
        self.token_ids: list[int] = []
        extended: list = []  # tokenizers that gained the token here (two encoders may share one)
        for tokenizer, encoder in pairs:
            if not any(tokenizer is t for t in extended):
                if tokenizer.add_tokens([token]) == 0:
                    raise ConfigError(f"--token {token!r} is already a word of the tokenizer; pivotal tuning needs a "
                                      f"new one, e.g. '<my-style>'")
                extended.append(tokenizer)
            encoder.resize_token_embeddings(len(tokenizer))
            token_id = tokenizer.convert_tokens_to_ids(token)
            table = encoder.get_input_embeddings().weight.detach()
            if initializer:
                start = table[tokenizer(initializer, add_special_tokens=False).input_ids].float().mean(0)
            else:
                start = table[:token_id].float().mean(0)
            self.vectors.append(nn.Parameter(start.clone()))
            self.token_ids.append(token_id)
            encoder.get_input_embeddings().register_forward_hook(self._hook(len(self.vectors) - 1))

    def _hook(self, i: int):
        def swap(module, args, output):
            mask = (args[0] == self.token_ids[i]).unsqueeze(-1)
            return torch.where(mask, self.vectors[i].to(output.dtype), output)

        return swap

    def to(self, device) -> None:
        for vector in self.vectors:
            vector.data = vector.data.to(device)

    def state(self) -> dict[str, torch.Tensor]:
        """The learned embedding(s), as saved (see the class)."""
        vectors = [v.detach().float().cpu() for v in self.vectors]
        if len(vectors) == 1:
            return {self.token: vectors[0]}
        return {key: v[None] for key, v in zip(self.SDXL_KEYS, vectors)}

    def metadata(self) -> dict[str, str]:
        return {"format": "pt", **({"token": self.token} if len(self.vectors) > 1 else {})}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back a ``state()`` (resuming)."""
        saved = [tensors[self.token]] if len(self.vectors) == 1 else [tensors[k][0] for k in self.SDXL_KEYS]
        for vector, value in zip(self.vectors, saved):
            vector.data.copy_(value)


def _optimizer_class(config: TrainConfig):
    """The optimizer ``--optimizer`` (or ``--use_8bit_adam``) names; a ``ConfigError`` saying what to install where its
    package is missing."""
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("--optimizer prodigy needs prodigyopt: pip install 'lora-diffusion[prodigy]'") from None
        if config.learning_rate < 0.1:
            logger.warning("--optimizer prodigy with --learning_rate %g: Prodigy finds its own step size and scales it by "
                           "the learning rate; kohya's users give it 1.0", config.learning_rate)
        return Prodigy
    if not (config.use_8bit_adam or config.optimizer == "adamw8bit"):
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install 'lora-diffusion[train8bit]' (CUDA only)") from None
    return bnb.optim.AdamW8bit


def make_lr_scheduler(config: TrainConfig, optimizer, max_steps: int):
    """The learning-rate schedule of a run of ``max_steps`` optimizer steps, as kohya's ``get_scheduler_fix`` makes it:
    diffusers' schedules, transformers' ``cosine_with_min_lr`` / ``warmup_stable_decay`` (half a cosine per
    ``--lr_num_cycles``, down to ``--lr_scheduler_min_lr_ratio``; the latter's last ``--lr_decay_steps`` decaying) and
    ``inverse_sqrt``, or ``--lr_scheduler_type``'s torch class; ``--lr_scheduler_args`` given to each."""
    from diffusers.optimization import get_scheduler
    from transformers import optimization

    extra = config.lr_scheduler_settings()
    try:
        if config.lr_scheduler_type:
            return getattr(torch.optim.lr_scheduler, config.lr_scheduler_type)(optimizer, **extra)
        warmup = config.lr_warmup_steps or int(config.lr_warmup_ratio * max_steps)  # (kohya's share: truncated, as kohya)
        name, cycles, low = config.lr_scheduler, config.lr_num_cycles, config.lr_scheduler_min_lr_ratio
        if name == "cosine_with_min_lr":
            return optimization.get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, warmup, max_steps, num_cycles=cycles / 2, min_lr_rate=low, **extra)
        if name == "warmup_stable_decay":
            decay = int(config.lr_decay_steps * max_steps) if config.lr_decay_steps < 1 else int(config.lr_decay_steps)
            return optimization.get_wsd_schedule(optimizer, warmup, decay, num_stable_steps=max_steps - warmup - decay,
                                                 num_cycles=cycles / 2, min_lr_ratio=low, **extra)
        if name == "inverse_sqrt":
            return optimization.get_inverse_sqrt_schedule(optimizer, warmup, timescale=config.lr_scheduler_timescale or None, **extra)
        if name == "piecewise_constant":
            return get_scheduler(name, optimizer, **extra)
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps, num_cycles=cycles,
                             power=config.lr_power, **extra)
    except (TypeError, ValueError) as e:  # (a setting the schedule does not take, or a bad value of one)
        raise ConfigError(f"--lr_scheduler {config.lr_scheduler_type or config.lr_scheduler}: {_first_line(e)}") from None


def _base_weight_files(text: str) -> list[tuple[str, float]]:
    """``--base_weights``' ``(file, weight)`` pairs (one ``FILE[:WEIGHT]`` a line); ``ConfigError`` naming a bad one."""
    from ..tools import _weighted

    pairs = []
    for entry in filter(None, (line.strip() for line in text.split("\n"))):
        try:
            path, weight, *blocks = _weighted(entry)
        except ValueError as e:
            raise ConfigError(f"--base_weights {e}") from None
        if blocks or not Path(path).expanduser().is_file():
            raise ConfigError(f"--base_weights {entry}: " + ("FILE[:WEIGHT], no block weights" if blocks else "no such file"))
        pairs.append((path, weight))
    return pairs


def _merge_base_weights(pipe, text: str) -> None:
    """kohya's ``--base_weights``: the LoRA files fused into the model's weights for good before training (the weights
    ``fuse`` makes, then the adapters and their wrappers gone), so that the LoRA trained is the change on top."""
    from ..inject import lora_layers
    from ..params import param_deltas
    from ..pipeline import _components, delete_adapter, fuse, load_lora, set_adapters, unfuse
    from ..tools import _drop_empty_wrappers

    pairs = _base_weight_files(text)
    try:
        names = {load_lora(pipe, path, adapter=f"_base{i}"): weight for i, (path, weight) in enumerate(pairs)}
    except (ValueError, OSError) as e:
        raise ConfigError(f"--base_weights: {e}") from None
    if any((store := param_deltas(model)) is not None and store.adapters() for _, model in _components(pipe)):
        raise ConfigError("--base_weights: a file changes whole weights beside its LoRA factors; bake it into the model "
                          "first (lora-diffusion bake MODEL FILE -o merged) and train on that")
    set_adapters(pipe, names)
    fuse(pipe)
    fused = {component: {path: layer.base_layer.weight.detach().clone() for path, layer in lora_layers(model)}
             for component, model in _components(pipe)}
    unfuse(pipe)
    for name in names:
        delete_adapter(pipe, name)
    _drop_empty_wrappers(pipe)
    with torch.no_grad():
        for component, model in _components(pipe):
            for path, weight in fused[component].items():
                model.get_submodule(path).weight.copy_(weight)
    logger.info("--base_weights: merged %s into the model", ", ".join(f"{p} x{w:g}" for p, w in pairs))


def _optimizer_kwargs(config: TrainConfig, optimizer_class) -> dict:
    """The optimizer's settings: the --adam_* ones, then --optimizer_args over them (kohya's). A key the optimizer
    does not take is a ``ConfigError`` naming those it takes."""
    kwargs = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon,
              "weight_decay": config.adam_weight_decay, **config.optimizer_settings()}
    takes = inspect.signature(optimizer_class).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()) and (unknown := sorted(set(kwargs) - set(takes))):
        known = sorted(set(takes) - {"self", "params", "lr"})
        raise ConfigError(f"--optimizer_args {', '.join(unknown)}: {optimizer_class.__name__} does not take it; it takes {', '.join(known)}")
    return kwargs


def _fused_adamw(optimizer_class, kwargs: dict, device: torch.device) -> dict:
    """torch's fused AdamW where it has one: on CUDA one kernel for every LoRA tensor instead of a dozen
    multi-tensor launches; on the CPU (torch >= 2.4) one pass per tensor instead of torch's default per-tensor loop
    of ~10 ops (the tiny model's 256 LoRA tensors: 5.6 against 26 ms a step, ~6 % of the step). Not where
    ``--optimizer_args`` chooses the implementation (``foreach``, ``fused``, ``capturable``, ``differentiable``)."""
    if optimizer_class is not torch.optim.AdamW or not {"foreach", "fused", "capturable", "differentiable"}.isdisjoint(kwargs):
        return {}
    cpu = device.type == "cpu" and tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 4)
    return {"fused": True} if device.type == "cuda" or cpu else {}


def _prepare_output_dir(output_dir: Path, resuming: bool, overwrite: bool, output_name: str = "") -> None:
    previous = outputs.run_outputs(output_dir, output_name)
    for aside in output_dir.glob(f"{PREVIOUS_RUN}*"):
        logger.warning("%s holds the outputs of a run that an interrupted --overwrite run set aside; move them back "
                       "or delete the folder", aside)
    if previous and not (resuming or overwrite):
        raise ConfigError(
            f"--output_dir {output_dir} holds a previous run ({', '.join(previous)}); pass --resume_from_checkpoint "
            "latest to continue it, --overwrite to replace it, or another --output_dir"
        )


class _PreviousRun:
    """With ``--overwrite``: the previous run's outputs, moved into a hidden folder of ``output_dir`` just before the
    new run writes; deleted once the new run has saved a checkpoint or its LoRA, put back if it ends (fails,
    diverges, is cancelled) before that."""

    def __init__(self, output_dir: Path, output_name: str = "") -> None:
        self.output_dir, self.output_name = output_dir, output_name
        self.aside: Path | None = None
        names = outputs.run_outputs(output_dir, output_name)
        if names:
            self.aside = Path(tempfile.mkdtemp(prefix=PREVIOUS_RUN, dir=output_dir))
            for name in names:
                os.rename(output_dir / name, self.aside / name)
            logger.info("--overwrite: the previous run in %s is set aside in %s until this run writes", output_dir, self.aside)

    def close(self) -> None:
        """Delete the previous run if this one saved a checkpoint or its LoRA; else put it back (this run's log,
        plot and samples, worth nothing without weights, make way for it)."""
        if self.aside is None:
            return
        if (self.output_dir / outputs.LORA_NAME).exists() or outputs.list_checkpoints(self.output_dir):
            shutil.rmtree(self.aside)
        else:
            for name in outputs.run_outputs(self.output_dir, self.output_name):
                path = self.output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            for item in self.aside.iterdir():
                os.rename(item, self.output_dir / item.name)
            self.aside.rmdir()
            logger.warning("this run saved no checkpoint; the previous run in %s is back as it was", self.output_dir)
        self.aside = None


def _left_to_do(step: int, max_steps: int, output_dir: Path) -> bool:
    """Whether a run resumed at ``step`` has work left: steps, or (at ``max_steps``, a run stopped between its
    last checkpoint and its LoRA) the final outputs."""
    return step < max_steps or (step == max_steps and not (output_dir / outputs.LORA_NAME).exists())


class _CtrlC:
    """Ctrl-C (SIGINT) during the loop, in the main thread: the first one stops the run after the current step,
    like ``cancel`` (a checkpoint is saved); a second one raises ``KeyboardInterrupt`` at once. A SIGINT within
    ``SAME_PRESS_S`` of the first is the same press: under ``accelerate launch`` (torchrun) a terminal's Ctrl-C
    reaches every process of the group, and the launcher forwards it to its workers once more. The handler is
    installed on creation (only over Python's default one) and ``restore`` puts the previous one back."""

    SAME_PRESS_S = 2.0

    def __init__(self) -> None:
        self.pressed = False
        self.pressed_at = 0.0
        self.previous = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            if time.monotonic() - self.pressed_at > self.SAME_PRESS_S:
                raise KeyboardInterrupt
            return
        self.pressed, self.pressed_at = True, time.monotonic()
        logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _ignore_ctrl_c(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the training process (``_CtrlC``): a terminal's SIGINT reaches the whole
    process group, and a worker it ended would fail the step that the loop still runs before it stops (with
    several processes the ranks agree on stopping only after that step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _restore_lora(model: nn.Module, component: str, path: Path) -> None:
    """Copy a checkpoint's factors into ``model``'s trainable adapter (same keys and shapes, or an error)."""
    saved, _ = read_lora_file(path)
    for key, live in lora_from_model(model, component).items():
        if key not in saved or saved[key].A.shape != live.A.shape or saved[key].B.shape != live.B.shape or (
                (saved[key].magnitude is None) != (live.magnitude is None)):
            raise ConfigError(f"{path}: the checkpoint does not match these settings at {key} (changed --rank, "
                              "--target_modules or --use_dora?)")
        with torch.no_grad():
            live.A.copy_(saved[key].A)
            live.B.copy_(saved[key].B)
            if live.magnitude is not None:  # (views of the parameters: the copies land in them)
                live.magnitude.copy_(saved[key].magnitude.reshape(live.magnitude.shape))


def read_init_lora(path: str) -> dict:
    """``--init_lora``'s canonical modules; ``ConfigError`` for a file that cannot start a run (unreadable, or holding
    modules that are no LoRA factors: OFT, GLoRA, (IA)^3, bias or norm deltas)."""
    from ..formats import LoraFormatError, LoraWeights

    try:
        lora, _ = read_lora_file(Path(path).expanduser())
    except (LoraFormatError, OSError) as e:
        raise ConfigError(f"--init_lora: {e}") from None
    other = next((k for k, w in lora.items() if not isinstance(w, LoraWeights) or w.oft is not None), None)
    if other is not None:
        what = lora[other].oft.described if isinstance(lora[other], LoraWeights) else "a parameter delta"
        raise ConfigError(f"--init_lora {path}: {other} is {what}; a run starts from LoRA factors only (LoRA, LoCon, "
                          "LoHa, LoKr, DoRA)")
    return lora


def _init_lora(trained: list[tuple[str, nn.Module]], lora: dict, config: TrainConfig) -> None:
    """Copy ``--init_lora``'s factors (and DoRA magnitudes) into the trained adapters (kohya's --network_weights):
    each of its modules must be trained here, at this run's rank and alpha; trained modules it lacks keep their
    fresh start. Every module is checked before any is copied."""
    live = {key: w for component, model in trained for key, w in lora_from_model(model, component).items()}
    outside = sorted(set(lora) - set(live))
    if outside:
        hint = " or pass --train_text_encoder" if any(k.startswith("text_encoder") for k in outside) and not config.train_text_encoder else ""
        raise ConfigError(f"--init_lora {config.init_lora}: {len(outside)} of its {len(lora)} modules are not trained by "
                          f"this run (e.g. {outside[0]}); widen --target_modules{hint}")
    for key, w in lora.items():
        target = live[key]
        if w.rank != target.rank or w.alpha != target.alpha or w.A.numel() != target.A.numel() or w.B.numel() != target.B.numel():
            raise ConfigError(f"--init_lora {config.init_lora}: {key} has rank {w.rank}, alpha {w.alpha:g} (down "
                              f"{list(w.A.shape)}, up {list(w.B.shape)}); this run trains rank {target.rank}, alpha "
                              f"{target.alpha:g} (down {list(target.A.shape)}) there: pass --rank {w.rank} --lora_alpha {w.alpha:g}, "
                              "or --dim_from_weights to keep every module's own rank and alpha")
        if (w.magnitude is None) != (target.magnitude is None):
            raise ConfigError(f"--init_lora {config.init_lora}: {key} is {'' if w.magnitude is not None else 'not '}DoRA; "
                              f"--use_dora must match it")
    with torch.no_grad():
        for key, w in lora.items():
            target = live[key]  # (views of the trained parameters: the copies land in them)
            target.A.copy_(w.A.reshape(target.A.shape))
            target.B.copy_(w.B.reshape(target.B.shape))
            if target.magnitude is not None:
                target.magnitude.copy_(w.magnitude.reshape(target.magnitude.shape))
    logger.info("--init_lora: %d modules start from %s%s", len(lora), config.init_lora,
                f"; {len(live) - len(lora)} trained modules it lacks start afresh" if len(live) > len(lora) else "")


def _layer_shapes(config: TrainConfig, model: nn.Module, targets, component: str, init_lora: dict | None) -> dict:
    """``inject_lora``'s ``rank_pattern`` / ``alpha_pattern`` for one model, first match winning: ``--init_lora``'s
    own ranks and alphas where ``--dim_from_weights``, then ``--rank_pattern`` / ``--alpha_pattern``, then
    ``--conv_rank`` / ``--conv_alpha`` on the targeted 3x3 convolutions (kohya's conv_dim / conv_alpha)."""
    from ..inject import resolve_targets, strip_text_model

    ranks: dict[str, int] = {}
    alphas: dict[str, float | None] = {}
    if config.dim_from_weights and init_lora:
        for key, w in init_lora.items():
            owner, _, path = key.partition(".")
            if owner == component:
                exact = re.escape(strip_text_model(path))
                ranks[exact], alphas[exact] = w.rank, float(w.alpha)
    user_ranks, user_alphas = config.patterns()
    ranks.update((k, v) for k, v in user_ranks.items() if k not in ranks)
    alphas.update((k, v) for k, v in user_alphas.items() if k not in alphas)
    if component == "unet" and (config.conv_rank or config.conv_alpha):
        for name in resolve_targets(model, targets):
            layer = model.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
                ranks.setdefault(re.escape(name), config.conv_rank or config.rank)
                alphas.setdefault(re.escape(name), config.conv_alpha or (None if config.conv_rank else config.lora_alpha or None))
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


def _average_gradients(params: list[nn.Parameter], accelerator) -> None:
    """All-reduce (mean) the LoRA gradients across processes, as one flat buffer."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- the run
def train(config: TrainConfig, progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> TrainResult:
    """Train a LoRA as ``config`` says and return what came of it.

    ``progress`` is called on the main process after every step with a dict ``{"step", "max_steps", "epoch",
    "loss", "lr", "eta_s", "elapsed_s", "sample_paths", "checkpoint"}``; returning ``False`` stops the run, as does
    setting ``cancel``. A stopped run saves a checkpoint first, so it can be resumed. A NaN/Inf loss stops the run
    without saving; the last good checkpoint stays. Bad data and settings raise before any model is loaded.

    Example:
        >>> stop = threading.Event()
        >>> result = train(TrainConfig(pretrained_model_name_or_path="tiny", train_data_dir="data"), cancel=stop)
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    # 1. everything that can be checked without a model
    config.validate()
    output_dir = Path(config.output_dir)
    if config.dataset_config:  # kohya's subsets, each with its own settings; the data set's sizes are the run's
        if config.train_data_dir or config.reg_data_dir:
            logger.warning("--dataset_config gives the images: --train_data_dir and --reg_data_dir are ignored, as kohya ignores them")
        found = read_dataset_config(config.dataset_config, config)
        group_sizes = found.sizes(config)  # (several data sets of their own sizes; None: one, or all alike)
        config = dataclasses.replace(config, **found.settings)
        config.validate()
        examples, reg_examples = found.scan(config)
    else:
        group_sizes = None
        examples = scan_images(
            config.train_data_dir, caption_extension=config.caption_extension, mode=config.mode, token=config.token,
            instance_prompt=config.instance_prompt, strict=config.strict, resolution=max(config.size),
            captions=read_fine_tuning_metadata(config.in_json, config.train_data_dir, config.caption_separator)
            if config.in_json else None,
        )
        # kohya's regularisation images, with their own captions (no trigger token)
        reg_examples = scan_images(config.reg_data_dir, caption_extension=config.caption_extension, instance_prompt=config.class_prompt,
                                   strict=config.strict, what="--reg_data_dir", resolution=max(config.size)) if config.reg_data_dir else None
    if (config.caption_prefix or config.caption_suffix) and not config.dataset_config:  # (kohya's, on every caption)
        def framed(found: list[Example]) -> list[Example]:
            return [dataclasses.replace(e, caption=" ".join(filter(None, (config.caption_prefix, e.caption, config.caption_suffix))))
                    for e in found]

        examples, reg_examples = framed(examples), reg_examples and framed(reg_examples)
    if not config.dataset_config:  # kohya's loss masks: each image's alpha, or a mask image of its name
        examples = attach_masks(examples, Path(config.conditioning_data_dir) if config.conditioning_data_dir else None,
                                Path(config.train_data_dir), alpha=config.alpha_mask)
        reg_examples = reg_examples and attach_masks(reg_examples, None, alpha=config.alpha_mask)
    masked = config.masked_loss or config.alpha_mask
    if masked and not any(e.mask for e in examples):
        raise ConfigError("--masked_loss: no training image has a mask; give --alpha_mask (the images' transparency) or "
                          "--conditioning_data_dir (mask images), or a dataset config subset's")
    if not masked and any(e.mask for e in examples + (reg_examples or [])):
        raise ConfigError("the images have loss masks (--conditioning_data_dir, or a subset's alpha_mask / "
                          "conditioning_data_dir): give --masked_loss too, as kohya masks the loss only then")
    resume, replace_stopped = None, False
    if config.resume_from_checkpoint:
        if config.resume_from_checkpoint == "latest" and not outputs.list_checkpoints(output_dir):
            # a run stopped before its first checkpoint: start afresh, replacing what it wrote (log, plot, samples)
            stopped = outputs.run_outputs(output_dir, config.output_name)
            if outputs.LORA_NAME in stopped and not config.overwrite:
                raise ConfigError(f"--resume_from_checkpoint latest: {output_dir} holds a finished LoRA but no checkpoint to "
                                  "continue from; pass --overwrite to replace it, or another --output_dir")
            replace_stopped = bool(stopped)
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run%s", output_dir,
                           f" (replacing the stopped run's {', '.join(stopped)})" if stopped else "")
        else:
            resume = outputs.find_checkpoint(output_dir, config.resume_from_checkpoint)
    init_lora = read_init_lora(config.init_lora) if config.init_lora else None  # (a bad file: before any model loads)
    _prepare_output_dir(output_dir, resuming=resume is not None or replace_stopped, overwrite=config.overwrite,
                        output_name=config.output_name)
    _check_model_paths(config)
    optimizer_class = _optimizer_class(config)
    optimizer_kwargs = _optimizer_kwargs(config, optimizer_class)
    if config.compile != "none":
        _check_compile(config.compile, config.compile_backend)
    state = outputs.load_state(resume) if resume else None
    resumed = _check_resume_settings(config, state, resume) if state else []

    # several processes and no GPU (`accelerate launch --multi_gpu` or torchrun on a CPU machine): gloo on CPU
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    AcceleratorState._reset_state()  # a process (the UI) may train again with another --mixed_precision
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=multi_cpu)
    is_main, device = accelerator.is_main_process, accelerator.device
    seed = [config.seed if config.seed >= 0 else (state["seed"] if state else random.randrange(2**31))]
    broadcast_object_list(seed)  # every process must draw the same batches
    seed = seed[0]
    examples, held_out = split_validation(examples, config.validation_split,
                                          config.validation_seed if config.validation_seed >= 0 else seed)

    # the batch order and the length of the run (no model needed): a finished checkpoint stops here
    dataset = ImageDataset(examples, resolution=config.resolution, height=config.resolution_height or None,
                           center_crop=config.center_crop or config.cache_latents,
                           random_flip=config.random_flip, enable_bucket=config.enable_bucket, kohya_buckets=kohya_buckets(config),
                           color_aug=config.color_aug, shuffle_caption=config.shuffle_caption, keep_tokens=config.keep_tokens,
                           caption_dropout_rate=config.caption_dropout_rate, caption_tag_dropout_rate=config.caption_tag_dropout_rate,
                           caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
                           caption_separator=config.caption_separator,
                           keep_tokens_separator=config.keep_tokens_separator, secondary_separator=config.secondary_separator,
                           enable_wildcard=config.enable_wildcard, group_sizes=group_sizes,
                           resize_interpolation=config.resize_interpolation)
    if config.cache_latents and not config.center_crop:
        logger.info("--cache_latents: images are centre-cropped (a cached latent cannot be re-cropped)")
    batch_size = {g: size.batch_size for g, size in group_sizes.items()} if group_sizes else config.train_batch_size
    plan = BatchPlan(dataset.buckets(), batch_size, seed, dataset.repeats(), dataset.groups())
    per_step = accelerator.num_processes * config.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(plan.batches_per_epoch / per_step))
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    every_epochs = config.save_every_n_epochs  # (kohya's --save_n_epoch_ratio N: about N snapshots over the run, over it)
    if config.save_n_epoch_ratio:
        every_epochs = math.ceil(max_steps / steps_per_epoch) // config.save_n_epoch_ratio or 1
    # --save_state's checkpoints by the kohya state each stands for ((kind, number) -> step), which kohya's
    # --save_last_n_*_state rules delete; --checkpointing_steps' own are never deleted by them (this run's: a resumed
    # run leaves the earlier ones alone)
    kohya_states: dict[tuple[str, int], int] = {}
    own_checkpoints: set[int] = set()
    if state is not None and not _left_to_do(int(state["step"]), max_steps, output_dir):
        raise ConfigError(f"{resume} is at step {state['step']}, not before --max_train_steps {max_steps}: nothing to train")
    make_lr_scheduler(config, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), max_steps)  # (its settings)

    # 2. the model: frozen base in the compute dtype, LoRA parameters in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = _load_model(config.pretrained_model_name_or_path, config.single_file_config)
    if config.vae:
        try:
            pipe.vae = load_vae(config.vae, pipe.vae)
        except ValueError as e:
            raise ConfigError(f"--vae: {e}") from None
    if config.base_weights:
        _merge_base_weights(pipe, config.base_weights)
    try:
        check_clip_skip(pipe, config.clip_skip, "--clip_skip")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    class_examples = _class_examples(pipe, config, accelerator, seed) if config.with_prior_preservation else reg_examples
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sdxl = is_sdxl(pipe)
    text_encoder_2 = pipe.text_encoder_2 if sdxl else None
    encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
    noise_scheduler = training_scheduler(pipe.scheduler.config, config)
    if config.v_parameterization:  # (the sample images denoise as it trains)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in fp32, as diffusers' SDXL trainer does
    vae_dtype = torch.float32 if sdxl and weight_dtype == torch.float16 and vae.config.force_upcast else weight_dtype
    for model in (unet, vae, *encoders):
        model.requires_grad_(False)
        model.to(device)
        dtype = vae_dtype if model is vae else weight_dtype
        if dtype != torch.float32:
            model.to(dtype=dtype)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    vae.eval()
    for encoder in encoders:
        encoder.eval()
    torch.manual_seed(seed)  # the random LoRA A factors (and nothing else) come from here
    pairs = [(tokenizer, text_encoder)] + ([(pipe.tokenizer_2, text_encoder_2)] if sdxl else [])
    pivot = PivotalToken(pairs, config.token, config.initializer_token) if config.pivotal_tuning else None
    targets = _targets(config.target_modules, unet, "--target_modules")
    alpha = config.lora_alpha or None  # (None: each layer's alpha is its rank, per-layer ranks included)
    # PEFT's input dropout (a plain nn.Dropout) and kohya's three after A
    dropout = LoraDropout(config.lora_dropout, config.network_dropout, config.rank_dropout, config.module_dropout)
    unet.requires_grad_(False)  # (--no-train_unet: no LoRA there; the text encoder's gradients pass through it)
    unet_params = inject_lora(unet, rank=config.rank, alpha=alpha, dropout=dropout, targets=targets,
                              use_dora=config.use_dora, **_layer_shapes(config, unet, targets, "unet", init_lora)) \
        if config.train_unet else []
    groups = [{"params": unet_params, "lr": config.learning_rate}] if unet_params else []
    te_params: list[nn.Parameter] = []
    if config.train_text_encoder:
        for component, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
            te_targets = _targets(config.text_encoder_target_modules, encoder, "--text_encoder_target_modules")
            te_params += inject_lora(encoder, rank=config.rank, alpha=alpha, dropout=dropout, targets=te_targets,
                                     use_dora=config.use_dora, **_layer_shapes(config, encoder, te_targets, component, init_lora))
        groups.append({"params": te_params, "lr": config.te_lr})
    if pivot is not None:
        pivot.to(device)
        groups.append({"params": pivot.vectors, "lr": config.te_lr, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    if init_lora is not None:
        trained = ([("unet", unet)] if config.train_unet else []) + ([("text_encoder", text_encoder)] if config.train_text_encoder else []) + (
            [("text_encoder_2", text_encoder_2)] if config.train_text_encoder and text_encoder_2 is not None else [])
        _init_lora(trained, init_lora, config)
    # kohya's --fp8_base (the text encoders too) / --fp8_base_unet: the frozen weights in fp8 until the run ends
    fp8 = [("unet", unet)] if config.fp8_base or config.fp8_base_unet else []
    if config.fp8_base and not config.fp8_base_unet:
        fp8 += list(zip(("text_encoder", "text_encoder_2"), encoders))
    try:
        fp8_layers = store_fp8(fp8, weight_dtype)
    except ValueError as e:
        raise ConfigError(f"--fp8_base: {e}; train without it") from None
    if fp8_layers:
        logger.info("--fp8_base: %d layers' weights in float8 e4m3fn (%s)", len(fp8_layers), ", ".join(name for name, _ in fp8))
    for model in (unet, *encoders):
        set_backward(model, config.lora_backward)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders if config.train_text_encoder or pivot is not None else ():
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.23
                encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_text = config.train_text_encoder or pivot is not None
    # the step's UNet: compiled (opt-in) or the module itself; sampling and saving always use the eager module
    step_unet = compile_unet(unet, config.compile, config.compile_backend) if config.compile != "none" else unet
    cudagraphs = config.compile == "reduce-overhead" and device.type == "cuda"

    # 3. data: the batch order of process `rank` from the step we start at
    latents = Latents(vae, dataset, device, vae_dtype, cache=config.cache_latents)
    class_latents = class_plan = None
    if class_examples is not None:
        class_dataset = ImageDataset(class_examples, resolution=config.resolution, height=config.resolution_height or None,
                                     center_crop=config.center_crop or config.cache_latents,
                                     random_flip=config.random_flip, enable_bucket=config.enable_bucket,
                                     kohya_buckets=kohya_buckets(config), color_aug=config.color_aug, group_sizes=group_sizes,
                                     resize_interpolation=config.resize_interpolation)
        class_plan = BatchPlan(class_dataset.buckets(), batch_size, seed + 1, class_dataset.repeats(), class_dataset.groups())
        class_latents = Latents(vae, class_dataset, device, vae_dtype, cache=config.cache_latents)

    timestep_range(config, noise_scheduler)  # (--max_timestep past the model's timesteps: refused before any step)
    validation = Validation(held_out, config, vae, device, vae_dtype, config.validation_seed if config.validation_seed >= 0
                            else seed, group_sizes) if held_out and is_main else None
    validate_every = config.validate_every_n_steps or config.validation_steps

    # 4. optimizer, schedule, and where we start
    fused = _fused_adamw(optimizer_class, optimizer_kwargs, device)
    configured = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    optimizer = optimizer_class(groups, lr=config.learning_rate, **optimizer_kwargs, **fused)
    lr_scheduler = make_lr_scheduler(config, optimizer, max_steps)
    optimizer = accelerator.prepare(optimizer)
    step = 0
    log_rows: list[dict] = []
    if resume is not None:
        _restore_lora(unet, "unet", resume / outputs.LORA_NAME)
        if config.train_text_encoder:
            _restore_lora(text_encoder, "text_encoder", resume / outputs.LORA_NAME)
            if text_encoder_2 is not None:
                _restore_lora(text_encoder_2, "text_encoder_2", resume / outputs.LORA_NAME)
        if pivot is not None:
            pivot.load_state(read_safetensors(resume / "embeddings.safetensors")[0])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        _apply_settings(optimizer, lr_scheduler, configured, optimizer_kwargs)  # the optimizer state holds the old ones
        _set_rng_state(state["rng"])
        step = int(state["step"])
        log_rows = [r for r in outputs.read_log(output_dir / "log.csv") if r["step"] <= step]
        logger.info("resuming from %s at step %d", resume, step)
    if not _left_to_do(step, max_steps, output_dir):
        raise ConfigError(f"{resume} is at step {step}, not before --max_train_steps {max_steps}: nothing to train")

    def loader(plan_: BatchPlan, dataset_: ImageDataset, cached: bool) -> Iterator[dict]:
        sampler = StepBatchSampler(plan_, start=step, stop=max_steps, accumulation=config.gradient_accumulation_steps,
                                   num_processes=accelerator.num_processes, rank=accelerator.process_index)
        def cached_batch(keys: list) -> dict:  # no pixels needed: which image, whether flipped, SDXL's size conditioning
            placed = [(k.index, *dataset_.augmentation(k.index, k.seed)) for k in keys]  # (index, flip, x, y), once each
            return {"indices": [k.index for k in keys], "flips": [flip for _, flip, _, _ in placed],
                    "masks": stack_masks([dataset_.mask(*p) for p in placed], dataset_.bucket_of[keys[0].index]) if masked else None,
                    "captions": [dataset_.caption(*k) for k in keys],
                    "size_conditioning": torch.tensor([dataset_.size_conditioning(*p) for p in placed])}

        if cached:
            return (cached_batch(keys) for keys in sampler)
        return iter(torch.utils.data.DataLoader(dataset_, batch_sampler=sampler, collate_fn=collate,
                                                num_workers=config.dataloader_num_workers, worker_init_fn=_ignore_ctrl_c))

    batches = loader(plan, dataset, config.cache_latents)
    class_batches = loader(class_plan, class_latents.dataset, config.cache_latents) if class_plan else None
    validation_prompt = config.validation_prompt or examples[0].caption

    def trained_encoders() -> dict:
        if not config.train_text_encoder:
            return {}
        return {"text_encoder": text_encoder, **({"text_encoder_2": text_encoder_2} if text_encoder_2 is not None else {})}

    def save_checkpoint(at_step: int) -> Path:
        def fill(folder: Path) -> None:
            save_lora(folder / outputs.LORA_NAME, unet=unet, **trained_encoders(), dtype=torch.float32, metadata={"step": at_step, "base_model": config.pretrained_model_name_or_path})
            if pivot is not None:
                atomic_save(pivot.state(), folder / "embeddings.safetensors", pivot.metadata())
            outputs.save_state(folder, {"step": at_step, "seed": seed, "settings": _settings(config, seed),
                                        "resumed": resumed, "elapsed_s": elapsed_before + time.monotonic() - started,
                                        "optimizer": optimizer.state_dict(),
                                        "lr_scheduler": lr_scheduler.state_dict(), "rng": _rng_state()})

        path = outputs.write_checkpoint(output_dir, at_step, fill)
        outputs.prune_checkpoints(output_dir, config.checkpoints_total_limit)
        return path

    def write_snapshot(at_step: int, suffix: str) -> Path:
        """The LoRA as it is, beside the final one (kohya's --save_every_n_steps / --save_every_n_epochs names)."""
        stem = outputs.kohya_name(output_dir, config.output_name).removesuffix(".safetensors")
        path = output_dir / f"{stem}-{suffix}.safetensors"
        save_lora(path, unet=unet, **trained_encoders(), dtype=SAVE_DTYPES[config.save_precision],
                  metadata=_final_metadata(config, seed, at_step, noise_scheduler, accelerator.num_processes, examples),
                  format="kohya" if config.save_kohya else "diffusers")
        return path

    def write_samples(at_step: int) -> Path:
        unet.eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad(), accelerator.autocast():
            images = pipe(**prompt_kwargs(pipe, [validation_prompt] * config.num_validation_images, config.clip_skip),
                          num_inference_steps=config.validation_inference_steps, width=config.size[0],
                          height=config.size[1], generator=generator).images
        unet.train()
        path = output_dir / "samples" / f"step-{at_step:06d}.png"
        with outputs.atomic_path(path) as tmp:
            outputs.image_grid(images).save(tmp, format="PNG")
        return path

    sample_prompts = read_sample_prompts(config.sample_prompts) if config.sample_prompts else []

    def write_kohya_samples(at_step: int, epoch: int | None) -> list[Path]:
        """kohya's samples (``--sample_prompts``) where ``sample_due`` says, one image a prompt in ``sample/``."""
        if not sample_prompts or not sample_due(at_step, epoch, config.sample_every_n_steps, config.sample_every_n_epochs,
                                                config.sample_at_first):
            return []
        unet.eval()
        scheduler, paths = pipe.scheduler, []
        try:
            for i, prompt in enumerate(sample_prompts):
                pipe.scheduler = scheduler_for_sampler(scheduler, prompt.get("sample_sampler") or config.sample_sampler)
                given = prompt.get("seed")
                generator = torch.Generator().manual_seed(given if given is not None else mix_seed(seed, at_step, i, 7))
                width, height = (max(8, v - v % 8) for v in (prompt.get("width", config.size[0]), prompt.get("height", config.size[1])))
                negative = [prompt["negative_prompt"]] if prompt.get("negative_prompt") else None
                with torch.no_grad(), accelerator.autocast():  # (weighted, long prompts: as kohya's LPW pipeline reads them)
                    image = pipe(**prompt_embeds(pipe, [prompt["prompt"]], negative, clip_skip=config.clip_skip),
                                 num_inference_steps=prompt.get("sample_steps", 30), guidance_scale=prompt.get("scale", 7.5),
                                 height=height, width=width, generator=generator).images[0]
                path = output_dir / "sample" / sample_file_name(config.output_name, at_step, epoch, i, given)
                with outputs.atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(path)
        finally:
            pipe.scheduler = scheduler
            unet.train()
        return paths

    def write_log() -> None:
        outputs.write_log(output_dir / "log.csv", log_rows)
        outputs.plot_loss(output_dir / "loss.png", log_rows)

    # 5. the loop
    # nothing of a previous run is touched before this point: --overwrite sets it aside now, deletes it at the end
    previous = _PreviousRun(output_dir, config.output_name) if is_main and (config.overwrite or replace_stopped) and resume is None else None
    if is_main and resume is not None:  # resuming an earlier step abandons the checkpoints past it: kept aside
        outputs.set_aside_checkpoints_after(output_dir, step)
    ctrl_c = _CtrlC()
    try:
        bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", disable=not accelerator.is_local_main_process)
        started, first_step = time.monotonic(), step
        elapsed_before = float(state.get("elapsed_s", log_rows[-1]["elapsed_s"] if log_rows else 0.0)) if state else 0.0
        status, message, loss_value, val_loss = "completed", "", None, None
        checkpoint = outputs.list_checkpoints(output_dir)[-1] if outputs.list_checkpoints(output_dir) else None
        sample_paths: list[Path] = []
        stop_requested = False
        if is_main and step == 0:  # (--sample_at_first)
            sample_paths += write_kohya_samples(0, None)
        unet.train()
        while step < max_steps:
            if stop_requested and accelerator.num_processes == 1:  # no need to agree with other processes
                status, message = "cancelled", f"cancelled at step {step}"
                break
            loss_sum = torch.zeros((), device=device)
            for micro in range(config.gradient_accumulation_steps):
                batch = next(batches)
                generator = torch.Generator().manual_seed(mix_seed(seed, step, micro, accelerator.process_index))
                torch.manual_seed(mix_seed(seed, step, micro, accelerator.process_index, 1))  # LoRA dropout
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with accelerator.autocast():
                    with torch.set_grad_enabled(train_text):
                        states, added = condition(pipe, batch["captions"], batch["size_conditioning"], device, weight_dtype,
                                                  config.clip_skip, config.max_token_length, config.weighted_captions)
                    loss = diffusion_loss(step_unet, noise_scheduler, latents.sample(batch, generator), states, generator, config,
                                          added, batch["masks"] if masked else None)
                    if class_batches is not None:
                        class_batch = next(class_batches)
                        with torch.set_grad_enabled(train_text):
                            class_states, class_added = condition(pipe, class_batch["captions"], class_batch["size_conditioning"],
                                                                  device, weight_dtype, config.clip_skip, config.max_token_length,
                                                                  config.weighted_captions)
                        prior = diffusion_loss(step_unet, noise_scheduler, class_latents.sample(class_batch, generator),
                                               class_states, generator, config, class_added, class_batch["masks"] if masked else None)
                        loss = loss + config.prior_loss_weight * prior
                accelerator.backward(loss / config.gradient_accumulation_steps)
                loss_sum += loss.detach().float()
            # one reduce carries the mean loss and the main process's stop request to every process
            stats = accelerator.reduce(torch.stack([loss_sum / config.gradient_accumulation_steps,
                                                    torch.tensor(float(stop_requested), device=device)]), reduction="mean")
            loss_value = float(stats[0])
            if stats[1] > 0:
                status, message = "cancelled", f"cancelled at step {step}"
                break
            if not math.isfinite(loss_value):
                status = "diverged"
                message = (f"loss became {loss_value} at step {step + 1}; training stopped without saving. "
                           + (f"The last good checkpoint is {checkpoint}. " if checkpoint else "No checkpoint was saved yet. ")
                           + "Try a lower --learning_rate, --mixed_precision bf16 instead of fp16, or check the data.")
                logger.error(message)
                break
            _average_gradients(params, accelerator)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            # fused optimizers (torch's fused AdamW, bitsandbytes') write the factors through their pointers and count
            # no version: count one, or the layers' caches (kept while the versions stand) would miss the step
            for param in params:
                torch.autograd.graph.increment_version(param)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            norms = scale_weight_norms([unet, *encoders], config.scale_weight_norms) if config.scale_weight_norms else None

            lr = lr_scheduler.get_last_lr()[0]
            run_time = time.monotonic() - started
            elapsed = elapsed_before + run_time  # over the whole run, resumes included
            log_rows.append({"step": step, "epoch": plan.epoch_of(step * per_step - 1), "loss": loss_value, "lr": lr, "elapsed_s": round(elapsed, 3),
                             **({"keys_scaled": norms[0], "max_key_norm": norms[2]} if norms else {})})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            new_samples: list[Path] = []
            saved = None
            if validation is not None and (step == max_steps or validate_every and step % validate_every == 0):
                with accelerator.autocast():
                    val_loss = log_rows[-1]["val_loss"] = validation.loss(pipe, unet, noise_scheduler, weight_dtype)
            if is_main:
                if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < max_steps:
                    checkpoint = saved = save_checkpoint(step)
                    own_checkpoints.add(step)
                epochs_done = step * per_step // plan.batches_per_epoch
                saves = []  # kohya's saves at this step: (kind, number, how many to keep, every)
                if step < max_steps and config.save_every_n_steps and step % config.save_every_n_steps == 0:
                    write_snapshot(step, f"step{step:08d}")
                    outputs.prune_snapshots(output_dir, config.output_name, "step", step, config.save_last_n_steps, config.save_every_n_steps)
                    saves.append(("step", step, config.save_last_n_steps_state or config.save_last_n_steps, config.save_every_n_steps))
                if (every_epochs and epochs_done > (step - 1) * per_step // plan.batches_per_epoch
                        and epochs_done % every_epochs == 0 and step < max_steps):
                    write_snapshot(step, f"{epochs_done:06d}")
                    outputs.prune_snapshots(output_dir, config.output_name, "epoch", epochs_done,
                                            every_epochs * config.save_last_n_epochs, every_epochs)
                    saves.append(("epoch", epochs_done, every_epochs * (config.save_last_n_epochs_state or config.save_last_n_epochs), every_epochs))
                if saves and config.save_state:  # (kohya's --save_state: a state with each save, pruned as kohya's)
                    if saved is None:
                        checkpoint = saved = save_checkpoint(step)
                    for kind, number, keep, every in saves:
                        kohya_states[(kind, number)] = step
                        outputs.prune_states(output_dir, kohya_states, kind, number, keep, every, own_checkpoints)
                if config.num_validation_images and config.validation_steps and step % config.validation_steps == 0 and step < max_steps:
                    new_samples.append(write_samples(step))
                new_samples += write_kohya_samples(step, None)
                if epochs_done > (step - 1) * per_step // plan.batches_per_epoch:  # (an epoch ended with this step)
                    new_samples += write_kohya_samples(step, epochs_done)
                if step % LOG_EVERY == 0 or saved:
                    write_log()
                if progress is not None:
                    eta = run_time / (step - first_step) * (max_steps - step)
                    report = {"step": step, "max_steps": max_steps, "epoch": log_rows[-1]["epoch"], "loss": loss_value, "lr": lr,
                              "eta_s": eta, "elapsed_s": elapsed, "sample_paths": [str(p) for p in new_samples],
                              "checkpoint": str(saved) if saved else None, "val_loss": log_rows[-1].get("val_loss")}
                    stop_requested = progress(report) is False
                stop_requested = stop_requested or bool(cancel is not None and cancel.is_set())
            stop_requested = stop_requested or ctrl_c.pressed
            sample_paths += new_samples
        bar.close()

        # 6. the end: weights identical on every process, then the files (main process only)
        _check_in_sync(params, accelerator)
        lora_path = kohya_path = None
        if is_main and status != "diverged":
            if status == "cancelled" and (checkpoint is None or checkpoint.name != f"checkpoint-{step}") and step > 0:
                checkpoint = save_checkpoint(step)
            if status == "cancelled":
                message += (f"; checkpoint saved in {checkpoint} (continue with --resume_from_checkpoint latest)"
                            if step > 0 else "; nothing was saved")
            if status == "completed":
                checkpoint = save_checkpoint(step)
                lora_path = output_dir / outputs.LORA_NAME
                metadata = _final_metadata(config, seed, step, noise_scheduler, accelerator.num_processes, examples)
                if resumed and not config.no_metadata:
                    metadata["training"]["resumed"] = resumed
                if pivot is not None:
                    atomic_save(pivot.state(), output_dir / "embeddings.safetensors", pivot.metadata())
                    metadata["embedding_file"] = "embeddings.safetensors"
                save_lora(lora_path, unet=unet, **trained_encoders(), dtype=SAVE_DTYPES[config.save_precision], metadata=metadata)
                kohya_name, card_name, preview_name = outputs.kohya_companions(output_dir, config.output_name)
                if config.save_kohya:  # (the pivotal-tuning token bundled, as A1111 loads it)
                    kohya_path = convert_lora(lora_path, output_dir / kohya_name, to="kohya", overwrite=True)
                    outputs.write_a1111_card(output_dir / card_name, trigger=config.token, architecture=_unet_architecture(unet),
                                             description=f"{config.mode} LoRA, rank {config.rank}, {step} steps on "
                                                         f"{len(examples)} images (lora_diffusion)")
                if config.num_validation_images:
                    sample_paths.append(write_samples(step))
                    if config.save_kohya:  # A1111's card preview: the last sample grid
                        with outputs.atomic_path(output_dir / preview_name) as tmp:
                            shutil.copyfile(sample_paths[-1], tmp)
                message = f"trained {step} steps; LoRA written to {lora_path}" + (f" and, for A1111 / ComfyUI, {kohya_path}" if kohya_path else "")
        if is_main:
            write_log()
            logger.info("%s", message)
        accelerator.wait_for_everyone()
        unet.eval()
    finally:
        restore_fp8(fp8_layers, weight_dtype)  # (the pipeline returned computes without autocast)
        ctrl_c.restore()
        if previous is not None:
            previous.close()
    return TrainResult(status=status, message=message, output_dir=output_dir, global_step=step, max_steps=max_steps,
                       lora_path=lora_path, kohya_path=kohya_path, checkpoint=checkpoint, final_loss=loss_value, val_loss=val_loss,
                       sample_paths=sample_paths,
                       log_path=output_dir / "log.csv", pipeline=pipe)


def _targets(spec: str, model: nn.Module, flag: str):
    """``--target_modules`` -> ``inject_lora`` targets: a preset name, a regex, or comma-separated suffixes; a
    ``ConfigError`` naming ``flag`` if they match no layer of ``model``."""
    from ..inject import TARGET_PRESETS, parse_targets, resolve_targets

    targets = parse_targets(spec)
    if not resolve_targets(model, targets):
        raise ConfigError(f"{flag} {spec!r} matches no Linear or Conv2d layer of the {type(model).__name__}; give a "
                          f"preset ({', '.join(TARGET_PRESETS['unet'])}), a regex or comma-separated module-name suffixes")
    return targets


def _check_in_sync(params: list[nn.Parameter], accelerator) -> None:
    """Every process must end with the same LoRA weights; a difference is a bug worth stopping for."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    spread = accelerator.reduce(flat, reduction="max") - (-accelerator.reduce(-flat, reduction="max"))
    if float(spread.abs().max()) != 0.0:
        raise RuntimeError(f"LoRA weights differ across processes by up to {float(spread.abs().max()):g}")


def _fixed_on_resume(settings: dict) -> dict:
    """The settings a resumed run cannot change: they shape the LoRA saved in the checkpoint."""
    te, pivot = settings["train_text_encoder"], settings["pivotal_tuning"]
    return {"rank": settings["rank"], "lora_alpha": settings["lora_alpha"], "target_modules": settings["target_modules"],
            "train_text_encoder": te, "text_encoder_target_modules": settings["text_encoder_target_modules"] if te else None,
            "pivotal_tuning": pivot, "token": settings["token"] if pivot else None,
            "use_dora": settings.get("use_dora", False), "conv_rank": settings.get("conv_rank", 0),
            "conv_alpha": settings.get("conv_alpha", 0.0), "rank_pattern": settings.get("rank_pattern", ""),
            "alpha_pattern": settings.get("alpha_pattern", ""), "dim_from_weights": settings.get("dim_from_weights", False)}


NOT_SETTINGS = ("resume_from_checkpoint", "overwrite")


def _settings(config: TrainConfig, seed: int) -> dict:
    """What a checkpoint records of the run's settings (``lora_alpha`` resolved, the seed drawn)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_SETTINGS}
    return {**values, "lora_alpha": config.alpha, "seed": seed}


def _check_resume_settings(config: TrainConfig, state: dict, resume: Path) -> list[dict]:
    """Refuse a change that cannot take effect on resume (the LoRA's shape); log the others, which do (learning
    rates, schedule, optimizer settings: applied from the resumed step on). Returns the run's history of changes."""
    history = list(state.get("resumed", []))
    saved = state.get("settings")
    if not saved:  # a checkpoint from before settings were recorded
        return history
    now = _settings(config, state["seed"] if config.seed < 0 else config.seed)
    fixed = _fixed_on_resume(now)
    for flag, before in _fixed_on_resume(saved).items():
        if fixed[flag] != before:
            raise ConfigError(f"--{flag} {fixed[flag]!r} differs from {before!r} in {resume}: a resumed run "
                              f"keeps the LoRA it was trained with; pass --{flag} {before!r} or start a new run")
    changed = {k: [saved[k], now[k]] for k in now if k in saved and saved[k] != now[k]}
    for key, (old, new) in changed.items():
        logger.warning("resuming %s at step %d with --%s %r (the checkpoint's run used %r): it applies from here on",
                       resume, state["step"], key, new, old)
    if changed:
        history.append({"step": int(state["step"]), "changed": changed})
    return history


def _apply_settings(optimizer, lr_scheduler, configured: list[dict], settings: dict) -> None:
    """After loading an optimizer and schedule state: this run's learning rates and optimizer ``settings``
    (``_optimizer_kwargs``), not the saved ones."""
    for group, wanted in zip(optimizer.param_groups, configured):
        group.update({k: v for k, v in settings.items() if k in group})
        group["weight_decay"] = wanted.get("weight_decay", settings["weight_decay"])
        group["initial_lr"] = wanted["lr"]
    lr_scheduler.base_lrs = [wanted["lr"] for wanted in configured]
    if hasattr(lr_scheduler, "lr_lambdas"):  # diffusers' schedules: base rate x a factor of the step
        lrs = [base * f(lr_scheduler.last_epoch) for base, f in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs


def _final_metadata(config: TrainConfig, seed: int, step: int, scheduler, num_processes: int, examples: list[Example]) -> dict:
    """What a LoRA file of the run records (``formats_kohya.to_kohya`` writes it as kohya's ``ss_*`` and ``modelspec.*``
    keys). ``--no_metadata`` leaves out, as kohya's leaves out, the settings (but the dropouts that kohya's
    ``ss_network_args`` keeps), the data set, the comment and the base model's path."""
    settings = dataclasses.asdict(config)
    settings["seed"] = seed
    if config.no_metadata:
        return {"trigger_words": [config.token] if config.token else [], "mode": config.mode,
                "prediction_type": scheduler.config.prediction_type,
                "training": {k: settings[k] for k in ("rank_dropout", "module_dropout") if settings[k]},
                "card": {"title": config.metadata_title, "author": config.metadata_author,
                         "description": config.metadata_description, "license": config.metadata_license,
                         "tags": config.metadata_tags}}
    return {
        "dataset": dataset_summary(examples, None if config.dataset_config else config.train_data_dir),
        "base_model": config.pretrained_model_name_or_path,
        "trigger_words": [config.token] if config.token else [],
        "mode": config.mode,
        "steps": step,
        "resolution": config.resolution if not config.resolution_height else list(config.size),
        "prediction_type": scheduler.config.prediction_type,
        "num_processes": num_processes,
        "training": settings,
        # kohya's comment and model card (``formats_kohya.to_kohya`` writes them where kohya does)
        "comment": config.training_comment,
        "card": {"title": config.metadata_title, "author": config.metadata_author, "description": config.metadata_description,
                 "license": config.metadata_license, "tags": config.metadata_tags},
    }


def _class_examples(pipe, config: TrainConfig, accelerator, seed: int) -> list[Example]:
    """Class images for prior preservation: the readable ones in ``class_data_dir``, the missing ones generated by
    the base model."""
    folder = Path(config.class_data_dir)

    def readable() -> list[Example]:
        try:
            return scan_images(folder, caption_extension="", instance_prompt=config.class_prompt, strict=config.strict,
                               what="--class_data_dir", resolution=max(config.size))
        except DataError:  # no folder or no image yet (or, --strict, an unreadable one: refused below)
            return []

    found = readable()
    have = len(found)
    if have < config.num_class_images and accelerator.is_main_process:
        logger.info("generating %d class images for %r in %s", config.num_class_images - have, config.class_prompt, folder)
        pipe.to(accelerator.device)
        i = have
        for _ in range(config.num_class_images - have):
            while any(folder.glob(f"class-{i:05d}.*")):  # never overwrite an image: take the next free name
                i += 1
            generator = torch.Generator().manual_seed(mix_seed(seed, 7, i))
            with torch.no_grad():
                image = pipe(**prompt_kwargs(pipe, [config.class_prompt], config.clip_skip), num_inference_steps=config.validation_inference_steps,
                             width=config.size[0], height=config.size[1], generator=generator).images[0]
            with outputs.atomic_path(folder / f"class-{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
            i += 1
    accelerator.wait_for_everyone()
    if have < config.num_class_images:
        found = scan_images(folder, caption_extension="", instance_prompt=config.class_prompt, strict=config.strict,
                            what="--class_data_dir", resolution=max(config.size))
    return [dataclasses.replace(e, caption=config.class_prompt) for e in found[: config.num_class_images]]

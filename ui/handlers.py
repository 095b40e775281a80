"""What the UI does, as plain Python over the public ``lora_diffusion`` API: no gradio import here.

``Backend`` owns the pipeline (loaded on first use, never at import), the LoRA library folder, one lock that
makes "set the blend, then generate" atomic (so two users' blends never mix through the shared pipeline) and a
training queue that runs one job at a time. ``ui.app`` only wires these to widgets.

Example:
    >>> backend = Backend(model=None, lora_dir="loras")            # None: the bundled tiny model
    >>> result = backend.generate(GenerateRequest("a red circle <lora:style:0.8>", seed=1, steps=4))
    >>> result.image.size, result.caption
    ((64, 64), 'style 0.8 | seed 1, 4 steps, cfg 7.5, 64x64')
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import io
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_diffusion import delete_adapter, fuse, load_lora, set_adapters, unfuse
from lora_diffusion.blend import finite_number as _finite_number, lbw_blocks, merge_loras, parse_prompt
from lora_diffusion.formats import WRITERS, LoraFormatError
from lora_diffusion.generate import (HIRES_TAGS_REFUSED, HIRES_UPSCALERS, MASKED_CONTENT, MAX_MASK_BLUR, MAX_MASKED_PADDING, SAMPLERS,
                                     SCHEDULE_TYPES, a1111_params,
                                     conds_padded, denoising_steps, flatten_start, hires_fix, hires_size, image_to_image, infotext,
                                     infotext_settings, inpaint, lora_hash, lora_tag, mask_levels, model_hash, png_infotext,
                                     hires_pass_params, hires_scheduler, second_pass_params, set_sampler, split_sampler, unread_settings, variation_noise,
                                     variation_params, with_noise_schedule)
from lora_diffusion.prompts import check_clip_skip, prompt_chunks, prompt_kwargs, prompt_schedule, scheduled_prompt_kwargs
from lora_diffusion.tools import convert_lora
from lora_diffusion.xyplot import AXES, draw_z_grid, grid_infotext, plot_cells, z_grids

from .library import SUFFIX, LoraInfo, LoraLibrary, UIError, check_name, safe_child, sanitize_name

logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "GenerateRequest",
    "GenerateResult",
    "TrainRequest",
    "TrainJob",
    "TrainQueue",
    "BLOCK_PRESETS",
    "UIError",
    "parse_lora_tags",
    "apply_blend",
    "prepare_dataset",
    "caption_rows",
    "diffusers_snippet",
    "default_model",
    "png_info",
]

TINY_FALLBACK = "lora_diffusion.testing.tiny_pipeline(0)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Per-block strengths of the UNet, in diffusers' vocabulary (down = IN, mid = MID, up = OUT); None = all 1.
BLOCK_PRESETS: dict[str, dict[str, float] | None] = {
    "all blocks": None,
    "IN (down) only": {"down": 1.0, "mid": 0.0, "up": 0.0},
    "MID only": {"down": 0.0, "mid": 1.0, "up": 0.0},
    "OUT (up) only": {"down": 0.0, "mid": 0.0, "up": 1.0},
    "no MID": {"down": 1.0, "mid": 0.0, "up": 1.0},
    "OUT half": {"down": 1.0, "mid": 1.0, "up": 0.5},
}


def default_model() -> str | None:
    """The bundled tiny model's folder, or ``None`` when it is not installed (then ``tiny_pipeline(0)`` is used)."""
    try:
        from lora_diffusion.data import TINY_MODEL
    except ImportError:
        return None
    return str(TINY_MODEL) if TINY_MODEL and Path(TINY_MODEL).is_dir() else None


# ---------------------------------------------------------------------------------------------- prompts, blends
def parse_lora_tags(prompt: str) -> tuple[str, dict[str, tuple[float, float]], dict[str, tuple[float, ...]]]:
    """A1111 tags out of a prompt: ``(prompt without tags, {name: (unet weight, text-encoder weight)}, {name: LoRA
    Block Weight vector})``.

    ``<lora:name>`` is weight 1, ``<lora:name:w>`` weight w for both, ``<lora:name:te:unet>`` separate weights, and the
    LBW extension's ``<lora:name:w:IND>`` / ``lbw=1,0,...`` a block weight vector (``lora_diffusion.blend.parse_prompt``);
    names must be plain library names.

    Example:
        >>> parse_lora_tags("a cat <lora:style:0.5> <lora:ink:0.2:1>")
        ('a cat', {'style': (0.5, 0.5), 'ink': (1.0, 0.2)}, {})
    """
    try:
        clean, tags = parse_prompt(prompt)
    except ValueError as e:
        raise UIError(str(e)) from None
    weights = {check_name(n): (float(w.unet), float(w.te)) for n, w in tags.items()}
    return clean, weights, {n: tuple(w.blocks) for n, w in tags.items() if w.blocks is not None}


def apply_blend(pipe, loras: dict[str, tuple[float, float]], blocks: dict[str, float] | None = None,
                tag_blocks: dict[str, tuple[float, ...]] | None = None) -> None:
    """Make exactly ``loras`` active: ``{name: (unet weight, text-encoder weight)}``, UNet weights times ``blocks``.

    ``blocks`` scales the UNet's ``down``/``mid``/``up`` blocks (diffusers' per-block dict; see
    ``lora_diffusion.blend.block_factor``); ``tag_blocks``: LoRA Block Weight vectors of some LoRAs (their tags'),
    in place of ``blocks`` for those.

    Example:
        >>> apply_blend(pipe, {"style": (0.8, 0.0), "subject": (1.0, 1.0)}, {"down": 0, "mid": 1, "up": 1})
    """
    if tag_blocks:
        blocks = {n: list(tag_blocks[n]) if n in tag_blocks else blocks for n in loras}
    set_adapters(pipe, {n: w for n, (w, _) in loras.items()}, text_encoder={n: t for n, (_, t) in loras.items()},
                 blocks=blocks)


def _plain(pipe, text: str, steps: int) -> bool:
    """``text`` encodes the same with and without A1111's syntax: no prompt editing, one chunk, every weight 1, no
    ``BREAK``."""
    if prompt_schedule(text, steps) != [(steps, text)]:
        return False
    chunks = prompt_chunks(pipe.tokenizer, text)
    return len(chunks) == 1 and all(w == 1 for w in chunks[0][1]) and chunks[0][0] == prompt_chunks(
        pipe.tokenizer, text, emphasis=False)[0][0]


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float, else ``UIError`` naming ``what`` (a NaN or Inf weight gives a black image)."""
    try:
        return _finite_number(value, what)
    except ValueError as e:
        raise UIError(str(e)) from None


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _seed(value: Any) -> int:
    """``value`` as a seed ``torch.Generator.manual_seed`` takes, else ``UIError``."""
    if not SEED_RANGE[0] <= int(value) <= SEED_RANGE[1]:
        raise UIError(f"the seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {value}")
    return int(value)
KEEP_IMAGES = 200  # generated PNGs a backend keeps on disk (a gallery shows the newest 24)
MAX_PLOT_CELLS = 64  # images one X/Y plot makes
# txt2img's keywords that an X/Y plot's axes set -> the GenerateRequest fields they are
_PLOT_FIELDS = {"seed": "seed", "steps": "steps", "cfg_scale": "guidance", "sampler": "sampler", "schedule_type": "schedule_type",
                "denoising_strength": "denoising_strength", "clip_skip": "clip_skip", "hires_scale": "hires_scale",
                "hires_steps": "hires_steps", "subseed": "subseed", "subseed_strength": "subseed_strength"}
# the X/Y/Z axes the tab plots (a Checkpoint name axis loads other models: the command line's)
PLOT_AXES = [name for name, (_, key) in AXES.items() if key is None or key in _PLOT_FIELDS]
MAX_TRAIN_RESOLUTION = 2048  # as generation's largest side


def _fmt(x: float) -> str:
    return f"{x:g}"


def _strength(req: GenerateRequest) -> float:
    """The request's denoising strength, in (0, 1], else ``UIError``."""
    strength = finite_number(req.denoising_strength, "the denoising strength")
    if not 0 < strength <= 1:
        raise UIError(f"the denoising strength must be in (0, 1], got {_fmt(strength)}")
    return strength


def _blend_error(error: Exception, fused: bool) -> str:
    """The message for a blend the library refused to set (``set_adapters``) or to fuse (``fuse``)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    what = "cannot fuse this blend" if fused else "cannot set this blend"
    hint = "; generate without Fuse, or lower the weights" if fused else ""
    return f"{what}: {text}{hint}"


def blend_label(loras: dict[str, tuple[float, float]], tag_blocks: dict | None = None) -> str:
    """``"style 0.8 (te 0.5) + ink 1 (lbw)"``, or ``"no LoRA"`` (``tag_blocks``: the LoRAs with block weight vectors)."""
    parts = [f"{n} {_fmt(w)}" + ("" if t == w else f" (te {_fmt(t)})") + (" (lbw)" if n in (tag_blocks or {}) else "")
             for n, (w, t) in loras.items()]
    return " + ".join(parts) or "no LoRA"


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class GenerateRequest:
    """One generation: prompt (A1111 ``<lora:name:w>`` tags allowed) and the LoRA blend.

    ``loras`` maps a library name to its UNet weight and optional text-encoder weight (``None``: same as UNet).
    Tags in the prompt add LoRAs or override these weights.
    """

    prompt: str
    negative_prompt: str = ""
    loras: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    block_preset: str = "all blocks"
    fuse: bool = False
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1  # A1111's count: 2 conditions on the text encoder's penultimate layer (SD 1.x / 2.x)
    sampler: str | None = None  # an A1111 sampler name (lora_diffusion.generate.SAMPLERS); None: the model's own
    schedule_type: str = "Automatic"
    emphasis: bool = True  # A1111's prompt syntax: (word:1.2), [word], prompts past 75 tokens, BREAK
    # A1111's "Hires. fix" (``lora_diffusion.generate.hires_fix``), on when ``hires_scale`` > 1: the image made at
    # width x height, upscaled by ``hires_upscaler`` and denoised again for ``hires_steps`` (0: ``steps``)
    hires_scale: float = 1.0
    hires_steps: int = 0
    hires_upscaler: str = "Latent"
    hires_cfg_scale: float = 0.0  # the second pass's guidance (Forge's Hires CFG Scale); 0: ``guidance``
    # its sampler and schedule type (A1111's Hires sampler, Hires schedule type; None: "Use same", the first pass's) and
    # prompts (A1111's Hires prompt, Hires negative prompt; "": the first pass's; LoRA tags, if any, the prompt's)
    hires_sampler: str | None = None
    hires_schedule_type: str | None = None
    hires_prompt: str = ""
    hires_negative_prompt: str = ""
    hires_resize: tuple[int, int] | None = None  # A1111's "Resize width / height to" (w, h) in place of the scale; 0: by the other
    noise_schedule: str = "Default"  # A1111's noise schedule for sampling (``lora_diffusion.generate.NOISE_SCHEDULES``)
    denoising_strength: float = 0.7  # of a Hires. fix's second pass, or of img2img
    # img2img (``lora_diffusion.generate.image_to_image``): the image file to start from, resized to width x height
    # (by default its own size, down to a multiple of 8)
    init_image: str | None = None
    # inpainting (``lora_diffusion.generate.inpaint``): with ``init_image``, repaint where this image is white, its
    # edge blurred by ``mask_blur`` px (A1111's defaults: original content, the whole picture)
    mask_image: str | None = None
    mask_blur: int = 4
    inpaint_only_masked: bool = False  # A1111's "Only masked" inpaint area, ``masked_padding`` px around the mask
    masked_padding: int = 32
    masked_content: str = "original"  # A1111's Masked content (``MASKED_CONTENT``): the start under the mask
    inpaint_not_masked: bool = False  # A1111's "Inpaint not masked" mask mode: repaint where the mask is black
    # A1111's variation seed (text-to-image): the starting noise ``subseed_strength`` of the way toward ``subseed``'s
    subseed: int = 0
    subseed_strength: float = 0.0


@dataclass
class GenerateResult:
    """An image and what made it: the effective blend, a caption, and a diffusers snippet that reproduces it."""

    image: Any  # PIL.Image.Image
    prompt: str
    loras: dict[str, tuple[float, float]]
    caption: str
    snippet: str
    settings: dict
    infotext: str = ""  # A1111's "parameters" text (the blend as <lora:...> tags; block presets are not in it)


def _config_changes(scheduler, base) -> tuple[str, dict]:
    """``scheduler``'s class and the settings in which it differs from its class made on ``base``'s config (the
    snippet's ``from_config``)."""
    baseline = type(scheduler).from_config(base.config).config
    return type(scheduler).__name__, {k: v for k, v in scheduler.config.items() if not k.startswith("_") and baseline.get(k) != v}


def _py(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def diffusers_snippet(
    model: str | None,
    lora_paths: dict[str, str],
    loras: dict[str, tuple[float, float]],
    *,
    prompt: str,
    negative_prompt: str,
    blocks: dict[str, float] | None,
    fused: bool,
    seed: int,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    sdxl: bool = False,
    model_config: str | None = None,
    clip_skip: int = 1,
    scheduler: tuple[str, dict] | None = None,
    a1111_prompt: bool = False,
    hires: tuple[float, int, str, float, tuple[int, int] | None] | None = None,
    init_image: tuple[str, float] | None = None,
    tag_blocks: dict[str, tuple[float, ...]] | None = None,
    mask: tuple[str, int, int | None, str, bool] | None = None,
    variation: tuple[int, float] | None = None,
    hires_guidance: float | None = None,
    noise_schedule: str = "Default",
    fp8_weight: bool = False,
    hires_prompts: tuple[str, str] | None = None,
    second_scheduler: tuple[str, dict] | None = None,
) -> str:
    """Stock-diffusers code (``load_lora_weights`` / ``set_adapters``) that reproduces one generation (``sdxl``:
    the model has a second text encoder, which takes the text-encoder weights too; a single-file ``model`` loads
    with ``from_single_file``, its configs from ``model_config`` where given; ``scheduler``: a scheduler class and the
    settings that differ from the model's own; ``a1111_prompt``: the prompts use A1111's emphasis, length or prompt
    editing, whose embeddings ``lora_diffusion.prompts.scheduled_prompt_kwargs`` makes; ``hires``: a Hires. fix's
    ``(scale, second-pass steps, upscaler, denoising strength, resize or None)``, as diffusers' img2img pipeline on the same modules
    at ``hires_guidance`` (``None``: ``guidance``), with ``hires_prompts`` ``(prompt, negative prompt)`` (``None``: the first
    pass's) and ``second_scheduler`` (as ``scheduler``, on the first pass's; ``None``: that one); ``noise_schedule``: A1111's, "Zero Terminal SNR" as
    ``lora_diffusion.generate.zero_terminal_snr``;
    ``init_image``: img2img from ``(image file, denoising strength)``, that pipeline too, or with ``mask`` ``(mask
    file, blur, only-masked padding or None, masked content, inpaint not masked)`` the inpaint pipeline, pasted back
    through A1111's overlay (by its ``padding_mask_crop`` for "Only masked"); a masked content other than original,
    which diffusers' pipeline does not make, is ``lora_diffusion.generate.inpaint`` on the pipeline; ``variation``:
    A1111's ``(variation seed, strength)``, the pipeline's ``latents`` from ``lora_diffusion.generate.variation_noise``;
    ``tag_blocks``: LoRA Block
    Weight vectors from the prompt's tags, which diffusers' ``set_adapters`` cannot express: the LoRAs then load and
    blend with ``lora_diffusion``'s ``load_lora`` / ``set_adapters`` in the same pipeline; so they do with
    ``fp8_weight``, the UNet's weights stored in fp8 by ``lora_diffusion.fp8.store_fp8`` first)."""
    lines = ["import torch", "from diffusers import DiffusionPipeline", ""]
    if model is None:
        lines[1:2] = ["from lora_diffusion.testing import tiny_pipeline"]
        lines.append("pipe = tiny_pipeline(0)  # the UI's built-in tiny model")
    elif Path(model).is_file():
        cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        lines[1] = f"from diffusers import {cls}"
        config = f", config={_py(model_config)}" if model_config else ""
        extra = "" if sdxl else ", safety_checker=None, requires_safety_checker=False"
        lines.append(f"pipe = {cls}.from_single_file({_py(model)}{config}{extra})")
    else:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({_py(model)})")
    if fp8_weight:  # (before the LoRAs: diffusers' loader cannot take fp8 weights, ours loads onto them)
        lines += ["from lora_diffusion.fp8 import store_fp8  # A1111's FP8 weight",
                  "store_fp8([(\"unet\", pipe.unet)], pipe.unet.dtype)"]
    if tag_blocks or fp8_weight:
        lines += _lora_diffusion_blend(lora_paths, loras, blocks, tag_blocks or {}, fused)
    else:
        lines += _diffusers_blend(lora_paths, loras, blocks, fused, sdxl)
    if scheduler is not None:
        name, changes = scheduler
        lines += [f"from diffusers import {name}",
                  f"pipe.scheduler = {name}.from_config(pipe.scheduler.config" +
                  "".join(f", {k}={v!r}" for k, v in changes.items()) + ")"]
    if hires and second_scheduler is not None:  # (A1111's Hires sampler: the img2img pass's, on the first pass's config)
        name, changes = second_scheduler
        lines += [f"from diffusers import {name}",
                  f"hires_scheduler = {name}.from_config(pipe.scheduler.config" +
                  "".join(f", {k}={v!r}" for k, v in changes.items()) + ")"]
    if noise_schedule != "Default":
        lines += ["from lora_diffusion.generate import zero_terminal_snr  # A1111's Noise Schedule: " + noise_schedule,
                  "pipe.scheduler = zero_terminal_snr(pipe.scheduler)"]
        if hires and second_scheduler is not None:
            lines.append("hires_scheduler = zero_terminal_snr(hires_scheduler)")
    hires_prompt, hires_negative = hires_prompts if hires and hires_prompts else (prompt, negative_prompt)
    args = [_py(prompt)]
    if negative_prompt:
        args.append(f"negative_prompt={_py(negative_prompt)}")
    second = [_py(hires_prompt)] + ([f"negative_prompt={_py(hires_negative)}"] if hires_negative else [])
    if a1111_prompt:  # (emphasis, long prompts, prompt editing: ours; the pipeline's own for plain prompts)
        negative = _py(negative_prompt) if negative_prompt else "None"
        lines += ["from lora_diffusion.prompts import scheduled_prompt_kwargs",
                  f"texts = scheduled_prompt_kwargs(pipe, {_py(prompt)}, {negative}, {steps}, clip_skip={clip_skip})"]
        args, second = ["**texts"], ["**texts"]
        if hires:  # (the second pass schedules prompt editing on from the first, as A1111)
            lines.append(f"texts_hires = scheduled_prompt_kwargs(pipe, {_py(hires_prompt)}, "
                         f"{_py(hires_negative) if hires_negative else 'None'}, {hires[1]}, clip_skip={clip_skip}, base_steps={steps})")
            second = ["**texts_hires"]
    elif clip_skip > 1:  # the embeddings from that layer, the negative prompt's too, as A1111 takes them
        lines += [
            "",
            "def embed(text):  # CLIP skip " + str(clip_skip) + " (A1111's count): that layer from the end, through the final norm",
            "    ids = pipe.tokenizer([text], padding=\"max_length\", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors=\"pt\").input_ids",
            f"    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-{clip_skip}]",
            "    return getattr(pipe.text_encoder, \"text_model\", pipe.text_encoder).final_layer_norm(hidden)",
            "",
            "with torch.no_grad():",
            f"    prompt_embeds, negative_embeds = embed({_py(prompt)}), embed({_py(negative_prompt)})",
        ]
        args = ["prompt_embeds=prompt_embeds", "negative_prompt_embeds=negative_embeds"]
        second = list(args)
        if (hires_prompt, hires_negative) != (prompt, negative_prompt):
            lines.append(f"    hires_embeds, hires_negative_embeds = embed({_py(hires_prompt)}), embed({_py(hires_negative)})")
            second = ["prompt_embeds=hires_embeds", "negative_prompt_embeds=hires_negative_embeds"]
    if init_image and mask:
        path, strength = init_image
        mask_file, mask_blur, padding, content, invert = mask
        if content != "original":
            keywords = [f"prompt={args[0]}", *args[1:]] if args[:1] == [_py(prompt)] else args  # (the prompt by name)
            return "\n".join(lines + [
                "from PIL import Image",
                "from lora_diffusion.generate import inpaint  # A1111's masked content: " + content,
                "",
                "run = dict(" + ", ".join([*keywords, f"guidance_scale={guidance!r}",
                                           f'generator=torch.Generator("cpu").manual_seed({seed})']) + ")",
                f"image = inpaint(pipe, run, Image.open({_py(path)}), Image.open({_py(mask_file)}), steps={steps}, "
                f"width={width}, height={height}, strength={strength!r}, mask_blur={mask_blur}, only_masked_padding={padding}, "
                f"masked_content={content!r}, inpaint_not_masked={invert})"]) + "\n"
        blur = f".filter(ImageFilter.GaussianBlur({mask_blur}))" if mask_blur > 0 else ""
        opened = f"ImageOps.invert(Image.open({_py(mask_file)}).convert(\"L\"))" if invert else \
            f"Image.open({_py(mask_file)}).convert(\"L\")"
        return "\n".join(lines + [
            "from PIL import Image, ImageFilter" + (", ImageOps" if invert else ""),
            f"init = Image.open({_py(path)}).convert(\"RGB\").resize(({width}, {height}), Image.Resampling.LANCZOS)",
            f"mask = {opened}.resize(({width}, {height}), Image.Resampling.LANCZOS){blur}"
            + ("  # (Inpaint not masked)" if invert else ""),
            *_img2img_lines(sdxl, "inpaint"),
            "made = inpaint(" + ", ".join([*args, "image=init", "mask_image=mask", f"strength={strength!r}",
                                          f"num_inference_steps={steps}", f"guidance_scale={guidance!r}", f"width={width}",
                                          f"height={height}", *([f"padding_mask_crop={padding}"] if padding is not None else []),
                                          f'generator=torch.Generator("cpu").manual_seed({seed})']) + ").images[0]",
            "image = made  # (padding_mask_crop pastes it back itself: A1111's \"Only masked\")" if padding is not None else
            "# A1111's overlay: the blurred mask doubled; outside the mask, the start's own pixels\n"
            "image = Image.composite(made, init, mask.point(lambda v: min(255, 2 * v)))"]) + "\n"
    if init_image:
        path, strength = init_image
        return "\n".join(lines + [
            "from PIL import Image",
            f"init = Image.open({_py(path)}).convert(\"RGB\").resize(({width}, {height}), Image.Resampling.LANCZOS)",
            *_img2img_lines(sdxl),
            "image = img2img(" + ", ".join([*args, "image=init", f"strength={strength!r}", f"num_inference_steps={steps}",
                                           f"guidance_scale={guidance!r}",
                                           f'generator=torch.Generator("cpu").manual_seed({seed})']) + ").images[0]"]) + "\n"
    args = args + [f"num_inference_steps={steps}", f"guidance_scale={guidance!r}", f"height={height}", f"width={width}"]
    noise = [f'generator = torch.Generator("cpu").manual_seed({seed})']
    if variation:  # (A1111's variation seed: the starting noise, which the pipeline takes as its latents)
        noise = ["from lora_diffusion.generate import variation_noise", *noise,
                 f"latents = variation_noise(pipe, generator, {width}, {height}, subseed={variation[0]}, "
                 f"strength={variation[1]!r}).to(pipe.device, pipe.unet.dtype)"]
        args.append("latents=latents")
    if not hires:
        lines += [*noise, "image = pipe(" + ", ".join([*args, "generator=generator"]) + ").images[0]"]
        return "\n".join(lines) + "\n"
    second_guidance = guidance if hires_guidance is None else hires_guidance
    return "\n".join(lines + noise + _hires_lines(args, second, second_guidance, width, height, hires, sdxl,
                                                  second_scheduler is not None)) + "\n"


def _diffusers_blend(lora_paths: dict[str, str], loras: dict[str, tuple[float, float]], blocks: dict | None,
                     fused: bool, sdxl: bool) -> list[str]:
    """The snippet's blend in stock diffusers (``load_lora_weights``, ``set_adapters``, ``fuse_lora``)."""
    lines: list[str] = []
    active = {n: wt for n, wt in loras.items()}
    adapter_names: dict[str, str] = {}
    for name in active:  # PEFT's adapter names can't hold '.': detail_v1.5 -> detail_v1_5 (kept distinct)
        adapter = name.replace(".", "_")
        while adapter in adapter_names.values():
            adapter += "_"
        adapter_names[name] = adapter
        lines.append(f"pipe.load_lora_weights({_py(lora_paths[name])}, adapter_name={_py(adapter)})")
    if active:
        weights = []
        for w, t in active.values():
            if blocks is None and t == w:
                weights.append(w)
            else:
                unet = w if blocks is None else {k: w * v for k, v in blocks.items()}
                weights.append({"unet": unet, "text_encoder": t, **({"text_encoder_2": t} if sdxl else {})})
        lines.append(f"pipe.set_adapters({list(adapter_names.values())!r}, adapter_weights={weights!r})")
        if fused:
            lines.append("pipe.fuse_lora()")
    return lines


def _lora_diffusion_blend(lora_paths: dict[str, str], loras: dict[str, tuple[float, float]], blocks: dict | None,
                          tag_blocks: dict[str, tuple[float, ...]], fused: bool) -> list[str]:
    """The snippet's blend with ``lora_diffusion`` (block weight vectors, which diffusers' ``set_adapters`` lacks)."""
    lines = ["from lora_diffusion import fuse, load_lora, set_adapters", ""]
    lines += [f"load_lora(pipe, {_py(lora_paths[name])}, adapter={_py(name)})" for name in loras]
    specs = {n: list(tag_blocks[n]) if n in tag_blocks else blocks for n in loras}
    lines.append(f"set_adapters(pipe, {({n: w for n, (w, _) in loras.items()})!r}, "
                 f"text_encoder={({n: t for n, (_, t) in loras.items()})!r}, blocks={specs!r})")
    if fused:
        lines.append("fuse(pipe)")
    return lines


def _hires_lines(args: list[str], second: list[str], guidance: float, width: int, height: int,
                 hires: tuple[float, int, str, float, tuple[int, int] | None], sdxl: bool, own_scheduler: bool = False) -> list[str]:
    """The snippet's Hires. fix: the first pass, upscaled as ``lora_diffusion.generate.hires_fix`` upscales it, then
    diffusers' img2img pipeline on the same modules (``own_scheduler``: with the snippet's ``hires_scheduler``), one
    generator (made before) through both passes."""
    scale, hires_steps, upscaler, strength, resize = hires
    big = hires_size(width, height, scale, resize)
    mode = HIRES_UPSCALERS[upscaler]
    latent = not mode.startswith(("lanczos", "pil-"))
    lines = ["first = pipe(" + ", ".join([*args, "generator=generator", f"output_type={_py('latent' if latent else 'pil')}"])
             + ").images",
             f"# Hires. fix ({upscaler}, {'resize to {}x{}'.format(*resize) if resize else _fmt(scale) + 'x'}): upscaled to "
             f"{big[0]}x{big[1]}, then denoised again"]
    if latent:
        name, _, antialias = mode.partition("-")
        extra = f", antialias={bool(antialias)}" if name in ("bilinear", "bicubic") else ""
        lines += ["import torch.nn.functional as F",
                  f"start = F.interpolate(first, size=({big[1]} // pipe.vae_scale_factor, {big[0]} // pipe.vae_scale_factor), "
                  f"mode={_py(name)}{extra})"]
    else:
        resample = "LANCZOS" if mode == "lanczos" else "NEAREST"
        lines += ["from PIL import Image", f"start = first[0].resize(({big[0]}, {big[1]}), Image.Resampling.{resample})"]
    if resize and all(resize):  # A1111's Hires resize: the upscale covers it, its middle kept (cut in latents)
        lines.append(f"cut = (({big[0]} - {resize[0]}) // pipe.vae_scale_factor, ({big[1]} - {resize[1]}) // pipe.vae_scale_factor)")
        lines.append("start = start[..., cut[1] // 2 : start.shape[2] - (cut[1] + 1) // 2, cut[0] // 2 : start.shape[3] - (cut[0] + 1) // 2]"
                     if latent else
                     f"start = start.crop((cut[0] // 2 * pipe.vae_scale_factor, cut[1] // 2 * pipe.vae_scale_factor, {big[0]} - "
                     f"(cut[0] + 1) // 2 * pipe.vae_scale_factor, {big[1]} - (cut[1] + 1) // 2 * pipe.vae_scale_factor))")
    return lines + _img2img_lines(sdxl) + (["img2img.scheduler = hires_scheduler"] if own_scheduler else []) + [
        "image = img2img(" + ", ".join([*second, "image=start", f"strength={strength!r}", f"num_inference_steps={hires_steps}",
                                       f"guidance_scale={guidance!r}", "generator=generator"]) + ").images[0]"]


def _img2img_lines(sdxl: bool, kind: str = "img2img") -> list[str]:
    """The snippet's img2img (or ``"inpaint"``) pipeline on ``pipe``'s modules (LoRAs and scheduler included)."""
    cls = f"StableDiffusion{'XL' if sdxl else ''}{'Img2Img' if kind == 'img2img' else 'Inpaint'}Pipeline"
    extra = ", force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt" if sdxl else ", requires_safety_checker=False"
    return [f"from diffusers import {cls}",
            f"{kind} = {cls}(**pipe.components{extra})  # (not from_pipe: it casts the modules to float32)"]


def load_pipeline(model: str | None, device: str | None = None, model_config: str | None = None):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` from a diffusers folder, a hub id or a
    single-file checkpoint (``model_config``: a diffusers folder or hub id for its configs); ``None``:
    ``tiny_pipeline(0)``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        from lora_diffusion.testing import tiny_pipeline

        pipe = tiny_pipeline(0)
    elif Path(model).expanduser().is_file():
        from lora_diffusion.pipeline import load_single_file
        from lora_diffusion.tools import dtype_kwargs

        try:
            pipe = load_single_file(model, config=model_config, **dtype_kwargs(torch.float16 if device.startswith("cuda") else None))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UIError(f"cannot load model {model!r} as a single-file checkpoint: {e}") from None
    else:
        from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        from lora_diffusion.tools import dtype_kwargs

        kwargs = dtype_kwargs(torch.float16 if device.startswith("cuda") else None)
        try:
            pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as e:
            raise UIError(f"cannot load model {model!r}: {e}") from None
        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise UIError(f"model {model!r} is a {type(pipe).__name__}; the UI generates with Stable Diffusion "
                          f"1.x/2.x and SDXL text-to-image models")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_info(path: str | os.PathLike) -> tuple[dict, str]:
    """The Generate tab's settings from an image's A1111 infotext (A1111's "PNG Info", a Civitai image), and a note of
    what the tab cannot take: ``({prompt, negative_prompt, seed, steps, guidance, width, height, clip_skip, sampler,
    schedule_type, emphasis, hires_scale, hires_steps, hires_upscaler, denoising_strength, hires_cfg_scale,
    hires_sampler, hires_schedule_type (``None``: "Use same"), hires_prompt, hires_negative_prompt, hires_resize
    (``(w, h)``; ``None``: by the upscale), noise_schedule,
    inpaint}, note)``, where
    ``inpaint`` is an inpainting's ``{mask_blur, inpaint_only_masked, masked_padding, masked_content,
    inpaint_not_masked}`` (A1111's defaults where it names none) or ``None``, ``subseed`` and ``subseed_strength``
    (A1111's variation seed; 0 where it has none) and ``plot`` an X/Y/Z grid's ``{x_type,
    x_values, y_type, y_values, z_type, z_values}`` (``None``: not a grid); the prompt keeps its ``<lora:...>`` tags,
    which pick the library's LoRAs."""
    try:
        text = png_infotext(path)
        got = infotext_settings(text, Path(path).name)
    except ValueError as e:
        raise UIError(str(e)) from None
    notes = []
    if unread := unread_settings(text):
        notes.append(f"its {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not made again here")
    sampler, schedule = split_sampler(got.get("sampler", ""), got.get("schedule_type", "Automatic"))
    if sampler and sampler not in SAMPLERS:
        notes.append(f"its sampler {sampler!r} is not one of the UI's: the model's own is set")
        sampler = None
    hires_sampler, hires_schedule = got.get("hires_sampler"), got.get("hires_schedule_type")  # (None: "Use same")
    if hires_sampler:
        hires_sampler, named = split_sampler(hires_sampler, hires_schedule or "Automatic")  # ("DPM++ 2M Karras")
        hires_schedule = hires_schedule or (named if named != "Automatic" else None)
        if hires_sampler not in SAMPLERS:
            notes.append(f"its hires sampler {hires_sampler!r} is not one of the UI's: Use same is set")
            hires_sampler = None
    if hires_schedule and hires_schedule not in SCHEDULE_TYPES:
        notes.append(f"its hires schedule type {hires_schedule!r} is not one of the UI's: Use same is set")
        hires_schedule = None
    hires_scale, upscaler = got.get("hires_scale", 1.0), got.get("hires_upscaler", "Latent")
    if hires_scale <= 1 and "denoising_strength" in got and "hires_resize" not in got:
        notes.append("it was inpainted: put the image it started from and its mask under img2img to make it again "
                     "(its inpainting settings are set)"
                     if "mask_blur" in got else
                     "it was made by img2img: put the image it started from under img2img to make it again")
    if (hires_scale > 1 or "hires_resize" in got) and upscaler not in HIRES_UPSCALERS:
        notes.append(f"its hires upscaler {upscaler!r} is not one of the UI's: Latent is set")
        upscaler = "Latent"
    if hires_scale > 4:
        notes.append(f"its hires upscale {_fmt(hires_scale)} is past the slider's 4")
        hires_scale = 4.0
    steps, hires_steps = got.get("steps", 20), got.get("hires_steps", 0)
    if not 1 <= steps <= 100:
        notes.append(f"its {steps} steps are outside the slider's 1-100")
        steps = min(max(steps, 1), 100)
    if not 0 <= hires_steps <= 100:
        notes.append(f"its {hires_steps} hires steps are outside the slider's 0-100")
        hires_steps = min(max(hires_steps, 0), 100)
    fields = {"prompt": got["prompt"], "negative_prompt": got["negative_prompt"], "seed": got.get("seed", 0),
              "steps": steps, "guidance": got.get("cfg_scale", 7.0), "width": got.get("width", 0),
              "height": got.get("height", 0), "clip_skip": got.get("clip_skip", 1), "sampler": sampler or None,
              "schedule_type": schedule if schedule else "Automatic", "emphasis": got.get("emphasis") != "None",
              "hires_scale": max(hires_scale, 1.0), "hires_steps": hires_steps, "hires_upscaler": upscaler,
              "denoising_strength": got.get("denoising_strength", 0.7), "hires_cfg_scale": got.get("hires_cfg_scale", 0.0),
              "noise_schedule": got.get("noise_schedule", "Default"), "hires_sampler": hires_sampler,
              "hires_schedule_type": hires_schedule, "hires_prompt": got.get("hires_prompt", ""),
              "hires_negative_prompt": got.get("hires_negative_prompt", ""), "hires_resize": got.get("hires_resize"),
              "inpaint": None, "plot": None,
              "subseed": got.get("subseed", 0), "subseed_strength": got.get("subseed_strength", 0.0)}
    if "seed_resize_from" in got:
        notes.append("its Resize seed from is not in the tab: `lora-diffusion generate --from-png` makes it")
    if any(f"{a}_axis" in got for a in "xyz"):
        fields["plot"] = {}
        for a in "xyz":
            kind, _, values = (part.strip() for part in got.get(f"{a}_axis", "").partition(":"))
            if kind and kind not in PLOT_AXES:
                notes.append(f"its X/Y/Z plot's {a.upper()} type {kind!r} is not one of the UI's: that axis is left out")
                kind, values = "", ""
            fields["plot"].update({f"{a}_type": kind or None, f"{a}_values": values})
    if "mask_blur" in got:
        fields["inpaint"] = {"mask_blur": min(max(got["mask_blur"], 0), MAX_MASK_BLUR),
                             "inpaint_only_masked": got.get("inpaint_only_masked", False),
                             "masked_padding": min(max(got.get("masked_padding", 32), 0), MAX_MASKED_PADDING),
                             "masked_content": got.get("masked_content", "original"),
                             "inpaint_not_masked": got.get("inpaint_not_masked", False)}
    if got.get("emphasis") == "No norm":
        notes.append("its emphasis mode is No norm; this tab weighs as A1111's Original (`lora-diffusion generate "
                     "--emphasis 'No norm'` does the other)")
    return fields, "; ".join(notes)


# ---------------------------------------------------------------------------------------------- training data
def caption_rows(paths: Sequence[str | os.PathLike]) -> list[list[str]]:
    """``[[file name, caption]]`` for a caption table; captions from a ``<stem>.txt`` beside the image, if any."""
    rows = []
    for p in paths:
        p = Path(p)
        txt = p.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        rows.append([p.name, caption])
    return rows


def prepare_dataset(items: Sequence[tuple[str | os.PathLike, str]], out_dir: str | os.PathLike) -> tuple[int, list[str]]:
    """Copy readable images (re-encoded as PNG) with ``<stem>.txt`` captions and a ``metadata.jsonl`` to ``out_dir``.

    Returns ``(images written, ["<file>: <why it was skipped>", ...])``; raises ``UIError`` if none is readable.

    Example:
        >>> n, skipped = prepare_dataset([("a.png", "a red circle"), ("broken.jpg", "")], "job/data")
        >>> n, skipped
        (1, ['broken.jpg: cannot identify image file'])
    """
    from PIL import Image, UnidentifiedImageError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    meta_lines = []
    for i, (src, caption) in enumerate(items):
        src = Path(src)
        try:
            with Image.open(src) as im:
                im.load()
                rgb = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e).replace(str(src), "").strip(" '") or type(e).__name__
            skipped.append(f"{src.name}: {reason}")
            continue
        stem = f"{i:04d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", src.stem)[:40]
        rgb.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(caption or "", encoding="utf-8")
        meta_lines.append(json.dumps({"file_name": f"{stem}.png", "text": caption or ""}))
    if not meta_lines:
        raise UIError(f"none of the {len(items)} images could be read: " + "; ".join(skipped[:5]))
    (out / "metadata.jsonl").write_text("\n".join(meta_lines) + "\n", encoding="utf-8")
    return len(meta_lines), skipped


# ---------------------------------------------------------------------------------------------- training queue
@dataclass
class TrainRequest:
    """A training job from the Train tab. ``images`` are ``(path, caption)`` pairs."""

    name: str
    images: list[tuple[str, str]]
    mode: str = "style"
    token: str = ""
    rank: int = 4
    max_train_steps: int = 100
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = False
    use_dora: bool = False
    resolution: int | None = None
    validation_prompt: str = ""
    seed: int = 0
    format: str = "diffusers"  # the library file's: "kohya" loads in A1111 and ComfyUI too
    extra: dict = field(default_factory=dict)  # any other TrainConfig fields, e.g. {"num_validation_images": 2}
    # "additional parameters", as kohya_ss's GUI has them: ``lora-diffusion train`` / kohya flags, over the above
    extra_args: str = ""
    # a library LoRA to continue training (``--init_lora``): the run trains its modules at its rank, alpha and DoRA,
    # starting from its factors (``rank``, ``train_text_encoder`` and ``use_dora`` are then the LoRA's)
    continue_from: str | None = None


# the settings the Train tab makes itself: not taken from its additional parameters
_UI_OWNED = ("pretrained_model_name_or_path", "single_file_config", "train_data_dir", "dataset_config", "output_dir", "resume_from_checkpoint",
             "overwrite", "init_lora")


def _extra_settings(text: str) -> dict:
    """The Train tab's "additional parameters" (``lora-diffusion train`` and kohya flags) as ``TrainConfig`` values;
    ``UIError`` naming what cannot be read, or a setting the tab makes itself."""
    if not (text or "").strip():
        return {}
    from lora_diffusion.training.config import ConfigError, settings_from_flags

    try:
        flags = shlex.split(text)
    except ValueError as e:  # (an unclosed quote)
        raise UIError(f"additional parameters: {e}") from None
    try:
        given = settings_from_flags(flags, "additional parameters")
    except ConfigError as e:  # (its message names the source)
        raise UIError(str(e)) from None
    owned = [f"--{k}" for k in _UI_OWNED if k in given]
    if owned:
        raise UIError(f"additional parameters: {', '.join(owned)} the Train tab sets itself (the model, the images, the "
                      "output, the LoRA continued)")
    return given


@dataclass
class TrainJob:
    """One queued, running or finished training job; the UI polls it."""

    id: int
    name: str
    config: Any
    output_dir: Path
    format: str = "diffusers"  # the library file's (TrainRequest.format)
    status: str = "queued"  # queued | running | done | cancelled | failed
    step: int = 0
    max_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (the validation loss: ``validation_split``)
    lr: float | None = None
    eta_s: float | None = None
    samples: list[str] = field(default_factory=list)
    skipped_images: list[str] = field(default_factory=list)
    message: str = ""
    result: LoraInfo | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.done_event.is_set()

    def update(self, report: dict) -> bool:
        """Take one progress report from ``train``; returns False once cancelled (which stops training)."""
        self.step = int(report.get("step", self.step))
        self.max_steps = int(report.get("max_steps", self.max_steps))
        if report.get("loss") is not None:
            self.losses.append((self.step, float(report["loss"])))
        if report.get("val_loss") is not None:
            self.val_losses.append((self.step, float(report["val_loss"])))
        self.lr = report.get("lr", self.lr)
        self.eta_s = report.get("eta_s", self.eta_s)
        for p in report.get("sample_paths") or []:
            if str(p) not in self.samples:
                self.samples.append(str(p))
        return not self.cancel_event.is_set()


class TrainQueue:
    """Runs jobs one at a time on a worker thread, in submission order; reports each waiting job's position."""

    def __init__(self, runner: Callable[[TrainJob], None]) -> None:
        self._runner = runner
        self._cond = threading.Condition()
        self._waiting: collections.deque[TrainJob] = collections.deque()
        self._running: TrainJob | None = None
        self._thread: threading.Thread | None = None
        self.jobs: dict[int, TrainJob] = {}

    def submit(self, job: TrainJob) -> TrainJob:
        with self._cond:
            self.jobs[job.id] = job
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="lora-train-queue", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def position(self, job: TrainJob) -> int:
        """0 while running (or finished), n for the n-th job waiting."""
        with self._cond:
            return self._waiting.index(job) + 1 if job in self._waiting else 0

    def active_names(self) -> set[str]:
        with self._cond:
            return {j.name for j in self._waiting} | ({self._running.name} if self._running else set())

    def cancel(self, job: TrainJob) -> bool:
        """Stop a running job after its current step (its last checkpoint is kept), or drop a waiting one.

        Returns True if the job was waiting (it will never run)."""
        job.cancel_event.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.status, job.message = "cancelled", "cancelled before it started"
                job.done_event.set()
                return True
        return False

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                job = self._running = self._waiting.popleft()
            try:
                job.status = "running"
                self._runner(job)
            except Exception as e:  # noqa: BLE001 - a failed job must not stop the queue
                logger.exception("training job %s failed", job.id)
                job.status, job.message = "failed", f"{type(e).__name__}: {e}"
            finally:
                with self._cond:
                    self._running = None
                job.done_event.set()


def job_status(job: TrainJob, position: int) -> str:
    """One line for the UI: queue position, step / ETA / loss, or the outcome."""
    if job.status == "queued":
        return f"queued: position {position} (one training job runs at a time)"
    if job.status == "running":
        loss = f", loss {job.losses[-1][1]:.4f}" if job.losses else ""
        loss += f", validation loss {job.val_losses[-1][1]:.4f}" if job.val_losses else ""
        eta = f", ETA {job.eta_s:.0f} s" if job.eta_s is not None else ""
        return f"running: step {job.step}/{job.max_steps}{eta}{loss}"
    return f"{job.status}: {job.message}"


# ---------------------------------------------------------------------------------------------- the backend
class Backend:
    """Pipeline, LoRA library and training queue behind the UI.

    Args:
        model: a local diffusers folder or hub id; ``None`` for the bundled tiny model (``lora_diffusion.data.
            TINY_MODEL``), or ``tiny_pipeline(0)`` built in code where that is not installed; or a pipeline object.
        lora_dir: the LoRA library folder.
        data_root: the folder training images may be picked from (``None``: uploads only).
        max_upload_mb: larger uploads are refused.
        train_fn: the training function (default ``lora_diffusion.training.train``, imported when first needed).
    """

    def __init__(
        self,
        model: Any = None,
        lora_dir: str | os.PathLike = "loras",
        data_root: str | os.PathLike | None = None,
        *,
        max_upload_mb: float = 512,
        device: str | None = None,
        train_fn: Callable | None = None,
        model_config: str | os.PathLike | None = None,
        fp8_weight: bool = False,
    ) -> None:
        if model is None:
            model = default_model()
        self.fp8_weight = fp8_weight  # A1111's FP8 weight: the UNet's weights stored in fp8 (``fp8.store_fp8``)
        self._fp8_stored = False
        self.model_config = str(model_config) if model_config else None  # a single-file model's configs
        self._pipe = None if model is None or isinstance(model, (str, os.PathLike)) else model
        self.model = str(model) if isinstance(model, (str, os.PathLike)) else None
        self.library = LoraLibrary(lora_dir, max_upload_mb=max_upload_mb)
        self.library_label = str(lora_dir)
        self.data_root = Path(data_root).resolve() if data_root else None
        self.device = device
        self._train_fn = train_fn
        self._load_lock = threading.Lock()
        self.generate_lock = threading.Lock()  # held across set-blend + denoise: no cross-talk between users
        self._loaded: dict[str, tuple[int, int]] = {}  # adapter name -> (mtime_ns, size) of the file it came from
        self._own_scheduler = None  # the model's scheduler, which a request without a sampler gets back
        self._hashes: dict = {}  # (name, mtime_ns, size) -> a LoRA file's A1111 hash; "model" -> the model file's
        self._ids = itertools.count(1)
        self._model_dir: str | None = None
        self._out_dir: Path | None = None
        self.queue = TrainQueue(self._run_training)
        self._names_lock = threading.Lock()
        self._writing: set[str] = set()  # library names an upload, merge or training start is writing right now

    @property
    def model_label(self) -> str:
        return self.model or TINY_FALLBACK

    @property
    def pipe(self):
        """The pipeline, loaded on first use."""
        with self._load_lock:
            if self._pipe is None:
                logger.info("loading model %s", self.model_label)
                self._pipe = load_pipeline(self.model, self.device, self.model_config)
            if self.fp8_weight and not self._fp8_stored:
                from lora_diffusion.fp8 import store_fp8

                store_fp8([("unet", self._pipe.unet)], self._pipe.unet.dtype)
                self._fp8_stored = True
            return self._pipe

    # ------------------------------------------------------------------ library
    def upload(self, path: str | os.PathLike, name: str | None = None) -> LoraInfo:
        """Add an uploaded file to the library (safetensors only, size-limited, must be a readable LoRA)."""
        src = Path(path)
        if src.suffix.lower() != SUFFIX:
            return self.library.add_file(src, name or None)  # refuses it, with the library's message
        target = check_name(name) if name else sanitize_name(src.name[: -len(SUFFIX)])
        with self._claim(target):
            return self.library.add_file(src, target)

    def _name_taken(self, name: str, *, own_job: TrainJob | None = None) -> str | None:
        """Why ``name`` cannot be given to a new library file (``None``: it is free). Call with ``_names_lock``."""
        if name in self.queue.active_names() and not (own_job is not None and name == own_job.name):
            return f"a training job is making a LoRA named {name!r}; choose another name (or cancel that job)"
        if name in self._writing:
            return f"a LoRA named {name!r} is being written right now; choose another name"
        if self.library.exists(name):
            return f"a LoRA named {name!r} already exists; delete it first or choose another name"
        return None

    @contextlib.contextmanager
    def _claim(self, name: str):
        """Hold ``name`` while a new library file is made under it: refused (``UIError``) if a LoRA, a queued or
        running training job or another write holds it, so that no two of them can end up wanting one file."""
        with self._names_lock:
            taken = self._name_taken(name)
            if taken:
                raise UIError(taken)
            self._writing.add(name)
        try:
            yield name
        finally:
            with self._names_lock:
                self._writing.discard(name)

    def _claim_free_name(self, job: TrainJob) -> str:
        """The job's own name, or (if something took it meanwhile) the first free ``<name>-2``, ``<name>-3``, ...;
        held in ``_writing`` until the caller discards it."""
        with self._names_lock:
            for i in itertools.count(1):
                suffix = "" if i == 1 else f"-{i}"
                candidate = job.name[: 64 - len(suffix)] + suffix
                if self._name_taken(candidate, own_job=job) is None:
                    self._writing.add(candidate)
                    return candidate
        raise AssertionError("unreachable")

    def delete(self, name: str) -> None:
        """Delete a LoRA from the library and unload it from the pipeline."""
        name = check_name(name)
        with self.generate_lock:
            self.library.delete(name)
            self._unload(name)

    def _unload(self, name: str) -> None:
        if name in self._loaded and self._pipe is not None:
            delete_adapter(self._pipe, name)
        self._loaded.pop(name, None)

    def _sync(self, names: Sequence[str]) -> None:
        """Load (or reload, if the file changed) the named LoRAs into the pipeline. Call with the lock held."""
        pipe = self.pipe
        for name in names:
            path = self.library.path_for(name)
            if not path.is_file():
                self._unload(name)
                raise UIError(f"no LoRA named {name!r} in the library")
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if self._loaded.get(name) == key:
                continue
            self._unload(name)
            try:
                load_lora(pipe, path, adapter=name)
            except LoraFormatError as e:
                raise UIError(f"cannot use LoRA {name!r}: {str(e).replace(str(path) + ': ', '')}") from None
            self._loaded[name] = key

    # ------------------------------------------------------------------ generate
    def resolve_blend(self, req: GenerateRequest) -> tuple[str, dict[str, tuple[float, float]], dict[str, tuple[float, ...]]]:
        """The prompt without tags, the effective ``{name: (unet, te)}`` blend (tags override the sliders) and the
        tags' block weight vectors."""
        clean, tags, tag_blocks = parse_lora_tags(req.prompt)
        loras = {check_name(n): (w, w if t is None else t) for n, (w, t) in req.loras.items()}
        loras.update(tags)
        return clean, {n: (finite_number(w, f"the weight of {n}"), finite_number(t, f"the text-encoder weight of {n}"))
                       for n, (w, t) in loras.items()}, tag_blocks

    def generate(self, req: GenerateRequest) -> GenerateResult:
        """Generate one image with the requested blend; the blend is set and used under one lock."""
        if req.block_preset not in BLOCK_PRESETS:
            raise UIError(f"unknown block preset {req.block_preset!r}; choose from {list(BLOCK_PRESETS)}")
        blocks = BLOCK_PRESETS[req.block_preset]
        prompt, loras, tag_blocks = self.resolve_blend(req)
        negative, neg_tags, _ = parse_lora_tags(req.negative_prompt or "")
        if neg_tags:
            raise UIError("put <lora:...> tags in the prompt, not the negative prompt")
        steps = int(req.steps)
        if not 1 <= steps <= 200:
            raise UIError(f"steps must be between 1 and 200, got {steps}")
        finite_number(req.guidance, "guidance")
        _seed(req.seed)
        variation = self._variation(req)
        clip_skip = int(finite_number(req.clip_skip, "CLIP skip"))
        hires = self._check_hires(req)
        hires_guidance = finite_number(req.hires_cfg_scale, "the hires CFG scale") or float(req.guidance)  # (0: the first pass's)
        hires_prompt, hires_negative = self._hires_prompts(req, prompt, negative) if hires else (prompt, negative)
        init = self._init_image(req)
        mask = self._mask_image(req, init)
        padding = int(req.masked_padding) if mask is not None and req.inpaint_only_masked else None
        if init is not None and hires:
            raise UIError("Hires. fix is for text-to-image: set Upscale by to 1, or clear the init image")
        if init is not None and variation:
            raise UIError("a variation seed is for text-to-image: set Variation strength to 0, or clear the init image")
        with self.generate_lock:
            pipe = self.pipe
            scale = getattr(pipe, "vae_scale_factor", 8)
            own = (init.width // 8 * 8, init.height // 8 * 8) if init is not None else \
                (pipe.unet.config.sample_size * scale,) * 2
            width, height = int(req.width or own[0]), int(req.height or own[1])
            if width % 8 or height % 8 or not (8 <= width <= 2048 and 8 <= height <= 2048):
                raise UIError(f"width and height must be multiples of 8 between 8 and 2048, got {width}x{height}")
            if hires and max(hires_size(width, height, hires[0], hires[4])) > 2048:
                raise UIError(f"Hires. fix: {width}x{height} upscaled " + (
                    "to cover {}x{}".format(*hires[4]) if hires[4] else f"{_fmt(hires[0])}x") +
                    " is {}x{}, past 2048".format(*hires_size(width, height, hires[0], hires[4])))
            sdxl = getattr(pipe, "text_encoder_2", None) is not None
            try:
                check_clip_skip(pipe, clip_skip, "CLIP skip")
            except ValueError as e:
                raise UIError(str(e)) from None
            self._sync(list(loras))
            scheduler, second = self._set_scheduler(pipe, req.sampler, req.schedule_type, req.noise_schedule,
                                                    (req.hires_sampler, req.hires_schedule_type) if hires else (None, None))
            second_scheduler, hires_sampler, hires_schedule, hires_scheduler_changes = second or (None,) * 4
            fused = bool(req.fuse and loras)
            fusing = False
            try:
                apply_blend(pipe, loras, blocks, tag_blocks)
                if fused:
                    fusing = True
                    fuse(pipe)
            except (KeyError, ValueError) as e:
                unfuse(pipe)  # (a refused fuse fuses nothing; a refused blend on a fused pipeline: generate unfused)
                raise UIError(_blend_error(e, fusing)) from None
            try:
                generator = torch.Generator("cpu").manual_seed(int(req.seed))
                try:  # (A1111's syntax refused, as A1111 refuses it: "(red:.)", a weight that is not a number)
                    a1111_prompt = bool(req.emphasis) and not all(_plain(pipe, t, steps) for t in {prompt, negative, hires_prompt,
                                                                                                  hires_negative})
                    texts = scheduled_prompt_kwargs(pipe, prompt, negative or None, steps, clip_skip=clip_skip) \
                        if a1111_prompt else prompt_kwargs(pipe, [prompt], clip_skip, [negative] if negative else None)
                except ValueError as e:
                    raise UIError(str(e)) from None
                run = dict(texts, guidance_scale=float(req.guidance), generator=generator)
                if variation:
                    run["latents"] = variation_noise(pipe, generator, width, height, *variation).to(pipe.unet.device,
                                                                                                 pipe.unet.dtype)
                if mask is not None:
                    image = inpaint(pipe, run, init, mask, steps=steps, width=width, height=height, strength=_strength(req),
                                    mask_blur=int(req.mask_blur), only_masked_padding=padding,
                                    masked_content=req.masked_content, inpaint_not_masked=bool(req.inpaint_not_masked))
                elif init is not None:
                    image = image_to_image(pipe, run, init, steps=steps, width=width, height=height,
                                           strength=_strength(req))
                elif hires:
                    scale, hires_steps, upscaler, strength, _ = hires
                    # (the second pass schedules prompt editing on from the first, as A1111)
                    second = scheduled_prompt_kwargs(pipe, hires_prompt, hires_negative or None, hires_steps,
                                                     clip_skip=clip_skip, base_steps=steps) if a1111_prompt else \
                        texts if (hires_prompt, hires_negative) == (prompt, negative) else \
                        prompt_kwargs(pipe, [hires_prompt], clip_skip, [hires_negative] if hires_negative else None)
                    image = hires_fix(pipe, run, dict(second, guidance_scale=hires_guidance, generator=generator),
                                      steps=steps, width=width, height=height, scale=scale, hires_steps=hires_steps,
                                      upscaler=upscaler, strength=strength, scheduler=second_scheduler, resize=hires[4])
                else:
                    image = pipe(**run, num_inference_steps=steps, height=height, width=width).images[0]
            finally:
                if fused:
                    unfuse(pipe)
            params = a1111_params(  # (under the lock: the scheduler it names is this request's)
                pipe, steps=steps, cfg_scale=float(req.guidance), seed=int(req.seed), width=width, height=height,
                model_name=Path(self.model).stem if self.model else None, model_sha256=self._model_sha256(),
                clip_skip=clip_skip, emphasis=bool(req.emphasis) or not any(c in prompt + negative for c in "(["),
                padded=a1111_prompt and conds_padded(pipe, prompt, negative, steps),
                lora_hashes={n: self._lora_hash(n) for n in loras}, noise_schedule=req.noise_schedule)
        if variation:
            params = variation_params(params, *variation)
        if hires:
            params = second_pass_params(params, hires[3], hires[0], int(req.hires_steps), hires[2],
                                        hires_cfg_scale=hires_guidance, hires_resize=hires[4])
            params = hires_pass_params(params, prompt, negative, hires_prompt, hires_negative, hires_sampler, hires_schedule)
        elif init is not None:
            params = second_pass_params(params, _strength(req), mask_blur=int(req.mask_blur) if mask is not None else None,
                                        only_masked_padding=padding, masked_content=req.masked_content,
                                        inpaint_not_masked=bool(req.inpaint_not_masked))
        init_copy = self._keep_input(init) if init is not None else None
        mask_copy = self._keep_input(mask) if mask is not None else None
        settings = {"seed": int(req.seed), "steps": steps, "guidance": float(req.guidance), "width": width,
                    "height": height, "block_preset": req.block_preset, "fused": fused, "clip_skip": clip_skip,
                    "sampler": req.sampler, "schedule_type": req.schedule_type, "emphasis": bool(req.emphasis),
                    "noise_schedule": req.noise_schedule,
                    "hires": {**dict(zip(("scale", "steps", "upscaler", "denoising_strength", "resize"), hires)),
                              "cfg_scale": hires_guidance, "sampler": hires_sampler, "schedule_type": hires_schedule,
                              "prompt": hires_prompt, "negative_prompt": hires_negative} if hires else None,
                    "init_image": init_copy, "denoising_strength": _strength(req) if init is not None or hires else None,
                    "mask_image": mask_copy, "mask_blur": int(req.mask_blur) if mask is not None else None,
                    "masked_padding": padding, "masked_content": req.masked_content if mask is not None else None,
                    "inpaint_not_masked": bool(req.inpaint_not_masked) if mask is not None else None,
                    "subseed": variation[0] if variation else None, "subseed_strength": variation[1] if variation else None}
        caption = f"{blend_label(loras, tag_blocks)} | seed {req.seed}, {steps} steps, cfg {_fmt(float(req.guidance))}, {width}x{height}"
        if blocks is not None:
            caption += f", blocks: {req.block_preset}"
        if fused:
            caption += ", fused"
        if variation:
            caption += f", variation seed {variation[0]} ({_fmt(variation[1])})"
        if clip_skip > 1:
            caption += f", clip skip {clip_skip}"
        if req.sampler:
            caption += f", {req.sampler}" + ("" if (req.schedule_type or "Automatic") == "Automatic" else f" {req.schedule_type}")
        if req.noise_schedule != "Default":
            caption += f", {req.noise_schedule}"
        if self.fp8_weight:
            caption += ", fp8 weight"
        if init is not None:
            caption += f", {'inpaint' if mask is not None else 'img2img'}, denoise {_fmt(_strength(req))}"
            if mask is not None:
                caption += f", mask blur {int(req.mask_blur)}" + (f", only masked (padding {padding})" if padding is not None else "")
                if req.inpaint_not_masked:
                    caption += ", inpaint not masked"
                if req.masked_content != "original":
                    caption += f", masked content {req.masked_content}"
        if hires:
            caption += ", hires {}x{} ({} {}, {} steps, denoise {}{})".format(
                *(hires[4] if hires[4] and all(hires[4]) else hires_size(width, height, hires[0], hires[4])), hires[2],
                "to {}x{}".format(*hires[4]) if hires[4] else f"{_fmt(hires[0])}x", hires[1], _fmt(hires[3]),
                f", cfg {_fmt(hires_guidance)}" if "Hires CFG Scale" in params else "")
            if hires_sampler:
                caption += f", hires sampler {hires_sampler} {hires_schedule}"
            if (hires_prompt, hires_negative) != (prompt, negative):
                caption += ", hires prompt"
        snippet = diffusers_snippet(
            self.model, {n: str(self.library.path_for(n)) for n in loras}, loras, prompt=prompt,
            negative_prompt=negative, blocks=blocks, fused=fused, seed=int(req.seed), steps=steps,
            guidance=float(req.guidance), width=width, height=height, sdxl=sdxl, model_config=self.model_config,
            clip_skip=clip_skip, scheduler=scheduler, a1111_prompt=a1111_prompt, hires=hires,
            init_image=(init_copy, _strength(req)) if init_copy else None, tag_blocks=tag_blocks,
            mask=(mask_copy, int(req.mask_blur), padding, req.masked_content, bool(req.inpaint_not_masked)) if mask_copy else None,
            variation=variation, hires_guidance=hires_guidance if hires else None,
            noise_schedule=req.noise_schedule, fp8_weight=self.fp8_weight,
            hires_prompts=(hires_prompt, hires_negative) if hires else None, second_scheduler=hires_scheduler_changes,
        )
        tagged = " ".join([prompt] + [lora_tag(n, w, te, tag_blocks.get(n)) for n, (w, te) in loras.items()]).strip()
        return GenerateResult(image, prompt, loras, caption, snippet, settings, infotext(tagged, negative, params))

    def xy_plot(self, req: GenerateRequest, x: str | None, y: str | None,
                z: str | None = None) -> tuple[GenerateResult, list[GenerateResult]]:
        """A1111's X/Y/Z plot of a request (``lora_diffusion.xyplot``): one ``generate`` per cell, row by row and
        grid after grid, each with its infotext and snippet, and the labelled grid (with ``z``, the X/Y grids side
        by side under the Z labels) as a result of its own (A1111's grid infotext: the first cell's with the axes).
        Every axis is checked before the first image."""
        try:
            cells, x_labels, y_labels, z_labels = plot_cells(req.prompt, req.negative_prompt, x, y, z)
        except ValueError as e:
            raise UIError(f"X/Y plot: {e}") from None
        for axis in filter(None, (x, y, z)):
            if axis.partition(":")[0].strip() not in PLOT_AXES:
                raise UIError(f"X/Y plot: the tab plots {', '.join(PLOT_AXES)} (the command line's --x-axis also "
                              "'Checkpoint name: ...', a model per value)")
        if len(cells) > MAX_PLOT_CELLS:
            raise UIError(f"X/Y plot: {len(cells)} images; at most {MAX_PLOT_CELLS} at a time")
        results = [self.generate(dataclasses.replace(req, prompt=cell.prompt, negative_prompt=cell.negative_prompt,
                                                     **{_PLOT_FIELDS[k]: v for k, v in cell.settings.items()}))
                   for cell in cells]
        first = results[0]
        caption = ("X/Y/Z plot, " if z else "X/Y plot, ") + " by ".join(f"{len(labels)} {axis.partition(':')[0].strip()}" for axis, labels
                                             in ((x, x_labels), (y, y_labels), (z, z_labels)) if axis)
        image = draw_z_grid(z_grids([r.image for r in results], x_labels, y_labels, z_labels), z_labels)
        text = grid_infotext(first.infotext, (x, y, z), cells, (len(x_labels), len(y_labels)))
        grid = GenerateResult(image, first.prompt, first.loras, caption, first.snippet, first.settings, text)
        return grid, results

    @staticmethod
    def _variation(req: GenerateRequest) -> tuple[int, float] | None:
        """``(variation seed, strength)`` of a request; ``None``: a strength of 0 (off)."""
        strength = finite_number(req.subseed_strength, "the variation strength")
        if not 0 <= strength <= 1:
            raise UIError(f"the variation strength must be between 0 and 1, got {_fmt(strength)}")
        return (_seed(req.subseed), strength) if strength > 0 else None

    @staticmethod
    def _hires_prompts(req: GenerateRequest, prompt: str, negative: str) -> tuple[str, str]:
        """A Hires. fix's prompt and negative prompt (A1111's Hires prompt: "" is the first pass's ``prompt`` /
        ``negative``); LoRA tags in the hires prompt must be the prompt's, which weigh both passes."""
        hires_prompt, hires_tags, hires_blocks = parse_lora_tags(req.hires_prompt or "")
        hires_negative, negative_tags, _ = parse_lora_tags(req.hires_negative_prompt or "")
        if negative_tags:
            raise UIError("put <lora:...> tags in the prompt, not the hires negative prompt")
        _, tags, blocks = parse_lora_tags(req.prompt)
        if hires_tags and (hires_tags, hires_blocks) != (tags, blocks):
            raise UIError(HIRES_TAGS_REFUSED)
        return hires_prompt or prompt, hires_negative or negative

    @staticmethod
    def _check_hires(req: GenerateRequest) -> tuple[float, int, str, float, tuple[int, int] | None] | None:
        """``(scale, second-pass steps, upscaler, denoising strength, resize)`` of a request's Hires. fix (``resize``:
        A1111's Hires resize ``(w, h)``, in place of the scale; ``None``: by the scale); ``None``: off."""
        scale = finite_number(req.hires_scale, "the hires upscale")
        resize = tuple(int(finite_number(v or 0, "the hires resize")) for v in (req.hires_resize or (0, 0)))
        if len(resize) != 2 or not all(0 <= v <= 2048 for v in resize):
            raise UIError(f"hires resize must be a width and a height from 0 (by the other) to 2048, got {resize}")
        resize = resize if any(resize) else None
        if scale <= 1 and resize is None:
            return None
        if not 1 <= scale <= 4:
            raise UIError(f"hires upscale must be between 1 (off) and 4, got {_fmt(scale)}")
        if req.hires_upscaler not in HIRES_UPSCALERS:
            raise UIError(f"unknown hires upscaler {req.hires_upscaler!r}; choose from {', '.join(HIRES_UPSCALERS)}")
        hires_steps = int(finite_number(req.hires_steps, "hires steps"))
        if not 0 <= hires_steps <= 200:
            raise UIError(f"hires steps must be between 0 (as many as steps) and 200, got {hires_steps}")
        try:
            denoising_steps(hires_steps or int(req.steps), _strength(req), "hires steps")
        except ValueError as e:
            raise UIError(str(e)) from None
        return scale, hires_steps or int(req.steps), req.hires_upscaler, _strength(req), resize

    @staticmethod
    def _init_image(req: GenerateRequest):
        """The request's img2img start as a PIL image (``None``: text-to-image); ``UIError`` naming an unreadable
        file. A denoising strength outside (0, 1] is refused here too."""
        if not req.init_image:
            return None
        try:
            denoising_steps(int(req.steps), _strength(req))
        except ValueError as e:
            raise UIError(str(e)) from None
        return flatten_start(Backend._open_image(req.init_image, "init image"))

    @staticmethod
    def _open_image(path: str, what: str):
        """An uploaded image (its mode kept); ``UIError`` naming ``what`` and the file where it cannot be read."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return im.copy()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UIError(f"{what} {Path(path).name}: cannot read it as an image ({e})") from None

    @staticmethod
    def _mask_image(req: GenerateRequest, init):
        """The request's inpainting mask as a PIL image (``None``: none); ``UIError`` for a mask without an init image,
        an unreadable file, a blur outside 0-64 px."""
        if not req.mask_image:
            return None
        if init is None:
            raise UIError("an inpainting mask needs the image it masks: put one under init image")
        blur = finite_number(req.mask_blur, "the mask blur")
        if blur != int(blur) or not 0 <= blur <= MAX_MASK_BLUR:
            raise UIError(f"the mask blur must be a whole number of px between 0 and {MAX_MASK_BLUR}, got {_fmt(blur)}")
        padding = finite_number(req.masked_padding, "the masked area padding")
        if padding != int(padding) or not 0 <= padding <= MAX_MASKED_PADDING:
            raise UIError(f"the masked area padding must be a whole number of px between 0 and {MAX_MASKED_PADDING}, "
                          f"got {_fmt(padding)}")
        if req.masked_content not in MASKED_CONTENT:
            raise UIError(f"unknown masked content {req.masked_content!r}; choose from {', '.join(MASKED_CONTENT)}")
        return mask_levels(Backend._open_image(req.mask_image, "inpaint mask"))

    def _keep_input(self, image) -> str:
        """A PNG of an img2img start or mask as it was read (``flatten_start``, ``mask_levels``) in this backend's
        folder (named by its content: one copy per image), which the snippet opens: gradio's upload may be cleaned
        away."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        with self._load_lock:
            folder = self._images_dir() / "inputs"
            folder.mkdir(exist_ok=True)
            copy = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
            if not copy.is_file():
                copy.write_bytes(data)
        return str(copy)

    def _images_dir(self) -> Path:
        """This backend's output folder, made on first use (call under ``_load_lock``)."""
        if self._out_dir is None:
            self._out_dir = Path(tempfile.mkdtemp(prefix="lora_ui_images_"))
        return self._out_dir

    def _set_scheduler(self, pipe, sampler: str | None, schedule_type: str, noise_schedule: str = "Default",
                       hires: tuple[str | None, str | None] = (None, None)) -> tuple[tuple[str, dict] | None, tuple | None]:
        """The model's own scheduler, or (``sampler``) an A1111 sampler on its config, on A1111's ``noise_schedule``
        (``zero_terminal_snr``); returns the scheduler class and the settings that differ from the model's own, for
        the snippet (``None``: the model's own), and, for a Hires. fix's ``(sampler, schedule type)`` (A1111's Hires
        sampler; ``None``: "Use same"), ``(scheduler, sampler, schedule type, (class, settings that differ from the
        first pass's))`` (``lora_diffusion.generate.hires_scheduler``; ``None``: the first pass's scheduler)."""
        if self._own_scheduler is None:
            self._own_scheduler = pipe.scheduler
        pipe.scheduler = self._own_scheduler
        changes = None
        if sampler:
            try:
                set_sampler(pipe, sampler, schedule_type or "Automatic")
            except ValueError as e:
                raise UIError(str(e)) from None
            changes = _config_changes(pipe.scheduler, self._own_scheduler)
        try:  # (the next request starts from the model's own)
            second, hires_sampler, hires_schedule = hires_scheduler(pipe.scheduler, *hires)
            if second is not None:  # (the snippet's from the first pass's, before the noise schedule)
                second = (with_noise_schedule(second, noise_schedule), hires_sampler, hires_schedule,
                          _config_changes(second, pipe.scheduler))
            pipe.scheduler = with_noise_schedule(pipe.scheduler, noise_schedule)
        except ValueError as e:
            raise UIError(str(e)) from None
        return changes, second

    def _lora_hash(self, name: str) -> str:
        """A library LoRA's A1111 hash, kept while its file is unchanged."""
        path = self.library.path_for(name)
        st = path.stat()
        key = (name, st.st_mtime_ns, st.st_size)
        if key not in self._hashes:
            self._hashes[key] = lora_hash(path)
        return self._hashes[key]

    def _model_sha256(self) -> str | None:
        """A single-file model's SHA-256 (A1111's "Model hash"), computed once."""
        if self.model and Path(self.model).is_file() and "model" not in self._hashes:
            self._hashes["model"] = model_hash(self.model)
        return self._hashes.get("model")

    def save_image(self, result: GenerateResult) -> str:
        """Write the image to this backend's output folder as a new PNG carrying its caption and snippet."""
        from PIL.PngImagePlugin import PngInfo

        with self._load_lock:
            path = self._images_dir() / f"{next(self._ids):05d}-seed{result.settings['seed']}.png"
            # a long-running server keeps the newest KEEP_IMAGES, not every image (this one included)
            for old in sorted(self._out_dir.glob("*.png"), key=lambda p: int(p.name.split("-")[0]))[: 1 - KEEP_IMAGES]:
                old.unlink(missing_ok=True)
        info = PngInfo()
        info.add_text("parameters", result.infotext)
        info.add_text("lora_diffusion_snippet", result.snippet)
        result.image.save(path, pnginfo=info)
        return str(path)

    # ------------------------------------------------------------------ merge
    def merge(
        self,
        weights: dict[str, float],
        out_name: str,
        *,
        mode: str = "concat",
        rank: int | None = None,
        format: str = "diffusers",
        blocks: dict[str, str] | None = None,
    ) -> tuple[LoraInfo, str]:
        """Merge library LoRAs into a new library file; returns its info and a report (SVD error included).
        ``blocks``: per LoRA, a LoRA Block Weight preset or vector (text, as in a tag; blank: every block at 1)."""
        out_name = check_name(out_name)
        out = self.library.path_for(out_name)
        if out.exists():
            raise UIError(f"a LoRA named {out_name!r} already exists; choose another output name")
        with self._claim(out_name):
            return self._merge(weights, out_name, out, mode=mode, rank=rank, format=format, blocks=blocks or {})

    def _merge(self, weights: dict[str, float], out_name: str, out: Path, *, mode: str, rank: int | None,
               format: str, blocks: dict[str, str]) -> tuple[LoraInfo, str]:
        parsed = {check_name(n): finite_number(w, f"the weight of {n}") for n, w in weights.items()}  # NaN made a NaN file
        chosen = {n: w for n, w in parsed.items() if w != 0.0}
        if not chosen:
            raise UIError("choose at least one LoRA with a non-zero weight")
        if mode not in ("concat", "svd"):
            raise UIError(f"mode must be 'concat' or 'svd', got {mode!r}")
        if mode == "svd" and not rank:
            raise UIError("SVD merging needs a rank")
        inputs = []
        for n, w in chosen.items():
            if not self.library.exists(n):
                raise UIError(f"no LoRA named {n!r} in the library")
            try:
                spec = lbw_blocks(blocks[n]) if (blocks.get(n) or "").strip() else None
            except ValueError as e:
                raise UIError(f"the blocks of {n}: {e}") from None
            inputs.append((str(self.library.path_for(n)), w, spec))
        try:
            report = merge_loras(inputs, str(out), mode=mode, rank=int(rank) if mode == "svd" else None, format=format)
        except (LoraFormatError, ValueError) as e:
            raise UIError(f"merge failed: {e}") from None
        return self.library.info(out_name), format_report(report)

    # ------------------------------------------------------------------ train
    def data_folders(self) -> list[str]:
        """Folders under ``data_root`` (relative paths, ``.`` for the root) that contain images."""
        if self.data_root is None or not self.data_root.is_dir():
            return []
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.data_root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if any(f.lower().endswith(IMAGE_SUFFIXES) for f in filenames):
                found.add(os.path.relpath(dirpath, self.data_root))
        return sorted(found)

    def folder_images(self, relative: str) -> list[Path]:
        """Image files in a folder under ``data_root`` (refusing paths that leave it)."""
        if self.data_root is None:
            raise UIError("no --data-root was given; upload the images instead")
        folder = safe_child(self.data_root, relative) if relative not in ("", ".") else self.data_root
        if not folder.is_dir():
            raise UIError(f"{relative!r} is not a folder under the data root")
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def model_path(self) -> str:
        """A folder or hub id the training function can load the base model from."""
        if self.model is not None:
            return self.model
        with self._load_lock:
            if self._model_dir is None:
                from lora_diffusion.testing import tiny_pipeline

                folder = Path(tempfile.mkdtemp(prefix="lora_ui_model_"))
                tiny_pipeline(0).save_pretrained(folder)
                self._model_dir = str(folder)
            return self._model_dir

    def start_training(self, req: TrainRequest) -> TrainJob:
        """Check the request, write the dataset (skipping unreadable images) and queue the job."""
        name = check_name(req.name)
        with self._claim(name):  # held until the job is queued: two starts under one name cannot both pass
            return self._start_training(req, name)

    def _start_training(self, req: TrainRequest, name: str) -> TrainJob:
        if req.mode not in ("style", "subject"):
            raise UIError(f"mode must be 'style' or 'subject', got {req.mode!r}")
        if req.mode == "subject" and not req.token.strip():
            raise UIError("subject mode needs a trigger word")
        if not req.images:
            raise UIError("add some training images first")
        if not 1 <= int(req.max_train_steps) <= 100_000 or not 1 <= int(req.rank) <= 1024:
            raise UIError("steps must be 1-100000 and rank 1-1024")
        if req.format not in WRITERS:
            raise UIError(f"the LoRA format must be one of {', '.join(sorted(WRITERS))}, got {req.format!r}")
        if req.resolution is not None and not 8 <= int(req.resolution) <= MAX_TRAIN_RESOLUTION:
            raise UIError(f"the training resolution must be 8-{MAX_TRAIN_RESOLUTION}, got {req.resolution}")
        _seed(req.seed)
        try:
            from lora_diffusion.training import TrainConfig
        except ImportError as e:
            raise UIError(f"training is not available in this installation ({e})") from None
        flagged = _extra_settings(req.extra_args)
        job_id = next(self._ids)
        job_dir = self.library.root / ".train" / f"{time.strftime('%Y%m%d-%H%M%S')}-{job_id}-{name}"
        try:  # every setting is checked before the images are copied: a refused request writes nothing
            values = {
                "pretrained_model_name_or_path": self.model_path(),
                **({"single_file_config": self.model_config} if self.model_config and Path(self.model_path()).is_file() else {}),
                "train_data_dir": str(job_dir / "data"),
                "output_dir": str(job_dir / "out"),
                "mode": req.mode,
                "token": req.token.strip(),
                "rank": int(req.rank),
                "max_train_steps": int(req.max_train_steps),
                "learning_rate": float(req.learning_rate),
                "text_encoder_lr": float(req.text_encoder_lr),
                "train_text_encoder": bool(req.train_text_encoder),
                "use_dora": bool(req.use_dora),
                "resolution": int(req.resolution or self._default_resolution()),
                "validation_prompt": req.validation_prompt.strip(),
                "validation_steps": max(1, int(req.max_train_steps) // 4),  # a few samples while it runs
                "seed": int(req.seed),
                **req.extra,
                **flagged,
                **(self._continue_settings(req.continue_from) if req.continue_from else {}),
            }
            if dataclasses.is_dataclass(TrainConfig):
                known = {f.name for f in dataclasses.fields(TrainConfig)}
                dropped = sorted(set(values) - known)
                if dropped:
                    logger.warning("TrainConfig has no fields %s; not passed", dropped)
                values = {k: v for k, v in values.items() if k in known}
            config = TrainConfig(**values)
            if hasattr(config, "validate"):
                config.validate()
        except (TypeError, ValueError) as e:
            raise UIError(f"training settings: {e}") from None
        try:
            count, skipped = prepare_dataset(req.images, job_dir / "data")
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)  # no copies of the user's images are left behind
            raise
        job = TrainJob(id=job_id, name=name, config=config, output_dir=job_dir / "out", format=req.format,
                       skipped_images=skipped)
        job.max_steps = int(req.max_train_steps)
        logger.info("queued training job %d (%s) on %d images", job_id, name, count)
        return self.queue.submit(job)

    def _continue_settings(self, name: str) -> dict:
        """The training settings that continue library LoRA ``name``: its file as ``init_lora``, its modules as the
        targets (regexes of their paths), each at its own rank and alpha (``dim_from_weights``), its DoRA.
        ``UIError`` for a LoRA a run cannot continue."""
        from lora_diffusion.training import ConfigError, read_init_lora

        path = self.library.path_for(name)
        if not path.is_file():
            raise UIError(f"no LoRA named {name!r} in the library to continue")
        try:
            lora = read_init_lora(str(path))  # (what the run itself checks: readable, LoRA factors only)
        except ConfigError as e:
            raise UIError(f"cannot continue {name!r}: {e}") from None
        if len({w.magnitude is not None for w in lora.values()}) != 1:
            raise UIError(f"cannot continue {name!r}: some of its modules are DoRA and some are not; a run trains one kind")
        # each module at its own rank and alpha (--dim_from_weights); the form shows the most common ones
        (rank, alpha), _ = collections.Counter((w.rank, float(w.alpha)) for w in lora.values()).most_common(1)[0]
        dora = next(iter(lora.values())).magnitude is not None
        paths = {"unet": [], "text": []}
        for key in lora:
            component, _, module = key.partition(".")
            paths["unet" if component == "unet" else "text"].append(module.removeprefix("text_model."))
        if not paths["unet"]:
            raise UIError(f"cannot continue {name!r}: it has no UNet modules")

        def pattern(modules: list[str]) -> str:
            return "|".join(re.escape(m) for m in sorted(set(modules)))

        settings = {"init_lora": str(path), "dim_from_weights": True, "rank": rank, "lora_alpha": alpha, "use_dora": dora,
                    "target_modules": pattern(paths["unet"]), "train_text_encoder": bool(paths["text"])}
        if paths["text"]:  # (transformers' flattened CLIPTextModel names its modules without text_model.)
            settings["text_encoder_target_modules"] = f"(?:text_model\\.)?(?:{pattern(paths['text'])})"
        return settings

    def _default_resolution(self) -> int:
        """The base model's native image size (sample size x VAE scale), read without loading the model."""
        if self._pipe is not None:
            return int(self._pipe.unet.config.sample_size * getattr(self._pipe, "vae_scale_factor", 8))
        if self.model is None:
            return 64
        if Path(self.model).is_file():  # a single-file checkpoint: SDXL's 1024, else SD 1.x's 512
            from lora_diffusion.pipeline import is_sdxl_checkpoint

            return 1024 if is_sdxl_checkpoint(Path(self.model)) else 512
        try:
            unet = json.loads((Path(self.model) / "unet" / "config.json").read_text())
            vae = json.loads((Path(self.model) / "vae" / "config.json").read_text())
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return 512

    def cancel_training(self, job: TrainJob) -> None:
        """Stop a running job after its current step, or drop a waiting one (and its copies of the images)."""
        if self.queue.cancel(job):
            shutil.rmtree(job.output_dir.parent, ignore_errors=True)

    def _run_training(self, job: TrainJob) -> None:
        try:
            self._train_and_add(job)
        finally:  # whatever the outcome, the job's copies of the images go; its output (checkpoints) stays
            shutil.rmtree(job.output_dir.parent / "data", ignore_errors=True)
            with contextlib.suppress(OSError):
                job.output_dir.parent.rmdir()  # only if nothing else is left in the job folder

    def _train_and_add(self, job: TrainJob) -> None:
        train = self._train_fn
        if train is None:
            from lora_diffusion.training import train
        error: Exception | None = None
        result = None
        try:
            result = train(job.config, progress=job.update)
        except Exception as e:  # noqa: BLE001 - reported in the UI; a checkpoint may still be usable
            logger.exception("training job %s raised", job.id)
            error = e
        cancelled = job.cancel_event.is_set() or getattr(result, "status", None) == "cancelled"
        for p in getattr(result, "sample_paths", None) or []:
            if str(p) not in job.samples:
                job.samples.append(str(p))
        if error is not None and not cancelled:
            job.status, job.message = "failed", f"{type(error).__name__}: {error}"
            return
        if getattr(result, "status", None) not in (None, "completed", "cancelled"):
            job.status, job.message = "failed", str(getattr(result, "message", "") or result.status)
            return
        weights = _trained_weights(job.output_dir, result)
        if weights is None:
            job.status = "cancelled" if cancelled else "failed"
            job.message = "no checkpoint was written" + (" before the job was cancelled" if cancelled else "")
            return
        sample = next((p for p in reversed(job.samples) if Path(p).is_file()), None)
        job.step = int(getattr(result, "global_step", job.step) or job.step)
        name = self._claim_free_name(job)  # the job's name, unless a LoRA got it meanwhile (never lose the result)
        try:
            if job.format != "diffusers":  # named as the library names it: A1111's alias (ss_output_name) is the name
                weights = convert_lora(weights, job.output_dir / f"{name}.safetensors", to=job.format, overwrite=True)
            job.result = self.library.add_file(weights, name, sample=sample, check_size=False)
            if job.format == "kohya":  # A1111's card of it (a library folder may be A1111's LoRA folder)
                from lora_diffusion.training.outputs import write_a1111_card

                write_a1111_card(self.library.path_for(name).with_suffix(".json"), trigger=getattr(job.config, "token", ""),
                                 architecture=job.result.metadata.get("architecture"),
                                 description=f"trained in the lora_diffusion UI, {job.step} steps")
        except (UIError, OSError, ValueError) as e:
            job.status, job.message = "failed", f"could not add the LoRA to the library ({e}); it is in {weights}"
            return
        finally:
            with self._names_lock:
                self._writing.discard(name)
        job.status = "cancelled" if cancelled else "done"
        where = f"cancelled at step {job.step}; its last checkpoint" if cancelled else f"trained {job.step} steps;"
        job.message = f"{where} added to the library as {name!r}"
        if name != job.name:
            job.message += f" ({job.name!r} was taken meanwhile)"
        if job.skipped_images:
            job.message += f" (skipped {len(job.skipped_images)} unreadable images)"


LORA_FILE = "pytorch_lora_weights.safetensors"


def _trained_weights(output_dir: Path, result: Any) -> Path | None:
    """The LoRA a run left: its final file, else the newest checkpoint's (what a cancelled run keeps)."""
    candidates = [getattr(result, "lora_path", None), output_dir / LORA_FILE]
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint:
        candidates.append(Path(checkpoint) / LORA_FILE)
    found = sorted(output_dir.glob(f"**/checkpoint-*/{LORA_FILE}"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    candidates += found[::-1]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def format_report(report: Any) -> str:
    """A ``MergeReport`` as a few lines: mode, ranks, the SVD error overall and its worst layers."""
    lines = [f"mode: {report.mode}", f"rank: {', '.join(map(str, report.ranks))}"]
    if report.mode == "svd":
        lines.append(f"error: {report.error:.4g} (relative Frobenius norm of the change, all layers)")
        worst = sorted(report.errors.items(), key=lambda kv: -kv[1])[:3]
        lines += [f"  {key}: {err:.4g}" for key, err in worst]
    else:
        lines.append("error: 0 (concatenation is exact)")
    return "\n".join(lines)

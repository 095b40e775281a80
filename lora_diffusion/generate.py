"""Text to image as A1111 makes it: ``<lora:name:w>`` tags, prompt emphasis and long prompts, samplers by A1111's names,
and A1111's ``parameters`` text in each PNG (the infotext that A1111's "PNG Info", Civitai and ComfyUI read, with the
model's and the LoRAs' hashes), which ``lora-diffusion generate --from-png`` reads back to make the image again.

The samplers are diffusers' schedulers under the names A1111 gives the same methods (diffusers' own table); the
images are diffusers' (its noise and step code), not A1111's pixel for pixel.

Example:
    >>> images = txt2img(pipe, "a (red:1.2) fox <lora:style:0.8>", lora_dir="loras", sampler="DPM++ 2M", seed=7)
    >>> images[0].image.save("fox.png", pnginfo=images[0].pnginfo())
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .blend import _tag_path, apply_prompt_loras, finite_number, parse_prompt
from .pipeline import fuse, load_embedding, load_vae, unfuse
from .prompts import EMPHASIS_MODES, emphasis_mode, prompt_chunks, prompt_schedule, scheduled_prompt_kwargs

__all__ = ["SAMPLERS", "SCHEDULE_TYPES", "set_sampler", "txt2img", "Generated", "infotext", "parse_infotext",
           "png_infotext", "infotext_settings", "a1111_params", "conds_padded", "lora_tag", "lora_hash", "model_hash",
           "HIRES_UPSCALERS", "hires_fix", "hires_pass_params", "hires_scheduler", "hires_size", "image_to_image", "inpaint", "inpaint_mask", "fill_masked", "unread_settings", "flatten_start", "mask_levels",
           "overlay_mask", "MASKED_CONTENT", "variation_noise", "variation_params", "slerp", "second_pass_params", "MAX_MASK_BLUR", "MAX_MASKED_PADDING",
           "NOISE_SCHEDULES", "zero_terminal_snr", "with_noise_schedule"]

# A1111 sampler -> (diffusers scheduler, its settings, the schedule type A1111's "Automatic" takes for it)
SAMPLERS: dict[str, tuple[str, dict, str]] = {
    "Euler": ("EulerDiscreteScheduler", {}, "Automatic"),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, "Automatic"),
    "Heun": ("HeunDiscreteScheduler", {}, "Automatic"),
    "DPM2": ("KDPM2DiscreteScheduler", {}, "Karras"),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "Karras"),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "Karras"),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                     "Exponential"),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}, "Karras"),  # (needs torchsde)
    "LMS": ("LMSDiscreteScheduler", {}, "Automatic"),  # (needs scipy)
    "DDIM": ("DDIMScheduler", {}, "Automatic"),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}, "Automatic"),
    "UniPC": ("UniPCMultistepScheduler", {}, "Automatic"),
    "LCM": ("LCMScheduler", {}, "Automatic"),
}
# A1111 schedule type -> the scheduler setting that makes it ("Automatic": the sampler's own; "Normal": the model's
# own timesteps, no Karras or exponential sigmas)
SCHEDULE_TYPES: dict[str, dict] = {
    "Automatic": {},
    "Normal": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
_DEFAULT_SETTINGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False}
# A1111's "Noise schedule for sampling" (infotext "Noise Schedule"), for models trained with zero terminal SNR
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")
_ZTSNR_LAST = 4.8973451890853435e-08  # A1111's last alpha-bar: not 0, so that the k-samplers' last sigma is finite


def zero_terminal_snr(scheduler):
    """A scheduler like ``scheduler`` (same class and settings) on its schedule rescaled to zero terminal SNR as
    A1111's "Noise schedule for sampling: Zero Terminal SNR" rescales it (Lin et al. 2023, Algorithm 1, on
    sqrt(alpha-bar): shifted so that the last timestep's is 0, scaled so that the first's is kept; then the last
    alpha-bar set to 4.9e-8), given to it as ``trained_betas``."""
    accepted = set(inspect.signature(type(scheduler).__init__).parameters)
    if "trained_betas" not in accepted or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{type(scheduler).__name__} takes no noise schedule (trained_betas): use noise schedule "
                         "Default or another sampler")
    root = scheduler.alphas_cumprod.double().sqrt()
    first, last = root[0].item(), root[-1].item()
    alpha_bar = ((root - last) * (first / (first - last))) ** 2
    alpha_bar[-1] = _ZTSNR_LAST
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    config["trained_betas"] = betas.tolist()
    if "rescale_betas_zero_snr" in accepted:
        config["rescale_betas_zero_snr"] = False  # (rescaled here, once)
    return type(scheduler).from_config(config)


def with_noise_schedule(scheduler, noise_schedule: str):
    """``scheduler`` on A1111's ``noise_schedule`` (``NOISE_SCHEDULES``): itself for "Default", else a new one
    (``zero_terminal_snr``); ``ValueError`` names the choices for an unknown one."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {noise_schedule!r}; choose from {', '.join(NOISE_SCHEDULES)}")
    return scheduler if noise_schedule == "Default" else zero_terminal_snr(scheduler)


def set_sampler(pipe, sampler: str, schedule_type: str = "Automatic") -> tuple[str, str]:
    """Give ``pipe`` the scheduler of an A1111 sampler (``"DPM++ 2M"``, ``"Euler a"``; the old names with the
    schedule, ``"DPM++ 2M Karras"``, too) or of a diffusers scheduler class name, on the pipeline's own scheduler
    config (``scheduler_for``); returns the ``(sampler, schedule type)`` the infotext names."""
    pipe.scheduler, sampler, schedule = scheduler_for(pipe.scheduler, sampler, schedule_type)
    return sampler, schedule


def scheduler_for(base, sampler: str, schedule_type: str = "Automatic") -> tuple[object, str, str]:
    """``(scheduler, sampler, schedule type)``: a new scheduler of an A1111 sampler or a diffusers scheduler class
    name (as ``set_sampler`` takes them) on the config of the scheduler ``base``, and the names the infotext gives."""
    sampler, schedule_type = split_sampler(sampler, schedule_type)
    if schedule_type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {schedule_type!r}; choose from {', '.join(SCHEDULE_TYPES)}")
    import diffusers

    if sampler in SAMPLERS:
        class_name, settings, automatic = SAMPLERS[sampler]
    elif sampler.endswith("Scheduler") and hasattr(diffusers, sampler):
        class_name, settings, automatic = sampler, {}, "Automatic"
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)} (or a diffusers scheduler "
                         "class name, e.g. EulerDiscreteScheduler)")
    schedule = automatic if schedule_type == "Automatic" else schedule_type
    cls = getattr(diffusers, class_name)
    if getattr(cls, "_backends", None):  # diffusers' stand-in for a class whose library is missing
        missing = [b for b in cls._backends if importlib.util.find_spec(b) is None] or list(cls._backends)
        raise ValueError(f"sampler {sampler!r} ({class_name}) needs {' and '.join(missing)}: pip install "
                         f"{' '.join(missing)}")
    accepted = set(inspect.signature(cls.__init__).parameters)
    wanted = {**settings, **SCHEDULE_TYPES[schedule]}
    missing = [k for k in SCHEDULE_TYPES[schedule] if k not in accepted]
    if missing:
        raise ValueError(f"sampler {sampler!r} ({class_name}) has no {schedule} schedule in diffusers; use schedule "
                         "type Automatic or another sampler")
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config.update({k: v for k, v in _DEFAULT_SETTINGS.items() if k in accepted})
    config.update({k: v for k, v in wanted.items() if k in accepted})
    return cls.from_config(config), sampler, schedule


def split_sampler(sampler: str, schedule_type: str = "Automatic") -> tuple[str, str]:
    """A1111's legacy sampler names with their schedule: ``"DPM++ 2M Karras"`` is ``("DPM++ 2M", "Karras")``."""
    for schedule in SCHEDULE_TYPES:
        if sampler.endswith(" " + schedule) and sampler[: -len(schedule) - 1] in SAMPLERS:
            return sampler[: -len(schedule) - 1], schedule
    return sampler, schedule_type


def sampler_name(scheduler) -> str:
    """The A1111 name of a diffusers scheduler as it is set, else its class name."""
    config = scheduler.config
    for name, (class_name, settings, _) in SAMPLERS.items():
        if type(scheduler).__name__ == class_name and all(config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__


def schedule_name(scheduler) -> str:
    """The A1111 schedule type of a diffusers scheduler as it is set: ``Normal`` where A1111's ``Automatic`` would
    take another for its sampler (``DPM++ 2M`` without Karras sigmas)."""
    config = scheduler.config
    for name, settings in SCHEDULE_TYPES.items():
        if settings and all(config.get(k) == v for k, v in settings.items()):
            return name
    sampler = SAMPLERS.get(sampler_name(scheduler))
    return "Normal" if sampler and sampler[2] != "Automatic" else "Automatic"


# ---------------------------------------------------------------------------------------------- hashes
def lora_hash(path: str | os.PathLike) -> str:
    """A LoRA file's hash as A1111 and kohya name it (``sshs_model_hash``, "Lora hashes"): the SHA-256 of the
    safetensors data after the header, so that editing the metadata keeps it."""
    return _file_sha256(path, after_header=True)


def model_hash(path: str | os.PathLike) -> str:
    """A checkpoint file's SHA-256, as A1111's "Model hash" gives its first 10 digits."""
    return _file_sha256(path)


def _file_sha256(path: str | os.PathLike, after_header: bool = False) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks; ``after_header``: of a safetensors file's data alone."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- infotext
def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111's ``parameters`` text: the prompt, ``Negative prompt: ...``, and ``Key: value, ...`` (values with a
    comma, colon or newline JSON-quoted); ``None`` values are left out."""
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """``(prompt, negative prompt, {key: value})`` of an A1111 ``parameters`` text, read as A1111 reads it (the
    last line holds the settings when it has at least 3)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key] = value
    return "\n".join(prompt), "\n".join(negative), params


def a1111_params(pipe, *, steps: int, cfg_scale: float, seed: int | None, width: int, height: int,
                 model_name: str | None = None, model_sha256: str | None = None, clip_skip: int = 1,
                 emphasis: bool | str = True, padded: bool = False, lora_hashes: dict[str, str] | None = None,
                 vae_name: str | None = None, vae_sha256: str | None = None, noise_schedule: str = "Default") -> dict:
    """The settings line of A1111's infotext for one image of ``pipe`` (its scheduler's A1111 name), in A1111's order;
    ``lora_hashes``: ``{tag name: full SHA-256}`` (``lora_hash``), written as A1111 writes them (12 digits);
    ``vae_name`` / ``vae_sha256``: a VAE in place of the model's (A1111's SD VAE: its file name, 10 digits);
    ``noise_schedule``: A1111's ``Noise Schedule``, written when not "Default"."""
    hashes = {name.translate(str.maketrans("", "", ":,")): h[:12] for name, h in (lora_hashes or {}).items()}
    return {
        "Steps": steps,
        "Sampler": sampler_name(pipe.scheduler),
        "Schedule type": schedule_name(pipe.scheduler),
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_sha256[:10] if model_sha256 else None,
        "Model": model_name,
        "VAE hash": vae_sha256[:10] if vae_sha256 else None,
        "VAE": vae_name,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Emphasis": None if emphasis_mode(emphasis) == "Original" else emphasis_mode(emphasis),
        "Pad conds": True if padded else None,
        "Lora hashes": ", ".join(f"{k}: {v}" for k, v in hashes.items()) or None,
        "Noise Schedule": None if noise_schedule == "Default" else noise_schedule,
        "Version": f"lora_diffusion {__version__}",
    }


def conds_padded(pipe, prompt: str, negative: str, steps: int, emphasis: bool | str = True) -> bool:
    """Whether a prompt's (prompt-edited) conditionings and its negative's differ in length, so that the shorter
    are padded with empty-prompt chunks (A1111's "Pad conds")."""
    return len({len(prompt_chunks(pipe.tokenizer, t, emphasis=emphasis))
                for text in (prompt, negative) for _, t in prompt_schedule(text, steps)}) > 1


def lora_tag(name: str, unet: float, te: float, blocks: Sequence[float] | None = None) -> str:
    """A1111's tag for a LoRA at these weights: ``<lora:name:w>``, or ``<lora:name:te:unet>``; with a LoRA Block Weight
    vector, the LBW extension's ``lbw=`` after them."""
    def text(x: float) -> str:  # short where that is exact
        return f"{x:g}" if float(f"{x:g}") == x else repr(float(x))

    weights = text(unet) if te == unet else f"{text(te)}:{text(unet)}"
    lbw = "" if blocks is None else ":lbw=" + ",".join(map(text, blocks))
    return f"<lora:{name}:{weights}{lbw}>"


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class Generated:
    """One image and its A1111 infotext."""

    image: object  # PIL.Image.Image
    seed: int
    infotext: str

    def pnginfo(self):
        """The PNG text chunk A1111 writes (``parameters``): ``image.save(path, pnginfo=g.pnginfo())``."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", self.infotext)
        return info


def txt2img(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    *,
    lora_dir: str | os.PathLike | None = None,
    embeddings_dir: str | os.PathLike | None = None,
    steps: int = 20,
    cfg_scale: float = 7.0,
    seed: int = -1,
    width: int | None = None,
    height: int | None = None,
    sampler: str | None = None,
    schedule_type: str = "Automatic",
    clip_skip: int = 1,
    emphasis: bool | str = True,
    batch_count: int = 1,
    fused: bool = False,
    model_name: str | None = None,
    model_sha256: str | None = None,
    vae_name: str | None = None,
    vae_sha256: str | None = None,
    init_image=None,
    mask_image=None,
    mask_blur: int = 4,
    inpaint_only_masked: bool = False,
    masked_padding: int = 32,
    masked_content: str = "original",
    inpaint_not_masked: bool = False,
    denoising_strength: float = 0.75,
    hires_scale: float = 1.0,
    hires_steps: int = 0,
    hires_upscaler: str = "Latent",
    subseed: int = -1,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    hires_resize: tuple[int, int] | None = None,
    hires_sampler: str | None = None,
    hires_schedule_type: str | None = None,
    hires_prompt: str = "",
    hires_negative_prompt: str = "",
    noise_schedule: str = "Default",
    hires_cfg_scale: float | None = None,
) -> list[Generated]:
    """Images of an A1111 prompt: its ``<lora:name:w>`` tags load from ``lora_dir`` and weigh the LoRAs (others are
    switched off), the textual inversions of ``embeddings_dir`` that the prompts name load (``load_embedding``), its
    emphasis, length and prompt editing are kept (``lora_diffusion.prompts.scheduled_prompt_kwargs``), ``sampler`` (an
    A1111 name; ``None``: the pipeline's own scheduler) and the seeds ``seed``, ``seed + 1``, ... (``-1``: a random
    one) as A1111 counts them. Each image comes with its infotext (``model_name`` and ``model_sha256``, and a VAE's
    ``vae_name`` and ``vae_sha256``, go into it).
    ``fused``: the LoRAs are fused for the denoising, and unfused after.

    ``init_image`` (a PIL image, resized to ``width`` x ``height``, by default its own size to a multiple of 8): img2img,
    ``denoising_strength`` of the way back (A1111 runs ``steps * strength`` steps, as diffusers does); with
    ``mask_image`` too, inpainting (``inpaint``: white is repainted, ``mask_blur`` px soften its edge;
    ``inpaint_only_masked`` with ``masked_padding``, ``masked_content`` and ``inpaint_not_masked``: A1111's Inpaint area,
    Masked content and Mask mode). ``hires_scale``
    > 1: A1111's "Hires. fix": the image, upscaled by ``hires_upscaler`` (``HIRES_UPSCALERS``), denoised again for
    ``hires_steps`` (0: ``steps``) at ``denoising_strength`` (``hires_resize`` ``(w, h)``: to that size instead,
    A1111's "Hires resize", ``hires_size``), with ``hires_sampler`` / ``hires_schedule_type``
    (``None``: the first pass's; A1111's "Use same") and ``hires_prompt`` / ``hires_negative_prompt`` ("": the first pass's; LoRA tags, if
    any, the prompt's) and ``hires_cfg_scale`` (Forge's Hires CFG Scale; ``None``: ``cfg_scale``). ``subseed_strength`` > 0: A1111's variation seed, the
    starting noise that far toward ``subseed``'s (``subseed + 1``, ... for the batch; -1: a random one);
    ``seed_resize_from`` ``(width, height)``: A1111's "Resize seed from", the seed's noise at that size, centred
    (``variation_noise``; text-to-image and a Hires. fix's first pass). ``noise_schedule`` "Zero Terminal SNR":
    A1111's noise schedule for models trained with zero terminal SNR (``zero_terminal_snr``), for these images only
    (``pipe.scheduler`` is put back after them)."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {steps}")
    if batch_count < 1:
        raise ValueError(f"batch count must be at least 1, got {batch_count}")
    for label, value in (("CFG scale", cfg_scale), ("hires CFG scale", hires_cfg_scale), ("hires scale", hires_scale)):
        if value is not None:  # (NaN guidance made NaN latents, saved as an image)
            finite_number(value, label)
    _, negative_tags = parse_prompt(negative_prompt)
    if negative_tags:
        raise ValueError("put <lora:...> tags in the prompt, not in the negative prompt")
    if sampler is not None:
        sampler, schedule_type = set_sampler(pipe, sampler, schedule_type)
    own_scheduler = pipe.scheduler  # (put back after the images: the noise schedule is theirs alone)
    scheduler = with_noise_schedule(own_scheduler, noise_schedule)
    hires = (hires_scale > 1 or hires_resize is not None) and init_image is None
    second_scheduler, hires_sampler, hires_schedule_type = hires_scheduler(
        own_scheduler, hires_sampler, hires_schedule_type, noise_schedule) if hires else (None, None, None)
    scale = getattr(pipe, "vae_scale_factor", 8)
    if init_image is not None:
        width, height = width or init_image.width // 8 * 8, height or init_image.height // 8 * 8
    width = int(width or pipe.unet.config.sample_size * scale)
    height = int(height or pipe.unet.config.sample_size * scale)
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")
    if not 0 < denoising_strength <= 1:
        raise ValueError(f"denoising strength must be in (0, 1], got {denoising_strength}")
    if mask_image is not None and init_image is None:
        raise ValueError("an inpainting mask needs the image it masks (init_image / --init-image)")
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise ValueError(f"mask blur must be between 0 and {MAX_MASK_BLUR} px, got {mask_blur}")
    if not 0 <= masked_padding <= MAX_MASKED_PADDING:
        raise ValueError(f"masked area padding must be between 0 and {MAX_MASKED_PADDING} px, got {masked_padding}")
    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"unknown masked content {masked_content!r}; choose from {', '.join(MASKED_CONTENT)}")
    if not 0 <= subseed_strength <= 1:
        raise ValueError(f"variation strength must be between 0 and 1, got {subseed_strength}")
    if seed_resize_from is not None and (len(seed_resize_from) != 2 or min(seed_resize_from) < 8):
        raise ValueError(f"resize seed from must be a width and a height of 8 px or more, got {seed_resize_from}")
    varied = subseed_strength > 0 or seed_resize_from is not None
    if varied and init_image is not None:
        raise ValueError("variation seeds and resize seed from are for text-to-image (and a Hires. fix's first "
                         "pass), not img2img or inpainting")
    subseed = random.randrange(2**32) if subseed == -1 and subseed_strength > 0 else int(subseed)
    padding = masked_padding if inpaint_only_masked and mask_image is not None else None
    if hires_resize is not None and (len(hires_resize) != 2 or min(hires_resize) < 0 or not any(hires_resize)):
        raise ValueError(f"hires resize must be a width and a height (either 0: by the other), got {hires_resize}")
    if hires and hires_upscaler not in HIRES_UPSCALERS:
        raise ValueError(f"unknown hires upscaler {hires_upscaler!r}; choose from {', '.join(HIRES_UPSCALERS)}")
    if hires_steps < 0:
        raise ValueError(f"hires steps must be 0 (as many as steps) or more, got {hires_steps}")
    if init_image is not None or hires:
        denoising_steps(hires_steps or steps if hires else steps, denoising_strength, "hires steps" if hires else "steps")
    seed = random.randrange(2**32) if seed == -1 else int(seed)
    _, tags = parse_prompt(prompt)
    _, hires_tags = parse_prompt(hires_prompt + " " + hires_negative_prompt)
    if hires_tags and hires_tags != tags:
        raise ValueError(HIRES_TAGS_REFUSED)
    paths = {name: _tag_path(name, lora_dir, set()) for name in tags} if lora_dir is not None else {}
    embeddings = _load_named_embeddings(pipe, embeddings_dir, "\n".join((prompt, negative_prompt, hires_prompt,
                                                                          hires_negative_prompt)))
    clean = apply_prompt_loras(pipe, prompt, lora_dir)
    negative = negative_prompt or None  # (SDXL: an empty negative prompt is zeros, as in A1111)
    texts = scheduled_prompt_kwargs(pipe, clean, negative, steps, clip_skip=clip_skip, emphasis=emphasis)
    params = a1111_params(pipe, steps=steps, cfg_scale=cfg_scale, seed=None, width=width, height=height,
                          model_name=model_name, model_sha256=model_sha256, vae_name=vae_name, vae_sha256=vae_sha256,
                          clip_skip=clip_skip,
                          emphasis=emphasis if any(c in prompt + negative_prompt for c in "([") else True,
                          padded=conds_padded(pipe, clean, negative_prompt, steps, emphasis),
                          lora_hashes={name: lora_hash(path) for name, path in paths.items()}, noise_schedule=noise_schedule)
    if sampler:
        params.update({"Sampler": sampler, "Schedule type": schedule_type})
    params = variation_params(params, subseed, subseed_strength, seed_resize_from)
    hires_clean = parse_prompt(hires_prompt)[0] if hires_prompt else clean
    hires_negative = hires_negative_prompt or negative_prompt
    if init_image is not None or hires:
        params = second_pass_params(params, denoising_strength, *((hires_scale, hires_steps, hires_upscaler) if hires else ()),
                                    hires_resize=hires_resize if hires else None,
                                    hires_cfg_scale=hires_cfg_scale,
                                    mask_blur=mask_blur if mask_image is not None else None, only_masked_padding=padding,
                                    masked_content=masked_content, inpaint_not_masked=inpaint_not_masked)
    if hires:
        params = hires_pass_params(params, prompt, negative_prompt, hires_prompt, hires_negative_prompt, hires_sampler,
                                   hires_schedule_type)
    if embeddings:  # A1111's "TI hashes"
        params = _insert_before(params, "Version", {"TI hashes": ", ".join(f"{name}: {model_hash(path)[:12]}"
                                                                          for name, path in embeddings.items())})
    if hires:  # (the second pass schedules prompt editing on from the first, as A1111)
        second = dict(scheduled_prompt_kwargs(pipe, hires_clean, hires_negative or None, hires_steps or steps,
                                              clip_skip=clip_skip, emphasis=emphasis, base_steps=steps),
                      guidance_scale=cfg_scale if hires_cfg_scale is None else hires_cfg_scale)
    if fused and tags:
        fuse(pipe)
    out = []
    try:
        pipe.scheduler = scheduler
        for i in range(batch_count):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            run = dict(texts, guidance_scale=cfg_scale, generator=generator)
            if varied:
                noise = variation_noise(pipe, generator, width, height, subseed + i, subseed_strength, seed_resize_from)
                run["latents"] = noise.to(pipe.unet.device, pipe.unet.dtype)
            if mask_image is not None:
                image = inpaint(pipe, run, init_image, mask_image, steps=steps, width=width, height=height,
                                strength=denoising_strength, mask_blur=mask_blur, only_masked_padding=padding,
                                masked_content=masked_content, inpaint_not_masked=inpaint_not_masked)
            elif init_image is not None:
                image = image_to_image(pipe, run, init_image, steps=steps, width=width, height=height,
                                       strength=denoising_strength)
            elif hires:
                image = hires_fix(pipe, run, dict(second, generator=generator), steps=steps, width=width, height=height,
                                  scale=hires_scale, hires_steps=hires_steps or steps, upscaler=hires_upscaler,
                                  strength=denoising_strength, scheduler=second_scheduler, resize=hires_resize)
            else:
                image = pipe(**run, num_inference_steps=steps, width=width, height=height).images[0]
            own = {"Seed": seed + i, **({"Variation seed": subseed + i} if subseed_strength > 0 else {})}
            out.append(Generated(image, seed + i, infotext(prompt, negative_prompt, {**params, **own})))
    finally:
        pipe.scheduler = own_scheduler
        if fused and tags:
            unfuse(pipe)
    return out


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two noises ``(C, H, W)``, ``t`` of the way from ``low`` to ``high``, taken
    along dim 1 as A1111 takes it (a straight line where they are all but parallel)."""
    low_unit, high_unit = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return torch.lerp(low, high, t)
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low + \
        (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high


def variation_noise(pipe, generator: torch.Generator, width: int, height: int, subseed: int = 0,
                    strength: float = 0.0, resize_from: tuple[int, int] | None = None) -> torch.Tensor:
    """A1111's starting noise ``(1, C, H, W)`` (float32, CPU) of one image of ``pipe`` at ``width`` x ``height``:
    ``generator``'s (seeded with the image's seed) drawn as the pipeline draws it, then ``strength`` of the way
    (``slerp``) toward the noise of ``subseed`` (the variation seed); with ``resize_from`` ``(width, height)``, both
    drawn at that size and laid centred over the seed's full-size noise ("Resize seed from"). ``generator`` is left
    as the pipeline's own draw leaves it, so an ancestral sampler's later noise is the seed's."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    shape = (pipe.unet.config.in_channels, height // scale, width // scale)
    small = shape if resize_from is None else (shape[0], resize_from[1] // scale, resize_from[0] // scale)

    def randn(size, seed=None):
        return torch.randn(size, generator=generator if seed is None else torch.Generator().manual_seed(seed))

    noise = randn(shape) if small == shape else randn(small, generator.initial_seed())
    if strength > 0:
        noise = slerp(strength, noise, randn(small, subseed))
    if small != shape:
        full = randn(shape)
        (top, rows, dy), (left, cols, dx) = (_centred(shape[i], small[i]) for i in (1, 2))
        full[:, top : top + rows, left : left + cols] = noise[:, dy : dy + rows, dx : dx + cols]
        noise = full
    return noise[None]


def _centred(size: int, small: int) -> tuple[int, int, int]:
    """``(offset in the span of ``size``, length, offset in the span of ``small``)`` of the two spans centred on each
    other, either the larger, as A1111 lays them (its margins rounded down)."""
    margin = (size - small) // 2
    return (margin, small, 0) if margin >= 0 else (0, small + 2 * margin, -margin)


# A1111's hires upscalers we have: latent ones (torch's interpolate of the latents; "Latent" is bilinear) and PIL's
HIRES_UPSCALERS = {"Latent": "bilinear", "Latent (antialiased)": "bilinear-antialias", "Latent (bicubic)": "bicubic",
                   "Latent (bicubic antialiased)": "bicubic-antialias", "Latent (nearest)": "nearest",
                   "Latent (nearest-exact)": "nearest-exact", "Lanczos": "lanczos", "Nearest": "pil-nearest"}


def _insert_before(params: dict, key: str, new: dict) -> dict:
    """``params`` with ``new`` put before ``key`` (A1111's order of infotext settings)."""
    out = {}
    for k, v in params.items():
        if k == key:
            out.update(new)
        out[k] = v
    return out if key in params else {**params, **new}


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS


def _img2img(pipe, kind: str = "img2img"):
    """The img2img (or ``"inpaint"``) pipeline on ``pipe``'s own modules (LoRAs, fused weights and scheduler
    included)."""
    import diffusers

    xl = "XL" if getattr(pipe, "text_encoder_2", None) is not None else ""
    cls = getattr(diffusers, f"StableDiffusion{xl}{'Img2Img' if kind == 'img2img' else 'Inpaint'}Pipeline")
    params = inspect.signature(cls.__init__).parameters  # (not from_pipe: it casts the shared modules to float32)
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    kwargs.update({k: pipe.config[k] for k in params if k not in kwargs and k in pipe.config})
    if "requires_safety_checker" in params and kwargs.get("safety_checker") is None:
        kwargs["requires_safety_checker"] = False
    second = cls(**kwargs)
    second.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return second


def denoising_steps(steps: int, strength: float, what: str = "steps") -> int:
    """The steps an img2img pass runs, ``int(steps * strength)`` as diffusers (and A1111) count them; ``ValueError``
    where that is none (the pass would denoise nothing)."""
    run = int(steps * strength)
    if run < 1:
        raise ValueError(f"{steps} {what} at denoising strength {strength:g} run no denoising step (int(steps x "
                         "strength) = 0); raise either")
    return run


def variation_params(params: dict, subseed: int, strength: float, resize_from: tuple[int, int] | None = None) -> dict:
    """``params`` (``a1111_params``) with A1111's ``Variation seed`` and ``Variation seed strength`` (a strength
    above 0) and ``Seed resize from``, where A1111 puts them (before a second pass's settings)."""
    new = {"Variation seed": subseed if strength > 0 else None, "Variation seed strength": strength or None,
           "Seed resize from": "{}x{}".format(*resize_from) if resize_from else None}
    return _insert_before(params, "Clip skip", new) if any(v is not None for v in new.values()) else params


HIRES_TAGS_REFUSED = ("LoRA tags in the hires prompt must be the prompt's (A1111 would switch LoRAs between the passes; "
                      "not done here): leave them out or repeat the prompt's")


def hires_scheduler(first, sampler: str | None, schedule_type: str | None,
                    noise_schedule: str = "Default") -> tuple[object | None, str | None, str | None]:
    """A Hires. fix's second-pass scheduler (A1111's Hires sampler and Hires schedule type; ``None``: "Use same", the
    first pass's scheduler ``first``) on ``noise_schedule``, and the names the infotext gives; ``(None, None, None)``
    where both are the first pass's."""
    if not (sampler or schedule_type):
        return None, None, None
    scheduler, sampler, schedule_type = scheduler_for(first, sampler or sampler_name(first),
                                                      schedule_type or schedule_name(first))
    return with_noise_schedule(scheduler, noise_schedule), sampler, schedule_type


def hires_pass_params(params: dict, prompt: str, negative_prompt: str, hires_prompt: str = "",
                      hires_negative_prompt: str = "", hires_sampler: str | None = None,
                      hires_schedule_type: str | None = None) -> dict:
    """``params`` (with a Hires. fix's, ``second_pass_params``) with A1111's ``Hires sampler``, ``Hires prompt``,
    ``Hires negative prompt`` and ``Hires schedule type``, each where it differs from the first pass's ("": the
    first pass's prompt; ``None``: its sampler, schedule type), where A1111 puts them."""
    anchor = next(key for key in ("Hires CFG Scale", "Hires resize", "Hires upscale") if key in params)
    hires_negative = hires_negative_prompt or negative_prompt
    return _insert_before(params, anchor, {
        "Hires sampler": hires_sampler if hires_sampler and hires_sampler != params["Sampler"] else None,
        "Hires prompt": hires_prompt if hires_prompt and hires_prompt != prompt else None,
        "Hires negative prompt": hires_negative if hires_negative != negative_prompt else None,
        "Hires schedule type": hires_schedule_type if hires_schedule_type and
        hires_schedule_type != params["Schedule type"] else None})


def second_pass_params(params: dict, denoising_strength: float, hires_scale: float | None = None,
                       hires_steps: int = 0, hires_upscaler: str = "Latent", *, mask_blur: int | None = None,
                       only_masked_padding: int | None = None, masked_content: str = "original",
                       inpaint_not_masked: bool = False, hires_resize: tuple[int, int] | None = None,
                       hires_cfg_scale: float | None = None) -> dict:
    """``params`` (``a1111_params``) with an img2img's ``Denoising strength`` (and an inpainting's ``Mask mode: Inpaint
    not masked``, ``Mask blur``, ``Inpaint area: Only masked`` with its ``Masked area padding`` and a ``Masked
    content`` other than original) and, given ``hires_scale``, a Hires. fix's settings, where A1111 puts them
    (``Hires steps`` only when not the first pass's; ``hires_resize``: ``Hires resize`` in place of ``Hires upscale``;
    ``hires_cfg_scale``: Forge's ``Hires CFG Scale``, written where it is not ``params``' ``CFG scale``)."""
    inpainting = {}
    if mask_blur is not None:  # (an inpainting)
        inpainting = {"Mask mode": "Inpaint not masked"} if inpaint_not_masked else {}
        inpainting["Mask blur"] = mask_blur
        if only_masked_padding is not None:
            inpainting.update({"Inpaint area": "Only masked", "Masked area padding": only_masked_padding})
        if masked_content != "original":
            inpainting["Masked content"] = masked_content
    params = _insert_before(params, "Clip skip", {"Denoising strength": denoising_strength, **inpainting})
    if hires_scale is None:
        return params
    size = {"Hires resize": "{}x{}".format(*hires_resize)} if hires_resize else {"Hires upscale": hires_scale}
    own = hires_cfg_scale is not None and float(hires_cfg_scale) != params.get("CFG scale")
    guidance = {"Hires CFG Scale": float(hires_cfg_scale)} if own else {}
    return _insert_before(params, "Lora hashes", {**guidance, **size, "Hires steps": hires_steps or None,
                                                  "Hires upscaler": hires_upscaler})


def _alpha(image):
    """``image`` in RGBA where its mode can be transparent (grey or palette with alpha), else itself."""
    transparent = image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA") if transparent else image


def flatten_start(image):
    """An img2img start as A1111 reads it: in RGB, an image with alpha laid over white (its img2img background)."""
    from PIL import Image

    image = _alpha(image)
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    white.alpha_composite(image)
    return white.convert("RGB")


def mask_levels(mask_image):
    """An inpainting mask as A1111 reads it (L): an image with transparency is its alpha, repainted where more than
    half opaque (strokes drawn on a clear layer), any other its grey levels (white: repaint)."""
    mask_image = _alpha(mask_image)
    if mask_image.mode == "RGBA" and mask_image.getextrema()[-1] != (255, 255):
        return mask_image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask_image.convert("L")


def image_to_image(pipe, run: dict, init_image, *, steps: int, width: int, height: int, strength: float):
    """img2img as A1111's tab makes it: ``init_image`` (PIL) in RGB (``flatten_start``), resized to ``width`` x ``height`` (Lanczos), noised
    ``strength`` of the way back and denoised by the img2img pipeline on ``pipe``'s modules with ``run`` (the prompts
    or embeddings, the guidance and the generator) for ``steps`` (of which it runs ``steps * strength``). Returns the
    PIL image."""
    start = flatten_start(init_image).resize((width, height), _lanczos())
    return _img2img(pipe)(**run, image=start, strength=strength, num_inference_steps=steps).images[0]


MAX_MASK_BLUR, MAX_MASKED_PADDING = 64, 256  # px: the bounds of an inpainting's mask blur and "Only masked" padding
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's "Masked content", in its order


def inpaint_mask(mask_image, width: int, height: int, blur: int = 4, invert: bool = False):
    """A1111's inpainting mask: ``mask_levels`` of ``mask_image`` (white: repaint; ``invert``: A1111's "Inpaint not
    masked", black is repainted), resized to ``width`` x ``height`` (Lanczos) and blurred by ``blur`` px (a Gaussian;
    0: none)."""
    from PIL import ImageFilter, ImageOps

    mask = mask_levels(mask_image)
    mask = (ImageOps.invert(mask) if invert else mask).resize((width, height), _lanczos())
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def fill_masked(image, mask):
    """A1111's "fill" masked content: ``image`` (RGB) where ``mask`` (L; white: repaint, grey: in part) covers it
    painted over with the colours around it, spread in by Gaussian blurs from far (256 px) to near, and the image's
    own pixels on top where the mask leaves them (all of them where it is black)."""
    from PIL import Image, ImageFilter, ImageOps

    kept = Image.new("RGBa", image.size)  # premultiplied: a blur averages the kept pixels' colours only
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, layers in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(layers):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def _start_latents(inpainter, masked_content: str, mask, width: int, height: int, padding: int | None, seed: int) -> None:
    """A1111's "latent noise" / "latent nothing": ``inpainter`` (diffusers' inpaint pipeline) encodes its start with
    the latents under its own latent mask (``mask`` as it binarises, crops and shrinks it) replaced by the noise of
    ``seed`` / by zeros, so the denoising starts from them there; outside, its blend puts the start back."""
    import torch.nn.functional as F

    coords = inpainter.mask_processor.get_crop_region(mask, width, height, pad=padding) if padding is not None else None
    repaint = inpainter.mask_processor.preprocess(mask, height=height, width=width, crops_coords=coords,
                                                  resize_mode="fill" if coords else "default")
    encode = inpainter._encode_vae_image

    def encode_masked(image, generator):
        latents = encode(image=image, generator=generator)
        where = F.interpolate(repaint, size=latents.shape[-2:]).to(latents.device) >= 0.5
        new = torch.zeros_like(latents) if masked_content == "latent nothing" else \
            torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
        return torch.where(where, new, latents)

    inpainter._encode_vae_image = encode_masked


def inpaint(pipe, run: dict, init_image, mask_image, *, steps: int, width: int, height: int, strength: float,
            mask_blur: int = 4, only_masked_padding: int | None = None, masked_content: str = "original",
            inpaint_not_masked: bool = False):
    """Inpainting as A1111's tab makes it on a text-to-image model: ``init_image`` resized as ``image_to_image`` does,
    repainted where ``inpaint_mask`` is white by diffusers' inpaint pipeline on ``pipe``'s modules (on a 4-channel UNet
    it puts the noised original back outside the mask at every step), then laid under the original through A1111's
    overlay (the blurred mask doubled), so that the pixels outside the mask are the original's.
    ``masked_content``: A1111's start under the mask (``MASKED_CONTENT``): "original"; "fill" (``fill_masked``);
    "latent noise" / "latent nothing" (filled, then its latents there replaced by the seed's noise / zeros).
    ``inpaint_not_masked``: A1111's "Inpaint not masked" mask mode (the mask inverted).
    ``only_masked_padding``: A1111's "Only masked" inpaint area: the mask's bounding box grown by that many px (and to
    the image's aspect ratio) is cut out, inpainted at ``width`` x ``height`` and pasted back (diffusers'
    ``padding_mask_crop``, which is A1111's code). ``run``: the prompts or embeddings, the guidance and the
    generator. Returns the PIL image."""
    from PIL import Image

    if masked_content not in MASKED_CONTENT:
        raise ValueError(f"unknown masked content {masked_content!r}; choose from {', '.join(MASKED_CONTENT)}")
    start = flatten_start(init_image).resize((width, height), _lanczos())
    mask = inpaint_mask(mask_image, width, height, mask_blur, invert=inpaint_not_masked)
    inpainter = _img2img(pipe, "inpaint")
    if masked_content.startswith("latent"):
        _start_latents(inpainter, masked_content, mask, width, height, only_masked_padding, run["generator"].initial_seed())
    crop = {"padding_mask_crop": only_masked_padding} if only_masked_padding is not None else {}
    made = inpainter(**run, image=start if masked_content == "original" else fill_masked(start, mask), mask_image=mask,
                     strength=strength, num_inference_steps=steps, width=width, height=height, **crop).images[0]
    # (padding_mask_crop pastes it back itself, over the start it was given: the same pixels outside the mask)
    return made if crop else Image.composite(made, start, overlay_mask(mask))


def overlay_mask(mask):
    """A1111's overlay of a whole-picture inpainting: the blurred ``mask`` doubled (clipped), so that the repainted
    image shows fully from the blur's midpoint in and the start only where the mask is black."""
    return mask.point(lambda v: min(255, 2 * v))


def hires_size(width: int, height: int, scale: float, resize: tuple[int, int] | None = None) -> tuple[int, int]:
    """The size a Hires. fix upscales ``width`` x ``height`` to: ``int(side * scale)``, down to a multiple of 8; with
    ``resize`` ``(w, h)`` (A1111's "Hires resize"; a 0 side follows the other), the aspect ratio kept and the whole
    of ``w`` x ``h`` covered, as A1111 computes it (``hires_fix`` then cuts the middle ``w`` x ``h`` out)."""
    if not resize or not any(resize):
        return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
    x, y = resize
    if y == 0 or (x and width / height < x / y):
        return x // 8 * 8, x * height // width // 8 * 8
    return y * width // height // 8 * 8, y // 8 * 8


def hires_fix(pipe, run: dict, run_second: dict, *, steps: int, width: int, height: int, scale: float,
              hires_steps: int, upscaler: str, strength: float, scheduler=None, resize: tuple[int, int] | None = None):
    """A1111's "Hires. fix": ``pipe(**run)`` at ``width`` x ``height`` for ``steps``, upscaled to ``hires_size`` by
    ``upscaler`` (``HIRES_UPSCALERS``: the latents by torch's ``interpolate``, or the decoded image by PIL), then
    denoised again by the img2img pipeline on ``pipe``'s modules with ``run_second`` for ``hires_steps`` at ``strength``
    (both kwargs dicts hold the prompts or embeddings, the guidance and the generator; ``scheduler``: the second
    pass's, A1111's Hires sampler, else the pipeline's; ``resize``: A1111's "Hires resize" to ``(w, h)``, upscaled to
    cover it and its middle cut out, in latents as A1111 cuts them). Returns the PIL image."""
    import torch.nn.functional as F

    if upscaler not in HIRES_UPSCALERS:
        raise ValueError(f"unknown hires upscaler {upscaler!r}; choose from {', '.join(HIRES_UPSCALERS)}")
    mode = HIRES_UPSCALERS[upscaler]
    big = hires_size(width, height, scale, resize)
    factor = getattr(pipe, "vae_scale_factor", 8)
    cut = [(big[i] - resize[i]) // factor if resize and all(resize) else 0 for i in (0, 1)]  # (latents, as A1111)
    latent = not mode.startswith(("lanczos", "pil-"))
    first = pipe(**run, num_inference_steps=steps, width=width, height=height,
                 output_type="latent" if latent else "pil").images
    if latent:
        name, _, antialias = mode.partition("-")
        start = F.interpolate(first, size=(big[1] // factor, big[0] // factor), mode=name,
                              **({"antialias": bool(antialias)} if name in ("bilinear", "bicubic") else {}))
        start = start[..., cut[1] // 2 : start.shape[2] - (cut[1] + 1) // 2, cut[0] // 2 : start.shape[3] - (cut[0] + 1) // 2]
    else:
        from PIL import Image

        start = first[0].resize(big, _lanczos() if mode == "lanczos" else Image.Resampling.NEAREST)
        start = start.crop((cut[0] // 2 * factor, cut[1] // 2 * factor, big[0] - (cut[0] + 1) // 2 * factor,
                            big[1] - (cut[1] + 1) // 2 * factor))
    second = _img2img(pipe)
    if scheduler is not None:
        second.scheduler = scheduler
    return second(**run_second, image=start, strength=strength, num_inference_steps=hires_steps).images[0]


def _load_named_embeddings(pipe, folder, text: str) -> dict[str, Path]:
    """Load the textual inversions in ``folder`` (and its subfolders) whose names ``text`` holds as words (any case,
    as A1111 finds them); ``{name: file}``."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such embeddings folder")
    found = {}
    for path in sorted(Path(folder).rglob("*.safetensors")):
        if re.search(rf"(?<![\w]){re.escape(path.stem)}(?![\w])", text, re.IGNORECASE) and path.stem not in found:
            found[load_embedding(pipe, path)] = path
    return found


# ---------------------------------------------------------------------------------------------- command line
def png_infotext(path: str | os.PathLike) -> str:
    """The A1111 ``parameters`` text of a PNG (or another image format holding it); ``ValueError`` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as an image ({e})") from None
    if not text:
        raise ValueError(f"{path}: the image holds no A1111 'parameters' text")
    return text


def infotext_settings(text: str, source: str = "the infotext") -> dict:
    """The settings an A1111 infotext holds, as ``txt2img`` keywords (``prompt`` and ``negative_prompt`` too; an X/Y/Z
    grid's axes as ``xy_plot``'s ``x`` / ``y`` / ``z``, under the keys ``x_axis`` / ``y_axis`` / ``z_axis``)."""
    prompt, negative, params = parse_infotext(text)
    out: dict = {"prompt": prompt, "negative_prompt": negative}
    convert = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
               "Sampler": ("sampler", str), "Schedule type": ("schedule_type", str), "Clip skip": ("clip_skip", int),
               "Denoising strength": ("denoising_strength", float), "Hires upscale": ("hires_scale", float),
               "Hires sampler": ("hires_sampler", str),
               "Hires schedule type": ("hires_schedule_type", str), "Hires prompt": ("hires_prompt", str),
               "Hires negative prompt": ("hires_negative_prompt", str),
               "Hires steps": ("hires_steps", int), "Hires upscaler": ("hires_upscaler", str), "Mask blur": ("mask_blur", int),
               "Masked area padding": ("masked_padding", int), "Variation seed": ("subseed", int),
               "Variation seed strength": ("subseed_strength", float), "Noise Schedule": ("noise_schedule", str),
               "Hires CFG Scale": ("hires_cfg_scale", float)}
    for key, (name, kind) in convert.items():
        if key in params:
            try:
                out[name] = kind(params[key])
            except ValueError:
                raise ValueError(f"{source}: {key} {params[key]!r} is not a {kind.__name__}") from None
    for key, name in (("Size", "size"), ("Hires resize", "hires_resize"), ("Seed resize from", "seed_resize_from")):
        if key in params:
            size = re.fullmatch(r"(\d+)x(\d+)", params[key])
            if not size:
                raise ValueError(f"{source}: {key} {params[key]!r} is not WIDTHxHEIGHT")
            out[name] = (int(size.group(1)), int(size.group(2)))
    if "size" in out:
        out["width"], out["height"] = out.pop("size")
    if "Emphasis" in params:
        out["emphasis"] = emphasis_mode(params["Emphasis"])
    if params.get("Inpaint area") == "Only masked":
        out["inpaint_only_masked"] = True
    if params.get("Mask mode") == "Inpaint not masked":
        out["inpaint_not_masked"] = True
    if "Masked content" in params:
        if params["Masked content"] not in MASKED_CONTENT:
            raise ValueError(f"{source}: Masked content {params['Masked content']!r} is not one of {', '.join(MASKED_CONTENT)}")
        out["masked_content"] = params["Masked content"]
    from .xyplot import plot_axes

    out.update(plot_axes(params))  # (an X/Y/Z grid's: ``xy_plot`` takes them, not ``txt2img``)
    return out


# the infotext settings ``infotext_settings`` reads, or that only describe the image (hashes, versions, RNG source)
READ_KEYS = frozenset({
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Clip skip", "Emphasis",
    "Pad conds", "Lora hashes", "TI hashes", "Version", "Denoising strength", "Hires upscale", "Hires steps",
    "Hires upscaler", "Hires resize", "Hires sampler", "Hires schedule type", "Hires prompt", "Hires negative prompt", "Mask blur",
    "Mask mode", "Inpaint area", "Masked area padding", "Masked content",
    "Variation seed", "Variation seed strength", "Seed resize from", "Script", "RNG", "Noise Schedule", "Hires CFG Scale",
    *(f"{p}{a} {k}" for a in "XYZ" for p, k in (("", "Type"), ("", "Values"), ("Fixed ", "Values"))),
})


def unread_settings(text: str) -> list[str]:
    """The settings of an A1111 infotext that ``infotext_settings`` does not make again (a Hires CFG scale, a
    VAE, ADetailer's, ControlNet's...), in their order: the image they made will differ."""
    return [key for key in parse_infotext(text)[2] if key not in READ_KEYS]


def _from_png(path: str, vae_read: bool = False) -> dict:
    """The settings an image's A1111 infotext holds, as ``txt2img`` keywords (a warning names those it cannot
    follow; ``vae_read``: its VAE is followed)."""
    text = png_infotext(path)
    settings = infotext_settings(text, str(path))
    unread = [key for key in unread_settings(text) if not (vae_read and key in ("VAE", "VAE hash"))]
    if unread:
        print(f"warning: {path}: settings not made again here: {', '.join(unread)}; the image will differ",
              file=sys.stderr)
    return settings


def _check_output(output: str, count: int, overwrite: bool) -> None:
    """Refuse, before anything is generated, an output that cannot take ``count`` images."""
    target = Path(output)
    if target.suffix.lower() == ".png":
        if count > 1:
            raise ValueError(f"{target}: {count} images need a folder, not a .png file")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    elif target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; images go into a folder, or a .png path for one image")


def _next_number(folder: Path, prefix: str = "", end: str = "-") -> int:
    """The number after the highest of the ``<prefix><number><end>...png`` images in ``folder``."""
    taken = [int(m.group(1)) for p in folder.glob(f"{prefix}*.png") if (m := re.match(rf"{re.escape(prefix)}(\d+){end}", p.name))]
    return max(taken, default=-1) + 1


def _output_paths(output: str, seeds: list[int]) -> list[Path]:
    """``output`` itself (one image, a ``.png`` path), else A1111's ``<index>-<seed>.png`` names in the folder
    ``output``, numbered on from the images already there."""
    target = Path(output)
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        return [target]
    target.mkdir(parents=True, exist_ok=True)
    start = _next_number(target)
    return [target / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def _size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> ``(512, 768)`` (argparse's type for a WIDTHxHEIGHT)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def _cmd_generate(args: argparse.Namespace) -> int:
    settings: dict = {}
    if args.from_png:
        args.vae = args.vae or _png_vae(args.from_png, args)
        settings = _from_png(args.from_png, vae_read=bool(args.vae))
    for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "sampler", "schedule_type", "clip_skip",
                 "width", "height", "denoising_strength", "hires_scale", "hires_steps", "hires_upscaler", "mask_blur", "inpaint_only_masked", "masked_padding", "masked_content",
                 "inpaint_not_masked", "subseed", "subseed_strength", "seed_resize_from", "hires_resize", "hires_sampler",
                 "hires_schedule_type", "hires_prompt", "hires_negative_prompt", "noise_schedule", "hires_cfg_scale"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.emphasis:
        settings["emphasis"] = args.emphasis
    if args.no_emphasis:
        settings["emphasis"] = "None"
    if not settings.get("prompt"):
        raise ValueError("give a prompt (or --from-png IMAGE)")
    if args.vae and not Path(args.vae).expanduser().exists():
        raise ValueError(f"--vae {args.vae}: no such file or folder")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs the image it masks: give --init-image")
    if (args.inpaint_only_masked or args.masked_padding is not None or args.masked_content or args.inpaint_not_masked) \
            and not args.mask:
        raise ValueError("--only-masked, --mask-padding, --masked-content and --invert-mask are for inpainting: give "
                         "--mask (and --init-image)")
    for path, key in ((args.init_image, "init_image"), (args.mask, "mask_image")):
        if path:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    settings[key] = im.copy()  # (its mode kept: flatten_start / mask_levels read its alpha)
            except OSError as e:
                raise ValueError(f"{path}: cannot read it as an image ({e})") from None
    if args.from_png and "mask_blur" in settings and not args.mask:
        raise ValueError(f"{args.from_png} was inpainted; pass its starting image as --init-image and its --mask")
    if not args.init_image and args.from_png and "denoising_strength" in settings and settings.get("hires_scale", 1) <= 1 \
            and "hires_resize" not in settings:
        raise ValueError(f"{args.from_png} was made by img2img; pass its starting image as --init-image")
    if not args.mask:
        for name in ("mask_blur", "inpaint_only_masked", "masked_padding", "masked_content", "inpaint_not_masked"):
            settings.pop(name, None)
    for name in ("x_axis", "y_axis", "z_axis"):  # (a grid's own axes, where the command line gives none)
        setattr(args, name, getattr(args, name) or settings.get(name))
        settings.pop(name, None)
    plot = args.x_axis or args.y_axis or args.z_axis
    checkpoints: dict[str, Path] = {}
    if plot:
        from .xyplot import parse_axis

        for axis in filter(None, (args.x_axis, args.y_axis, args.z_axis)):
            kind, values = parse_axis(axis)  # (a bad axis: before the model loads)
            if kind == "Checkpoint name":
                checkpoints.update({value: _checkpoint_path(value, args.model) for value in values})
        if args.batch_count != 1:
            raise ValueError("an X/Y plot makes one image per cell: leave --batch-count at 1")
    _check_output(args.output, 1 if plot else args.batch_count, args.overwrite)
    pipe, model_info = _generation_model(args.model, args)
    settings.setdefault("sampler", "DPM++ 2M")
    common = dict(lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, fused=args.fuse, **model_info)
    if plot:
        from .xyplot import xy_plot

        made = xy_plot(pipe, settings.pop("prompt"), settings.pop("negative_prompt", ""), x=args.x_axis, y=args.y_axis,
                       z=args.z_axis, load_checkpoint=lambda value: _generation_model(checkpoints[value], args),
                       **common, **settings)
        return _save_plot(made, args.output)
    images = txt2img(pipe, settings.pop("prompt"), settings.pop("negative_prompt", ""), batch_count=args.batch_count,
                     **common, **settings)
    for generated, path in zip(images, _output_paths(args.output, [g.seed for g in images])):
        generated.image.save(path, pnginfo=generated.pnginfo())
        print(path)
    return 0


def _png_vae(image: str, args: argparse.Namespace) -> str | None:
    """The VAE an A1111 image names (its infotext's ``VAE``), where it is found: in ``--vae-dir``, else beside the
    model; a warning says when it is not."""
    name = parse_infotext(png_infotext(image))[2].get("VAE")
    if not name:
        return None
    for folder in filter(None, (args.vae_dir, Path(args.model).expanduser().parent)):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    print(f"warning: {image} was made with the VAE {name}, not found in {args.vae_dir or 'the model folder'} (give "
          "--vae FILE or --vae-dir DIR); the model's own VAE is used", file=sys.stderr)
    return None


def _generation_model(path: str | os.PathLike, args: argparse.Namespace) -> tuple[object, dict]:
    """The pipeline ``generate`` makes images with (``--model-config``, ``--dtype``, ``--device``, ``--vae``,
    ``--fp8-weight``), and its
    infotext's ``model_name`` and ``model_sha256`` (a single file's), ``vae_name`` and ``vae_sha256``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .tools import _DTYPES, load_model

    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if torch.cuda.is_available() else None)
    pipe = load_model(str(path), args.model_config, dtype)
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ValueError(f"{path}: a {type(pipe).__name__}; generate takes Stable Diffusion 1.x/2.x and SDXL "
                         "text-to-image models")
    vae = Path(args.vae).expanduser() if args.vae else None
    if vae is not None:
        pipe.vae = load_vae(vae, pipe.vae)
    pipe = pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fp8_weight:  # (each layer casts its weight up for its own call)
        from .fp8 import store_fp8

        store_fp8([("unet", pipe.unet)], pipe.unet.dtype)
    pipe.set_progress_bar_config(disable=not args.progress)
    model = Path(path)
    return pipe, {"model_name": model.stem if model.is_file() else model.name,
                  "model_sha256": model_hash(model) if model.is_file() else None,
                  "vae_name": vae.name if vae is not None else None,
                  "vae_sha256": model_hash(vae) if vae is not None and vae.is_file() else None}


def _checkpoint_path(value: str, model: str) -> Path:
    """A ``Checkpoint name`` axis value's model: a path (file or diffusers folder), or the name of a file beside
    ``model``'s (with or without ``.safetensors``), as A1111 names its checkpoints."""
    beside = Path(model).expanduser().parent
    for path in (Path(value).expanduser(), beside / value, beside / f"{value}.safetensors"):
        if path.exists():
            return path
    raise ValueError(f"Checkpoint name {value!r}: no such model file or folder (nor one of that name beside {model})")


def _save_plot(plot, output: str) -> int:
    """An X/Y/Z plot's grid at ``output`` (a ``.png``), or its cells (A1111's names) and ``xyz_grid-<n>.png`` in the
    folder ``output`` (with a Z axis, A1111's grid of the X/Y grids); the grid carries A1111's grid infotext (the
    first cell's with the axes: ``--from-png`` makes the plot again)."""
    target = Path(output)
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        grid = target
    else:
        for generated, path in zip(plot.cells, _output_paths(output, [g.seed for g in plot.cells])):
            generated.image.save(path, pnginfo=generated.pnginfo())
            print(path)
        grid = target / f"xyz_grid-{_next_number(target, 'xyz_grid-', ''):05d}.png"
    plot.grid.save(grid, pnginfo=plot.pnginfo())
    print(grid)
    return 0


def register(subparsers) -> None:
    """Add ``generate`` to the ``lora-diffusion`` command line."""
    p = subparsers.add_parser("generate", help="text to image with <lora:name:w> tags, A1111's prompts and samplers; "
                              "each PNG carries A1111's infotext")
    p.add_argument("model", help="a diffusers folder, a hub id or a single-file .safetensors checkpoint (SD 1.x/2.x, SDXL)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt, with <lora:name:weight> tags and (emphasis:1.2)")
    p.add_argument("-n", "--negative-prompt", dest="negative_prompt", default=None)
    p.add_argument("--lora-dir", default="loras", help="where <lora:name> finds name.safetensors (default: loras)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR", help="textual inversions (A1111's embeddings/): "
                   "those the prompts name load, by file name")
    p.add_argument("-o", "--output", default="outputs", help="a .png file, or a folder for A1111-named images (default: outputs)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20)")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=None, help="classifier-free guidance (default 7)")
    p.add_argument("--seed", type=int, default=None, help="-1 (default): a random one")
    p.add_argument("--sampler", default=None, help=f"an A1111 sampler ({', '.join(SAMPLERS)}; default DPM++ 2M) or a "
                   "diffusers scheduler class name")
    p.add_argument("--schedule-type", dest="schedule_type", default=None, choices=list(SCHEDULE_TYPES))
    p.add_argument("--noise-schedule", dest="noise_schedule", default=None, choices=list(NOISE_SCHEDULES),
                   help="A1111's noise schedule for sampling: Zero Terminal SNR for models trained with it")
    p.add_argument("--variation-seed", dest="subseed", type=int, default=None, help="A1111's variation seed: the "
                   "starting noise --variation-strength of the way toward this seed's (-1: a random one)")
    p.add_argument("--variation-strength", dest="subseed_strength", type=float, default=None,
                   help="0 (the seed's own noise, default) to 1 (the variation seed's)")
    p.add_argument("--seed-resize-from", dest="seed_resize_from", type=_size, default=None, metavar="WxH",
                   help="A1111's Resize seed from: the seed's noise as it is at that size, centred (keeps a "
                   "composition at a new size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=None, help="A1111's CLIP skip (SD 1.x/2.x)")
    p.add_argument("--emphasis", default=None, choices=list(EMPHASIS_MODES), help="A1111's emphasis mode (default "
                   "Original; No norm: weights without the mean restored, which some prefer for SDXL)")
    p.add_argument("--no-emphasis", action="store_true", help="take ( ) [ ] in the prompt literally (--emphasis None)")
    p.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img: start from this image")
    p.add_argument("--mask", default=None, metavar="IMAGE", help="inpainting: repaint where this image is white "
                   "(with --init-image)")
    p.add_argument("--mask-blur", dest="mask_blur", type=int, default=None, help="px the mask's edge is blurred "
                   "(A1111's Mask blur; default 4)")
    p.add_argument("--only-masked", dest="inpaint_only_masked", action="store_true", default=None,
                   help="A1111's 'Only masked' inpaint area: inpaint the mask's surroundings at full size, paste them back")
    p.add_argument("--mask-padding", dest="masked_padding", type=int, default=None, help="px around the mask with "
                   "--only-masked (A1111's Masked area padding; default 32)")
    p.add_argument("--masked-content", dest="masked_content", default=None, choices=list(MASKED_CONTENT),
                   type=lambda s: s.replace("-", " ").replace("_", " "), help="A1111's start under the mask: the "
                   "original (default), a fill of the colours around it, or latents of noise / of nothing there "
                   "('latent-noise' spells 'latent noise')")
    p.add_argument("--invert-mask", dest="inpaint_not_masked", action="store_true", default=None,
                   help="A1111's 'Inpaint not masked' mask mode: repaint where the mask is black")
    p.add_argument("--denoising-strength", dest="denoising_strength", type=float, default=None,
                   help="img2img and hires: how far back to noise (default 0.75)")
    p.add_argument("--hr-scale", dest="hires_scale", type=float, default=None, help="A1111's Hires. fix: upscale by this "
                   "and denoise again (e.g. 2)")
    p.add_argument("--hr-steps", dest="hires_steps", type=int, default=None, help="steps of the hires pass (0: --steps)")
    p.add_argument("--hr-upscaler", dest="hires_upscaler", default=None, choices=list(HIRES_UPSCALERS),
                   help="default Latent")
    p.add_argument("--hr-resize", dest="hires_resize", type=_size, default=None, metavar="WxH", help="A1111's Hires "
                   "resize: to this size instead of --hr-scale (0 for a side: by the other; both: the middle cut out)")
    p.add_argument("--hr-sampler", dest="hires_sampler", default=None, help="the hires pass's sampler (A1111's Hires "
                   "sampler; default: --sampler's)")
    p.add_argument("--hr-schedule-type", dest="hires_schedule_type", default=None, choices=list(SCHEDULE_TYPES))
    p.add_argument("--hr-prompt", dest="hires_prompt", default=None, help="the hires pass's prompt (A1111's Hires "
                   "prompt; default: the prompt; LoRA tags, if any, the prompt's)")
    p.add_argument("--hr-negative-prompt", dest="hires_negative_prompt", default=None)
    p.add_argument("--hr-cfg-scale", dest="hires_cfg_scale", type=float, default=None, help="the hires pass's "
                   "classifier-free guidance (Forge's Hires CFG Scale; default: --cfg-scale)")
    p.add_argument("--batch-count", type=int, default=1, help="images, with seeds seed, seed+1, ...")
    p.add_argument("--x-axis", dest="x_axis", default=None, metavar="'TYPE: VALUES'", help="A1111's X/Y plot: one image "
                   "per value and a labelled grid, e.g. 'Prompt S/R: <lora:style:1>, <lora:style:0.5>' or 'Seed: 1-4' "
                   "(types: Prompt S/R, Seed, Steps, CFG Scale, Sampler, Schedule type, Denoising, Clip skip, Hires "
                   "upscale, Hires steps)")
    p.add_argument("--y-axis", dest="y_axis", default=None, metavar="'TYPE: VALUES'", help="the plot's rows, as --x-axis")
    p.add_argument("--z-axis", dest="z_axis", default=None, metavar="'TYPE: VALUES'", help="one X/Y grid per value, side "
                   "by side under these labels, as --x-axis")
    p.add_argument("--fuse", action="store_true", help="fuse the LoRAs into the weights while generating")
    p.add_argument("--from-png", default=None, metavar="IMAGE", help="take prompt and settings from an image's A1111 "
                   "infotext (flags given override them)")
    p.add_argument("--vae", default=None, metavar="FILE", help="a VAE in place of the model's (A1111's SD VAE): an "
                   "original-layout file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers folder")
    p.add_argument("--vae-dir", default=None, metavar="DIR", help="where --from-png finds the VAE an image names "
                   "(A1111's models/VAE; default: beside the model)")
    p.add_argument("--model-config", default=None, metavar="DIR", help="for a single-file model: a diffusers folder or "
                   "hub id of the same architecture for its configs and tokenizers")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on CUDA, else fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--fp8-weight", action="store_true", help="A1111's FP8 weight: the UNet's Linear and Conv2d weights "
                   "stored in float8 (about half their memory), each cast to --dtype for its own call; LoRAs stay in "
                   "--dtype beside them (with --fuse: rounded into the fp8 weights)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output .png")
    p.add_argument("--progress", action="store_true", help="show the denoising progress bar")
    p.set_defaults(func=_cmd_generate)

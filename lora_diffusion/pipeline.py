"""Adapters on a Stable Diffusion pipeline: save, load, weight, enable/disable, fuse/unfuse.

These functions need only ``pipe.unet`` and ``pipe.text_encoder`` (and SDXL's ``pipe.text_encoder_2`` where the
pipeline has one: any diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, or an object with
those attributes); they never need peft.

Example:
    >>> name = load_lora(pipe, "style.safetensors")                 # adapter "style", weight 1.0
    >>> load_lora(pipe, "subject.safetensors", weight=0.8)
    >>> set_adapters(pipe, {"style": 0.5, "subject": 1.0})
    >>> fuse(pipe)                                                   # zero added latency from here
    >>> image = pipe("a cat", num_inference_steps=20).images[0]
    >>> unfuse(pipe)                                                 # base weights back, bit for bit
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import __version__, layers as _layers
from .formats import (
    COMPONENTS,
    Lora,
    LoraFormatError,
    PROJECTION,
    LoraWeights,
    first_non_finite,
    guess_architecture,
    lora_file,
    our_metadata,
    read_bundled_embeddings,
    read_embedding_file,
    read_lora_file_with_params,
    strip_text_model,
    with_text_model,
    write_lora_file,
)
from .blend import block_factor, check_blocks, finite_number
from .dora import as_dense
from .formats_lycoris import dense_lora
from .params import ParamDelta, param_deltas
from .inject import DETACHED_ATTR, MERGE_CACHE_ATTR, attach, detach, is_compiled, lora_layers, unwrap, unwrap_layer, wrap_layer
from .layers import LoraLayer, all_finite, compute_dtype, floats_on_devices, fuse_many

logger = logging.getLogger(__name__)

__all__ = [
    "save_lora",
    "load_lora",
    "lora_from_model",
    "apply_lora",
    "set_adapters",
    "disable_lora",
    "enable_lora",
    "list_adapters",
    "fuse",
    "unfuse",
    "cache_merged_weights",
    "load_single_file",
    "load_embedding",
    "delete_adapter",
    "guess_architecture",
]

_META_ATTR = "_lora_metadata"  # model attribute: adapter name -> our metadata from the file it came from
_DISABLED_ATTR = "_lora_disabled"  # model attribute: disable_lora is in force (new layers start disabled too)
_REFUSE_ATTR = "_lora_refuse"  # model attribute: fuse when enable_lora comes (fused, or fuse asked, while disabled)


def is_sdxl_checkpoint(path: Path) -> bool:
    """Whether a single-file ``.safetensors`` checkpoint is SDXL's (SGM layout: a second text encoder under
    ``conditioner.embedders.1``), read from its header without loading a tensor. (Other files: not known, so SD.)"""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    except (SafetensorError, OSError, ValueError):
        return False  # diffusers says what is wrong with it


def load_single_file(path: str | os.PathLike, *, config: str | os.PathLike | None = None, **kwargs):
    """A ``StableDiffusionPipeline``, or for an SDXL checkpoint (told by its second text encoder's keys) a
    ``StableDiffusionXLPipeline``, from one original-layout checkpoint as A1111, ComfyUI and Civitai share them (no
    safety checker). The file holds weights only: ``config``, a diffusers folder or hub id of the same architecture,
    gives the configs and tokenizers (default: diffusers fetches those of the base model it recognises, from the
    Hub). ``kwargs`` go to diffusers' ``from_single_file`` (e.g. the dtype).

    Example:
        >>> pipe = load_single_file("models/dreamshaper_8.safetensors", config="models/sd15")
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path).expanduser()
    extra = {"config": str(config)} if config else {}
    if is_sdxl_checkpoint(path):
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), **extra, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, requires_safety_checker=False, **extra, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(path: str | os.PathLike, like: nn.Module) -> nn.Module:
    """A VAE to use in place of a model's (kohya's ``--vae``, A1111's SD VAE): a diffusers folder (or a model folder
    with ``vae/``), or one ``.safetensors`` / ``.ckpt`` / ``.pt`` file in the original layout, a VAE alone (as
    ``vae-ft-mse-840000-ema-pruned.safetensors``) or a whole checkpoint's, read on the config of ``like`` (the model's
    own VAE, whose shapes it must have). ``ValueError`` names the path where it is not such a VAE.

    Example:
        >>> pipe.vae = load_vae("vae-ft-mse-840000-ema-pruned.safetensors", pipe.vae)
    """
    import tempfile

    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path).expanduser()
    try:
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise ValueError("a folder without config.json (give a diffusers VAE folder, or a model folder with vae/)")
            vae = AutoencoderKL.from_pretrained(str(folder))
        elif path.is_file():
            with tempfile.TemporaryDirectory() as config:
                like.save_config(config)
                vae = AutoencoderKL.from_single_file(str(path), config=config)
        else:
            raise ValueError("no such file or folder")
    except SingleFileComponentError:
        raise ValueError(f"VAE {path}: no VAE weights in the file") from None
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ValueError(f"VAE {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    mine, theirs = like.config, vae.config
    if (mine.latent_channels, tuple(mine.block_out_channels)) != (theirs.latent_channels, tuple(theirs.block_out_channels)):
        raise ValueError(f"VAE {path}: {theirs.latent_channels} latent channels, blocks {list(theirs.block_out_channels)}; "
                         f"the model's has {mine.latent_channels}, {list(mine.block_out_channels)}")
    return vae.to(like.device, like.dtype)


def _components(pipe) -> Iterator[tuple[str, nn.Module]]:
    for name in COMPONENTS:
        model = getattr(pipe, name, None)
        if model is not None:
            yield name, unwrap(model)


# ---------------------------------------------------------------------------------------------- save
def lora_from_model(model: nn.Module, component: str, adapter: str = "default") -> Lora:
    """Canonical ``{"<component>.<path>": LoraWeights}`` of one adapter of one model."""
    out: Lora = {}
    for path, layer in lora_layers(model):
        if adapter in layer.specs:
            if component.startswith("text_encoder"):
                path = with_text_model(path)
            a, b = layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach()
            magnitude = None  # DoRA: per output row, [out, 1, ...] as the readers give it
            if adapter in layer._dora:
                magnitude = layer.lora_magnitude[adapter].detach().reshape(b.shape[0], *[1] * (a.dim() - 1))
            out[f"{component}.{path}"] = LoraWeights(a, b, layer.specs[adapter].alpha, magnitude)
    return out


def save_lora(
    path: str | os.PathLike,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter: str = "default",
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float16,
    format: str = "diffusers",
) -> Path:
    """Write adapter ``adapter`` of the given models to one ``.safetensors`` file and return its path.

    The default diffusers/PEFT format loads in stock diffusers (``pipe.load_lora_weights(path)``), alpha
    included (in the ``lora_adapter_metadata`` header). Our own header entry holds the format version, ranks,
    alphas and targets, whatever metadata the adapter was loaded with, and ``metadata`` (base model, trigger
    words...), which wins. Tensors are fp16 unless ``dtype`` says otherwise. Written atomically. A model given
    without the adapter is left out (a UNet-only LoRA saved with ``text_encoder=`` too); none holding it raises.
    Deltas a loaded file made to biases, norms or embedding tables (``params``) are saved in the kohya format only
    (a warning says so otherwise).

    Example:
        >>> save_lora("out/pytorch_lora_weights.safetensors", unet=pipe.unet, metadata={"trigger_words": ["<s>"]})
    """
    path = Path(path)
    lora: Lora = {}
    meta: dict = {}
    models = (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    given = {c: unwrap(m) for c, m in models if m is not None}
    if not given:
        raise ValueError("save_lora needs unet=, text_encoder= or text_encoder_2= (SDXL's second encoder)")
    params: dict[str, ParamDelta] = {}  # what the adapter changes outside its LoRA layers (a ComfyUI extraction's)
    for component, model in given.items():
        lora.update(lora_from_model(model, component, adapter))
        meta.update(getattr(model, _META_ATTR, {}).get(adapter, {}))
        store = param_deltas(model)
        params.update({f"{component}.{p}": e.deltas[adapter] for p, e in (store.entries.items() if store else []) if adapter in e.deltas})
    if params and format != "kohya":
        logger.warning("%s: adapter %r also changes %d biases / norms / embedding tables, which a %s file cannot hold: "
                       "not saved (format='kohya' keeps them)", path, adapter, len(params), format)
    if not lora and not (params and format == "kohya"):
        have = "; ".join(f"{c} has {_adapter_names(m)}" for c, m in given.items())
        raise ValueError(f"no adapter {adapter!r} to save: {have}")
    meta.update(
        {
            "components": sorted({k.split(".", 1)[0] for k in lora}),
            "ranks": sorted({w.rank for w in lora.values()}),
            "alphas": sorted({w.alpha for w in lora.values()}),
            "saved_by": f"lora_diffusion {__version__}",
        }
    )
    if unet is not None and (architecture := _unet_architecture(given["unet"])):
        meta["architecture"] = architecture
    if format == "kohya":  # kohya's ss_output_name / modelspec.title: A1111's alias, which its cards insert in prompts
        meta["name"] = Path(path).stem
    meta.update(metadata or {})
    write_lora_file(path, lora, metadata=meta, format=format, dtype=dtype, params=params if format == "kohya" else None)
    return path


def _adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.specs))
    store = param_deltas(model)
    if store is not None:
        names.update(dict.fromkeys(sorted(store.adapters())))
    return list(names)


# ---------------------------------------------------------------------------------------------- load
def module_listing(model: nn.Module) -> list[tuple[str, str]]:
    """``[(module path, class name), ...]`` in ``named_modules`` order, LoRA wrappers shown as their base layer
    (what positional formats such as cloneofsimo's index by)."""
    out = []
    model = unwrap(model)
    skip = None  # a wrapper's own children (base_layer, lora_A...) follow it contiguously
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, LoraLayer):
            skip = name + "."
            module = module.base_layer
        out.append((name, type(module).__name__))
    return out


def _resolve_module(known: set[str], component: str, path: str) -> str | None:
    """The module path of ``known`` (the model's module paths and detached layers) that a file's key names: the key's
    own, or a text encoder's without ``text_model.``; ``None`` when neither is there."""
    candidates = [path]
    if component.startswith("text_encoder"):
        candidates = [path, strip_text_model(path)]
    return next((cand for cand in candidates if cand in known), None)


def _plan(
    model: nn.Module, component: str, lora: Lora, adapter: str, strict: bool, source: str
) -> list[tuple[str, LoraWeights]]:
    """Check every key of ``component`` against ``model`` and return ``(module path, weights)`` to apply.

    Raises on unmatched keys (unless ``strict=False`` and some match), wrong shapes and name clashes.
    """
    items = {k.split(".", 1)[1]: w for k, w in lora.items() if k.split(".", 1)[0] == component}
    plan: list[tuple[str, LoraWeights]] = []
    missing: list[tuple[str, LoraWeights]] = []
    known = {name for name, _ in model.named_modules()} | set(getattr(model, DETACHED_ATTR, {}))  # (once: not per key)
    for path, w in items.items():
        target = _resolve_module(known, component, path)
        if target is None:
            missing.append((f"{component}.{path}", w))
            continue
        layer = getattr(model, DETACHED_ATTR, {}).get(target) or model.get_submodule(target)
        base = layer.base_layer if isinstance(layer, LoraLayer) else layer
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise LoraFormatError(f"{source}: {component}.{path} targets a {type(base).__name__}, not a Linear or Conv2d")
        _check_projection(source, f"{component}.{path}", w)
        if w.oft is not None:  # OFT / BOFT, GLoRA, (IA)^3: the exact delta on this layer's own (unfused) weight
            try:
                w = dense_lora(w.oft.delta(layer.original_weight if isinstance(layer, LoraLayer) else base.weight))
            except ValueError as e:
                raise LoraFormatError(f"{source}: {component}.{path} {e}") from None
        expect = _expected_shapes(base, w.rank)
        w = _conv_shaped(w, expect)
        if (tuple(w.A.shape), tuple(w.B.shape)) != expect:
            raise LoraFormatError(
                f"{source}: {component}.{path}: file has down {tuple(w.A.shape)} / up {tuple(w.B.shape)}, "
                f"the model's {type(base).__name__} {tuple(base.weight.shape)} needs {expect[0]} / {expect[1]}. "
                f"The file looks made for {guess_architecture(lora)}."
            )
        if isinstance(layer, LoraLayer) and adapter in layer.specs:
            raise ValueError(f"adapter {adapter!r} is already loaded in {component}; pass another adapter= name")
        if w.magnitude is None and w.rank > min(base.weight.shape[0], base.weight[0].numel()):
            # more rank than the layer has (a concat merge of full-rank LoRAs): its exact delta, densely
            w = dense_lora(w.delta(torch.float64).reshape(base.weight.shape))
        if w.magnitude is not None:  # DoRA: the exact delta on this layer's own (unfused) weight
            try:
                w = as_dense(w, layer.original_weight if isinstance(layer, LoraLayer) else base.weight)
            except ValueError as e:
                raise LoraFormatError(f"{source}: {component}.{path} {e}") from None
        plan.append((target, w))
    missing = _unmatched(missing, bool(plan), source)
    if missing:
        msg = (
            f"{source}: {len(missing)} of {len(items)} {component} keys match no layer of this model: "
            f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}. The file looks made for {guess_architecture(lora)}."
        )
        if strict or not plan:
            raise LoraFormatError(msg)
        logger.warning("%s Loaded the other %d layers (strict=False).", msg, len(plan))
    return plan


def apply_lora(
    model: nn.Module,
    component: str,
    lora: Lora,
    adapter: str,
    *,
    weight: float = 1.0,
    strict: bool = True,
    source: str = "LoRA",
) -> int:
    """Add adapter ``adapter`` with the given factors to ``model``'s layers; returns how many layers it patched.

    Keys that match no layer raise a ``LoraFormatError`` naming the first few and what the file looks made for
    (``strict=False`` logs a warning and goes on). A shape mismatch names the key and both shapes. Nothing is
    changed in the model unless every layer checks out.
    """
    model = unwrap(model)
    return _apply_plan(model, _plan(model, component, lora, adapter, strict, source), adapter, weight)


def _unet_architecture(unet: nn.Module) -> str | None:
    """``"sdxl"`` / ``"sd2"`` / ``"sd1"`` from a diffusers UNet's config (SDXL's added time embedding, the
    cross-attention width), ``None`` for other widths (the tiny test models: SD-like, not SD)."""
    config = getattr(unet, "config", None)
    if config is None:
        return None
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(getattr(config, "cross_attention_dim", None))


def _unmatched(missing: list[tuple[str, LoraWeights | ParamDelta]], matched: bool, source: str) -> list[str]:
    """The keys that match nothing and count: all of them where nothing of the component matched (a file for another
    model, even an untrained one), else those whose delta is not zero, less a ``text_projection`` for a text encoder
    without one (``_skipped_projection``). A zero delta changes nothing: ComfyUI's extractions write zero factors for
    every unchanged module."""

    def zero(w) -> bool:
        if isinstance(w, ParamDelta) and w.delta is not None:
            return not bool(w.delta.any())
        if getattr(w, "oft", None) is not None:
            return w.oft.is_zero()
        return getattr(w, "magnitude", None) is None and not (bool(w.A.any()) and bool(w.B.any()))  # (DoRA rescales W)

    if matched:
        projections = [key for key, w in missing if _skipped_projection(key) and not zero(w)]
        if projections:
            logger.warning("%s: %s skipped: this text encoder has no output projection (diffusers' CLIPTextModel; "
                           "ComfyUI's CLIP-L carries one that SD never uses, and extracts it)", source, ", ".join(projections))
        missing = [(key, w) for key, w in missing if key not in projections]
    counted = [key for key, w in missing if not (matched and zero(w))]
    if len(counted) < len(missing):
        logger.info("%s: %d zero deltas for modules this model lacks were skipped", source, len(missing) - len(counted))
    return counted


def _skipped_projection(key: str) -> bool:
    """Whether ``key`` (``component.path``, matching nothing) is a text encoder's ``text_projection``. SD pipelines'
    CLIP-L (and SD 2's encoder) has none; ComfyUI's CLIP-L has an unused one, left uninitialised, which its "Extract
    and Save Lora" extracts anyway (garbage, even NaN; ComfyUI applies it to a weight nothing reads): skipped."""
    component, _, path = key.partition(".")
    return component.startswith("text_encoder") and PROJECTION in path.split(".")


def _check_projection(source: str, key: str, w: LoraWeights | ParamDelta) -> None:
    """Refuse NaN / Inf in an applied ``text_projection`` (checked here, not when the file is read: see
    ``_skipped_projection``)."""
    if PROJECTION in key.split("."):
        tensors = {name: t for name, t in w._asdict().items() if isinstance(t, torch.Tensor)}
        if getattr(w, "oft", None) is not None:
            tensors.update({f"{w.oft.kind} {name}": t for name, t in w.oft.tensors().items()})
        bad = first_non_finite(tensors)
        if bad is not None:
            raise LoraFormatError(f"{source}: {key} ({bad}) holds NaN or Inf values; factors and alphas must be finite")


def _param_plan(model: nn.Module, component: str, params: dict[str, ParamDelta], strict: bool, source: str) -> dict:
    """``{path: (parameter, delta)}`` of ``component``'s parameter deltas (biases, norm scales, embedding tables),
    each checked against the model's parameter (a LoRA wrapper's base layer's too); unmatched keys as in ``_plan``."""
    items = {k.split(".", 1)[1]: d for k, d in params.items() if k.split(".", 1)[0] == component}
    if not items:
        return {}
    named = dict(model.named_parameters())
    plan, missing = {}, []
    for path, delta in items.items():
        candidates = [path, strip_text_model(path)] if component.startswith("text_encoder") else [path]
        found = next((name for cand in candidates for name in (cand, ".base_layer.".join(cand.rsplit(".", 1))) if name in named), None)
        if found is None:
            missing.append((f"{component}.{path}", delta))
            continue
        param = named[found]
        if tuple(param.shape) != delta.shape:
            raise LoraFormatError(f"{source}: {component}.{path}: the file's delta has shape {list(delta.shape)}, the model's "
                                  f"parameter {list(param.shape)}")
        _check_projection(source, f"{component}.{path}", delta)
        plan[path] = (param, delta)
    missing = _unmatched(missing, bool(plan), source)
    if missing:
        msg = (f"{source}: {len(missing)} of {len(items)} {component} parameter deltas match no parameter of this model: "
               f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
        if strict:
            raise LoraFormatError(msg)
        logger.warning("%s Loaded the others (strict=False).", msg)
    return plan


def _apply_plan(model: nn.Module, plan: list[tuple[str, LoraWeights]], adapter: str, weight: float) -> int:
    """Add ``adapter`` to the layers of ``plan`` (wrapping them where needed; a fused model fuses it in). On any
    error the adapter is taken out again and the wrappers this call made are removed: nothing half-loaded."""
    fused = bool(getattr(model, DETACHED_ATTR, {}))
    disabled = model.__dict__.get(_DISABLED_ATTR, False)
    attach(model)
    touched: list[tuple[str, LoraLayer, bool]] = []  # (path, layer, wrapped by this call)
    try:
        for target, w in plan:
            fresh = not isinstance(model.get_submodule(target), LoraLayer)
            layer = wrap_layer(model, target)
            touched.append((target, layer, fresh))
            layer.disabled = layer.disabled or disabled
            layer.add_adapter(adapter, rank=w.rank, alpha=w.alpha, dtype=compute_dtype(layer.base_layer), weight=weight)
            layer.set_lora_weights(adapter, w.A, w.B)
            layer.lora_A[adapter].requires_grad_(False)
            layer.lora_B[adapter].requires_grad_(False)
        if fused:
            fuse_layers([(target, layer) for target, layer, _ in touched])
    except BaseException:
        _take_out(model, adapter, touched)
        raise
    finally:
        if fused:
            detach(model)
    return len(plan)


def _take_out(model: nn.Module, adapter: str, touched: list[tuple[str, LoraLayer, bool]]) -> None:
    """Undo a part-done ``_apply_plan``: delete ``adapter`` where it was added (a fused layer re-fuses without
    it) and put back the base layers of the wrappers that call made."""
    for target, layer, fresh in touched:
        if adapter in layer.specs:
            layer.delete_adapter(adapter)
        if fresh and not layer.specs:
            unwrap_layer(model, target)


def _conv_shaped(w: LoraWeights, expect: tuple[tuple[int, ...], tuple[int, ...]]) -> LoraWeights:
    """Factors in the shapes of the layer they target where they differ only by a flattening, as A1111 reshapes
    them: a conv's flattened down ``[r, in*k*k]`` and up ``[out, r]`` (LyCORIS' LoHa / LoKr without Tucker factors,
    a 1x1 conv stored as a Linear), or a Linear's stored as a 1x1 conv. Others as they are (the caller refuses them)."""
    a_shape, b_shape = expect
    if w.A.numel() != math.prod(a_shape) or w.B.numel() != math.prod(b_shape) or w.A.dim() == len(a_shape):
        return w
    flat = w.A.dim() == 2 and w.B.dim() == 2
    one_by_one = w.A.dim() == 4 and w.A.shape[2:] == (1, 1) and w.B.shape[2:] == (1, 1)
    if (len(a_shape) == 4 and flat) or (len(a_shape) == 2 and one_by_one):
        return w._replace(A=w.A.reshape(a_shape), B=w.B.reshape(b_shape))
    return w


def _expected_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)


def load_lora(
    pipe,
    path: str | os.PathLike,
    *,
    adapter: str | None = None,
    weight: float = 1.0,
    strict: bool = True,
) -> str:
    """Load a LoRA file into ``pipe``'s UNet and text encoder(s) (SDXL: both; no peft needed); returns the
    adapter name.

    The name defaults to the file name without extension (the folder name for ``pytorch_lora_weights`` and a PEFT
    adapter). A folder is read as ``<folder>/pytorch_lora_weights.safetensors``, or as a PEFT adapter
    (``save_pretrained``'s folder, or PEFT's DreamBooth output with ``unet/`` and ``text_encoder/``:
    ``lora_diffusion.formats_peft``). The new adapter is active at
    ``weight`` beside those already loaded; a fused pipeline stays fused with it included. A LoRA trained with
    a learned token (``--pivotal_tuning``) brings it along: the ``embeddings.safetensors`` its metadata names,
    beside it, is added to the tokenizer and text encoder (``pipe.load_textual_inversion``), once; so are embeddings
    bundled in the file (``bundle_emb.*``). A DoRA or OFT / BOFT module becomes the exact delta it makes on this
    pipeline's own weights (``lora_diffusion.dora``, ``lora_diffusion.oft``); deltas to biases, norms and embedding tables go into those parameters
    (``lora_diffusion.params``).

    Example:
        >>> load_lora(pipe, "loras/style.safetensors", weight=0.7)
        'style'
    """
    path = Path(path)
    if path.is_dir() and lora_file(path).is_file():
        path = lora_file(path)
    if adapter is None:
        adapter = _adapter_name(path)
    _check_weights({adapter: weight})
    models = dict(_components(pipe))
    lora, params, header = read_lora_file_with_params(path, modules={c: module_listing(m) for c, m in models.items()})
    components = sorted({k.split(".", 1)[0] for k in [*lora, *params]})
    for component in components:
        if component not in models:
            raise LoraFormatError(
                f"{path}: the file has {component} layers but the pipeline has no {component}; "
                f"it looks made for {guess_architecture(lora)}"
            )
        if adapter in _adapter_names(models[component]):
            raise ValueError(f"adapter {adapter!r} is already loaded; pass adapter= to load {path} under another name")
    # check every component (and a learned token's file) before changing any: a bad file leaves the pipeline as it was
    plans = {c: _plan(models[c], c, lora, adapter, strict, str(path)) for c in components}
    param_plans = {c: _param_plan(models[c], c, params, strict, str(path)) for c in components}
    meta = our_metadata(header)
    tokens = _learned_tokens(pipe, path, meta.get("embedding_file"), meta.get("trigger_words")) + _bundled_tokens(pipe, path, header)
    patched, done = 0, []
    try:
        for component, plan in plans.items():
            model = models[component]
            patched += _apply_plan(model, plan, adapter, weight)
            done.append(model)
            if param_plans[component]:
                param_deltas(model, create=True).add(adapter, param_plans[component], weight)
                _apply_params(model)
                patched += len(param_plans[component])
            model.__dict__.setdefault(_META_ATTR, {})[adapter] = meta
        for tok, enc, vectors in tokens:
            pipe.load_textual_inversion([{token: vector} for token, vector in vectors.items()], token=list(vectors),
                                        tokenizer=getattr(pipe, tok), text_encoder=getattr(pipe, enc))
    except BaseException:  # e.g. the UNet's fuse refused it after the text encoder took it: take it out there too
        for model in done:
            _delete_from_model(model, adapter)
        raise
    logger.info("loaded %s as adapter %r into %d layers", path, adapter, patched)
    return adapter


def load_embedding(pipe, path: str | os.PathLike, *, token: str | None = None) -> str:
    """Load a textual-inversion file (A1111's ``embeddings/``: ``emb_params``, diffusers' ``{token: vectors}``, SDXL's
    ``clip_l`` + ``clip_g`` into both text encoders) as a new token, by default the file's name as A1111 names it;
    the token then stands for all its vectors in a prompt. A name that is already a word piece of the tokenizer
    (``tiny``) goes in as ``<name>``; ``lora_diffusion.prompts`` reads the plain name as A1111 does. Returns the name;
    a token the tokenizer knows already is left as it is.

    Example:
        >>> load_embedding(pipe, "embeddings/EasyNegative.safetensors")
        >>> image = pipe("a cat", negative_prompt="EasyNegative").images[0]
    """
    from .formats import read_textual_inversion
    from .prompts import ALIASES_ATTR

    embeddings = read_textual_inversion(path, token)
    (name,) = embeddings
    tokenizer = pipe.tokenizer
    piece = name in tokenizer.get_vocab() and name not in tokenizer.added_tokens_encoder
    internal = f"<{name}>" if piece else name
    loads = _token_loads(pipe, Path(path), {internal: embeddings[name]})
    for tok, enc, vectors in loads:
        pipe.load_textual_inversion([{t: v} for t, v in vectors.items()], token=list(vectors),
                                    tokenizer=getattr(pipe, tok), text_encoder=getattr(pipe, enc))
    if piece:  # prompts name it by its word pieces: A1111's match of the name's tokens
        for tok in ("tokenizer",) if "*" in embeddings[name] else ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(pipe, tok)
            ids = tuple(tokenizer(name, add_special_tokens=False).input_ids)
            tokenizer.__dict__.setdefault(ALIASES_ATTR, {})[ids] = tokenizer.convert_tokens_to_ids(internal)
    return name


def _adapter_name(path: Path) -> str:
    """A file's name without extension; for a folder or a file of a fixed name (diffusers' ``pytorch_lora_weights``,
    PEFT's ``adapter_model``), the folder's name, above a ``unet`` / ``text_encoder`` sub-folder (PEFT's)."""
    if path.is_file() and path.stem not in ("pytorch_lora_weights", "adapter_model"):
        return path.stem
    folder = path if path.is_dir() else path.parent
    return folder.parent.name if folder.name in COMPONENTS and folder.parent.name else folder.name


# An SDXL learned-token file: its key per text encoder (and the pipeline's tokenizer / encoder attributes), in the
# pipeline's order; training writes it (``training.loop.PivotalToken``), ``load_lora`` reads it
SDXL_EMBEDDING_KEYS = (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2"))


def _learned_tokens(pipe, source: Path, name: object, trigger_words: object) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """The learned tokens that a LoRA's metadata names (``embedding_file``, a file beside the LoRA: see
    ``formats.read_embedding_file``), as ``(tokenizer, text encoder, {token: vectors})`` attribute names of the
    pipeline, checked against each text encoder; a token its tokenizer knows already is left as it is (loading a LoRA
    twice adds it once)."""
    if not name:
        return []
    if Path(str(name)).name != str(name) or str(name) in (".", ".."):
        raise LoraFormatError(f"{source}: embedding_file {name!r} must be a file name beside the LoRA, not a path")
    file = source.parent / str(name)
    if not file.is_file():
        logger.warning("%s was trained with a learned token, but %s is not beside it: the token stays unknown to the "
                       "tokenizer (copy the file next to the LoRA, or pipe.load_textual_inversion it)", source, file.name)
        return []
    return _token_loads(pipe, file, read_embedding_file(file, trigger_words))


def _bundled_tokens(pipe, source: Path, header: dict[str, str]) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """The textual-inversion embeddings bundled in a LoRA file (``bundle_emb.<name>.*``, A1111 / OneTrainer), each
    under its name as the token."""
    return _token_loads(pipe, source, read_bundled_embeddings(source)) if "_bundled_embeddings" in header else []


def _token_loads(pipe, source: Path, embeddings: dict[str, dict[str, torch.Tensor]]) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """``{token: {"*": vectors}}`` into the (first) text encoder, ``{token: {"clip_l": .., "clip_g": ..}}`` (SDXL) into
    both, as ``_new_tokens`` loads."""
    loads = []
    for token, parts in embeddings.items():
        if "*" in parts:
            loads.append(("tokenizer", "text_encoder", {token: parts["*"]}))
            continue
        if getattr(pipe, "text_encoder_2", None) is None:
            raise LoraFormatError(f"{source}: the embedding of {token!r} is SDXL's (clip_l, clip_g); this pipeline has one text encoder")
        loads += [(tok, enc, {token: parts[key]}) for key, tok, enc in SDXL_EMBEDDING_KEYS]
    return _new_tokens(pipe, source, loads)


def _new_tokens(pipe, source: Path, loads: list[tuple[str, str, dict[str, torch.Tensor]]]) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """``loads`` (tokenizer, text encoder, ``{token: vectors}``) without the tokens a tokenizer knows already (loading
    a LoRA twice adds them once), each vector checked against its text encoder's width; empty loads dropped."""
    out = []
    for tok, enc, vectors in loads:
        vocab = getattr(pipe, tok).get_vocab()
        vectors = {token: vector for token, vector in vectors.items() if token not in vocab}
        width = getattr(pipe, enc).get_input_embeddings().weight.shape[1]
        for token, vector in vectors.items():
            if vector.shape[-1] != width or not bool(torch.isfinite(vector).all()):
                what = "this text encoder" if enc == "text_encoder" else enc
                raise LoraFormatError(f"{source}: the vector of {token!r} has shape {tuple(vector.shape)}; {what} needs "
                                      f"finite vectors {width} wide")
        if vectors:
            out.append((tok, enc, vectors))
    return out


# ---------------------------------------------------------------------------------------------- weights, on/off
def list_adapters(pipe) -> dict[str, list[str]]:
    """Adapter names per component, e.g. ``{"unet": ["style"], "text_encoder": ["style"]}``."""
    return {c: names for c, m in _components(pipe) if (names := _adapter_names(m))}


def set_adapters(
    pipe,
    weights: dict[str, float],
    *,
    text_encoder: dict[str, float] | float | None = None,
    blocks: dict | list | None = None,
) -> None:
    """Make exactly the adapters in ``weights`` active, with these weights (negative allowed).

    ``text_encoder``: separate text-encoder weights (A1111's te / unet, ComfyUI's strength_clip /
    strength_model; SDXL: both encoders): a dict overriding ``weights`` per adapter there (an adapter named only
    here is active in the text encoder only), or one number for every adapter. Default: ``weights`` apply to both.
    ``blocks``: per-block UNet multipliers, either global or ``{adapter: spec}``; a spec is a diffusers-style
    dict ``{"down": 0.3, "mid": 0, "up": {"block_0": [1.0, 0.5, 0.2]}}`` or a LoRA Block Weight vector
    (17 values for SD1, 12 for SDXL; its BASE value scales the text encoders). See ``blend.block_factor``.
    A layer's effective weight is ``weight * block factor``; the forward stays one concatenated matmul pair.

    Works fused or not: while fused, each layer's weight is recomputed as its saved base plus the new delta
    (one concatenated matmul per layer, without reloading), which equals fusing afresh bit for bit.

    Example:
        >>> set_adapters(pipe, {"style": 0.8, "subject": 1.0}, text_encoder={"style": 0.5})
        >>> set_adapters(pipe, {"style": 1.0}, blocks={"style": {"down": 0, "mid": 0.5, "up": 1}})
    """
    layers = {component: list(lora_layers(model)) for component, model in _components(pipe)}  # one walk each
    models = dict(_components(pipe))
    stores = {component: store for component, model in models.items() if (store := param_deltas(model)) is not None}
    known = {n for found in layers.values() for _, layer in found for n in layer.specs} | {n for st in stores.values() for n in st.adapters()}
    te_weights = dict(weights)
    if isinstance(text_encoder, (int, float)):
        te_weights = {n: float(text_encoder) for n in weights}
    elif text_encoder is not None:
        te_weights.update(text_encoder)
    _check_weights(weights)
    _check_weights(te_weights, " in the text encoder")
    per_adapter = isinstance(blocks, dict) and bool(blocks) and set(blocks) <= known and not set(blocks) & {"down", "mid", "up"}
    specs = blocks if per_adapter else {n: blocks for n in set(weights) | set(te_weights)}
    unknown = sorted((set(weights) | set(te_weights) | (set(blocks) if per_adapter else set())) - known)
    if unknown:
        raise KeyError(f"no adapter named {unknown}; loaded adapters: {sorted(known)}")
    lpb = getattr(getattr(models.get("unet"), "config", None), "layers_per_block", 2)  # (blocks: UNet)
    lpb = lpb if isinstance(lpb, int) else 2
    for spec in specs.values():
        check_blocks(spec, lpb)
    changed: list[tuple[str, LoraLayer, tuple]] = []
    to_fuse: list[tuple[str, LoraLayer]] = []  # fused models' layers: each fused again, even one with nothing fused yet
    resync: list[LoraLayer] = []  # the others: the scales a compiled forward reads are refreshed
    stored = {component: store.state() for component, store in stores.items()}
    try:
        for component, found in layers.items():
            base = te_weights if component.startswith("text_encoder") else weights
            blocked = any(specs.get(n) is not None for n in base)  # (else every factor is 1: no call per layer)
            fused = bool(getattr(models[component], DETACHED_ATTR, {}))
            for path, layer in found:
                changed.append((path, layer, layer.weight_state()))
                layer.set_weights({n: w * block_factor(specs.get(n), component, path, lpb) for n, w in base.items()}
                                  if blocked else base, fuse_now=False)
                if fused:
                    to_fuse.append((path, layer))
                else:
                    resync.append(layer)
        fuse_layers(to_fuse)  # one sync for the pipeline
        sync_scales(resync)
        for component, store in stores.items():  # parameter deltas: a module's weight, as its layer's
            base = te_weights if component.startswith("text_encoder") else weights
            store.set_weights(lambda path, n: base[n] * block_factor(specs.get(n), component, path.rsplit(".", 1)[0], lpb) if n in base else None)
            _apply_params(models[component])
    except BaseException:  # (fuse_layers put the fused weights back)
        for _, layer, state in changed:
            layer.restore_weights(state)
        for component, store in stores.items():
            store.set_state(stored[component])
            _apply_params(models[component])
        raise


def _set_disabled(pipe, disabled: bool) -> None:
    before = snapshot(pipe)
    try:
        for _, model in _components(pipe):
            was_fused = bool(getattr(model, DETACHED_ATTR, {}))
            if disabled and was_fused:
                # a fused delta lives in the base weights: take it out, and remember to put it back on enable
                unfuse_model(model)
                model.__dict__[_REFUSE_ATTR] = True
            model.__dict__[_DISABLED_ATTR] = disabled
            for _, layer in lora_layers(model):
                layer.disabled = disabled
            _apply_params(model)
            if not disabled and model.__dict__.pop(_REFUSE_ATTR, False):
                fuse_model(model)
    except BaseException:  # a refused fuse on enable: every component stays as it was (disabled, fuse waiting)
        restore(before)
        raise


def snapshot(pipe) -> list:
    """What ``set_adapters``, ``disable_lora``/``enable_lora`` and ``fuse``/``unfuse`` change, per component, for
    ``restore``: each layer's active adapters, weights and on/off, the model's on/off, a fuse waiting for
    ``enable_lora``, and whether it is fused. (Adapters themselves are not copied: delete the ones added since.)"""
    return [(model, model.__dict__.get(_DISABLED_ATTR, False), model.__dict__.get(_REFUSE_ATTR, False),
             bool(getattr(model, DETACHED_ATTR, {})), [(layer, layer.weight_state(), layer.disabled) for _, layer in lora_layers(model)],
             store.state() if (store := param_deltas(model)) is not None else {})
            for _, model in _components(pipe)]


def restore(state: list) -> None:
    """Put back a ``snapshot`` (the layers it lists that still hold their adapters)."""
    for model, disabled, refuse, fused, layers, params in state:
        unfuse_model(model)
        for layer, weights, layer_disabled in layers:
            layer.restore_weights((weights[0], {n: w for n, w in weights[1].items() if n in layer.specs}))
            layer.disabled = layer_disabled
        model.__dict__[_DISABLED_ATTR] = disabled
        if (store := param_deltas(model)) is not None:
            store.set_state(params)
            _apply_params(model)
        if fused:
            fuse_model(model)
        if refuse:
            model.__dict__[_REFUSE_ATTR] = True


def enable_all(pipe) -> None:
    """Every layer on, fused or not as it is, without ``enable_lora``'s fuse (for a caller that will ``restore``)."""
    for _, model in _components(pipe):
        model.__dict__[_DISABLED_ATTR] = False
        for _, layer in lora_layers(model):
            layer.disabled = False
        _apply_params(model)


def disable_lora(pipe) -> None:
    """Run the pipeline as the base model (adapters kept; a fused pipeline is unfused until ``enable_lora``).

    While disabled, adapters loaded later stay off too, and ``fuse`` waits for ``enable_lora`` (as in diffusers,
    where a disabled model runs the base weights whatever was fused)."""
    _set_disabled(pipe, True)


def enable_lora(pipe) -> None:
    """Undo ``disable_lora`` (fusing if the pipeline was fused, or ``fuse`` was called, while disabled; if that
    fuse is refused, the pipeline stays disabled as it was)."""
    _set_disabled(pipe, False)


def delete_adapter(pipe, adapter: str) -> None:
    """Remove one adapter from every component (``KeyError`` if none holds it, as PEFT)."""
    models = [model for _, model in _components(pipe)]
    if not any(adapter in _adapter_names(model) for model in models):
        known = sorted({n for model in models for n in _adapter_names(model)})
        raise KeyError(f"no adapter named {adapter!r}; loaded adapters: {known}")
    for model in models:
        _delete_from_model(model, adapter)


def _check_weights(weights: dict, where: str = "") -> None:
    """``ValueError`` naming the adapter for a weight that is not a finite number (NaN or Inf: a black image)."""
    for name, weight in weights.items():
        finite_number(weight, f"adapter {name!r}: the weight{where}")


def cache_merged_weights(pipe, enabled: bool = True) -> None:
    """Keep each LoRA layer's merged weight ``W + sum w (alpha/r) B A`` between unfused inference calls (also
    for layers loaded later), so that they run the base model's kernels alone: the speed of ``fuse`` without its
    step, at the same memory (one extra copy of each wrapped weight: ~190 MB for SD1.5's UNet attention in
    fp16, ~1.9 GB for SDXL's). A layer makes its merged weight again in the first call after a ``set_adapters``,
    a load, an optimizer step or a ``.to()``; training (autograd) never uses it. Outputs equal the unfused call's
    to rounding: bit for bit in the layers where that call takes the merged weight too
    (``layers.merged_forward_pays``), the low-rank pair's rounding elsewhere. ``pipe``: a pipeline, or one model
    (UNet, text encoder). ``enabled=False`` frees the kept weights.

    Compiled models: call it *after* ``torch.compile``, on the pipeline holding the compiled wrapper (or on the
    wrapper). A hook on that wrapper re-merges the changed layers eagerly before each call, in place, and its graph
    runs the base model's ops on the kept weights: a re-weight costs no recompile and the CUDA graphs of
    ``mode="reduce-overhead"`` stay valid. A wrapper compiled without it (later, or by hand) never reads them,
    unless it runs in another thread during a hooked wrapper's call (the graphs are told apart by one flag).

    Example:
        >>> cache_merged_weights(pipe)                  # e.g. A1111-style generation with changing blends
        >>> set_adapters(pipe, {"style": 0.7})          # the next call re-merges the changed layers
    """
    models = [unwrap(pipe)] if isinstance(pipe, nn.Module) else [model for _, model in _components(pipe)]
    for model in models:
        model.__dict__[MERGE_CACHE_ATTR] = bool(enabled)
        for _, layer in lora_layers(model):
            layer.merge_cache = bool(enabled)
            if not enabled:
                layer.drop_kept()
    for wrapper in _compiled_wrappers(pipe):
        _hook_kept(wrapper, enabled)


_KEPT_HOOKS_ATTR = "_lora_kept_hooks"  # on a compiled wrapper: the handles of ``_hook_kept``'s two hooks


def _compiled_wrappers(pipe) -> list[nn.Module]:
    """The ``torch.compile`` wrappers that ``pipe`` is or holds as its models."""
    held = [pipe] if isinstance(pipe, nn.Module) else [getattr(pipe, name, None) for name in COMPONENTS]
    return [model for model in held if is_compiled(model)]


def _hook_kept(wrapper: nn.Module, enabled: bool) -> None:
    """Hook (or unhook) a compiled wrapper so that its graph reads the kept merged weights: before each call every
    LoRA layer's ``lora_kept`` is brought up to date (eagerly: the hook of a wrapper runs outside its graph) and
    ``layers._KEPT_IN_GRAPH`` holds until the call returns or raises; each wrapper is hooked once. Between changes
    the layers are checked in bulk (``layers.kept_holds``: ~1 us a layer), not walked and checked one by one."""
    for handle in wrapper.__dict__.pop(_KEPT_HOOKS_ATTR, ()):
        handle.remove()
    if not enabled:
        return
    model, outer, state = unwrap(wrapper), [], {}

    def before(module, args):
        snapshot = state.get("snapshot")
        if snapshot is not None and _layers.kept_holds(snapshot):
            for layer in snapshot[-1]:
                layer.refresh_kept()
        else:
            state["snapshot"] = _layers.kept_snapshot([layer for _, layer in lora_layers(model)])
        outer.append(_layers._KEPT_IN_GRAPH)
        _layers._KEPT_IN_GRAPH = True

    def after(module, args, output):
        if outer:  # (not when the pre-hook itself raised)
            _layers._KEPT_IN_GRAPH = outer.pop()

    wrapper.__dict__[_KEPT_HOOKS_ATTR] = (wrapper.register_forward_pre_hook(before),
                                          wrapper.register_forward_hook(after, always_call=True))


def _delete_from_model(model: nn.Module, adapter: str) -> None:
    was_fused = bool(getattr(model, DETACHED_ATTR, {}))
    attach(model)
    for _, layer in list(lora_layers(model)):
        if adapter in layer.specs:
            layer.delete_adapter(adapter)  # a fused layer is re-fused without it
    if was_fused:
        detach(model)
    if (store := param_deltas(model)) is not None:
        store.delete(adapter)
        _apply_params(model)
    getattr(model, _META_ATTR, {}).pop(adapter, None)


def _apply_params(model: nn.Module) -> None:
    """Write a model's parameter deltas at their weights (the base values while the model is disabled)."""
    store = param_deltas(model)
    if store is not None:
        store.apply(disabled=model.__dict__.get(_DISABLED_ATTR, False))


# ---------------------------------------------------------------------------------------------- fuse
def _rows_on_devices(rows: list[tuple[LoraLayer, list[float]]]) -> list[torch.Tensor]:
    """Each ``(layer, row of floats)`` as an fp32 tensor on the layer's device: slices of one tensor per device,
    so that any number of layers costs one host-device copy."""
    return floats_on_devices([(layer.base_layer.weight.device, torch.float32, row) for layer, row in rows])


def sync_scales(layers: list[LoraLayer]) -> None:
    """Refresh what a compiled model reads (each layer's ``lora_scales``) with one host-device copy for all, and
    the in-place updates (a re-weight: same adapters, new weights) in one multi-tensor copy."""
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer, values in zip(layers, _rows_on_devices([(layer, layer.compiled_scale_row()) for layer in layers])):
        layer.sync_scales(values, copies)
    if copies:
        with torch.no_grad():
            torch._foreach_copy_([buffer for buffer, _ in copies], [values for _, values in copies])


def fuse_layers(layers: list[tuple[str, LoraLayer]]) -> None:
    """(Re-)fuse each ``(path, layer)`` at its current weights with one host-device sync for them all.

    The layers are fused together (``fuse_many``: one batched matmul per shape, their widened factors kept while
    fused), and the new weights are checked together at the end (``all_finite``: a few kernels and one host read
    per device).
    If any fused weight would hold NaN or Inf, every layer goes back to how it was and ``ValueError`` names the
    layers; so it does on any other error on the way.
    """
    plans = [(path, layer, layer.fuse_weights(), dict(layer.fused)) for path, layer in layers]
    plans = [plan for plan in plans if plan[2] or plan[3]]  # a layer with nothing to fuse, now or before, stays as it is
    fused: dict[torch.device, list[torch.Tensor]] = {}  # the new weights, checked together per device
    try:
        for weight in fuse_many([(layer, weights) for _, layer, weights, _ in plans]):
            fused.setdefault(weight.device, []).append(weight)
        if all(all_finite(weights) for weights in fused.values()):
            return
        bad = [path for path, layer, _, _ in plans if not bool(torch.isfinite(layer.base_layer.weight).all())]
    except BaseException:
        _restore_fused(plans)
        raise
    _restore_fused(plans)
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise ValueError(f"refusing to fuse: {bad[0]}{more} would get NaN or Inf weights (a NaN/Inf in an adapter, or "
                     f"weights too large for {plans[0][1].base_layer.weight.dtype}); nothing was changed")


def _restore_fused(plans: list[tuple[str, LoraLayer, dict[str, float], dict[str, float]]]) -> None:
    for _, layer, _, previous in plans:
        layer.restore_fused(previous)


def fuse_model(model: nn.Module) -> None:
    """Fuse one model's active adapters into its weights and swap the wrappers out (zero added latency); while
    ``disable_lora`` is in force, the fuse waits for ``enable_lora``."""
    model = unwrap(model)
    if model.__dict__.get(_DISABLED_ATTR, False):
        model.__dict__[_REFUSE_ATTR] = True
        return
    was_fused = bool(getattr(model, DETACHED_ATTR, {}))
    attach(model)
    try:
        fuse_layers(list(lora_layers(model)))
    except BaseException:
        if was_fused:  # fuse_layers put the old fused weights back
            detach(model)
        raise
    detach(model)


def unfuse_model(model: nn.Module) -> None:
    """Restore one model's base weights exactly and put the LoRA wrappers back (and forget a fuse that waits
    for ``enable_lora``)."""
    model = unwrap(model)
    model.__dict__.pop(_REFUSE_ATTR, None)
    attach(model)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.unfuse(sync=False)
    sync_scales(layers)


def fuse(pipe) -> None:
    """Bake the active adapters at their weights into the base weights (fp32 accumulation, one cast).

    After ``fuse`` the UNet and text encoder run their original modules: generation costs exactly what the base
    model costs. ``set_adapters`` while fused re-fuses from the saved base weights. Refuses NaN/Inf adapters, and
    then no component is fused that was not before.
    """
    fused_here = []
    try:
        for _, model in _components(pipe):
            if not getattr(model, DETACHED_ATTR, {}):
                fused_here.append(model)
            fuse_model(model)
    except BaseException:
        for model in fused_here:
            unfuse_model(model)
        raise


def unfuse(pipe) -> None:
    """Take fused adapters out again: the base weights come back exactly (bit-identical)."""
    for _, model in _components(pipe):
        unfuse_model(model)

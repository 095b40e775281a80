"""cloneofsimo/lora (the original ``lora_diffusion``) safetensors files, as pure functions.

Keys are positional: ``unet:{i}:up`` / ``unet:{i}:down`` and ``text_encoder:{i}:up|down``; the header holds
``unet`` = JSON list of target class names (``["CrossAttention", "Attention", "GEGLU"]``) and
``unet:{i}:rank``. Index ``i`` follows module traversal order: every module whose class is a target, in
``named_modules`` order, then that module's Linear descendants in their order (``to_q, to_k, to_v, to_out.0``
for attention, ``proj`` for GEGLU, ``k_proj, v_proj, q_proj, out_proj`` for CLIPAttention); Conv2d
descendants too when ``ResnetBlock2D`` is a target. The scale is baked into ``up`` (alpha = rank). Learned token
embeddings (keys such as ``<s1>``) are not LoRA layers: they are reported, not loaded.

To turn positions into module paths the reader needs the model's module listing ``[(path, class name), ...]``
in ``named_modules`` order (``pipeline.load_lora`` passes the real one); without it, the SD 1.x/2.x UNet and
CLIP text-encoder layout is used.

Example:
    >>> lora = from_cloneofsimo(state, header)                       # SD1 layout assumed
    >>> lora = from_cloneofsimo(state, header, modules={"unet": module_listing(pipe.unet)})
"""

from __future__ import annotations

import json
import logging
import re

import torch

logger = logging.getLogger(__name__)

__all__ = ["from_cloneofsimo", "is_cloneofsimo", "cloneofsimo_paths", "sd1_module_listing", "learned_tokens"]

_KEY = re.compile(r"(?P<component>[A-Za-z_]+):(?P<index>\d+):(?P<role>up|down)")
EMBED_FLAG = "<embed>"

Listing = list[tuple[str, str]]  # (module path, class name) in named_modules order


def is_cloneofsimo(state: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> bool:
    """All keys are ``<component>:<i>:up|down`` or learned-token embeddings flagged in the header."""
    header = header or {}
    lora_keys = [k for k in state if _KEY.fullmatch(k)]
    return bool(lora_keys) and all(_KEY.fullmatch(k) or header.get(k) == EMBED_FLAG for k in state)


def learned_tokens(header: dict[str, str]) -> list[str]:
    """The learned token embeddings (``<s1>``...) a cloneofsimo file holds beside its LoRA layers."""
    return [k for k, v in header.items() if v == EMBED_FLAG]


def is_format_key(key: str, value: str) -> bool:
    """A cloneofsimo header entry that describes the file's layout: target lists, ranks, token flags."""
    return value == EMBED_FLAG or key in ("unet", "text_encoder") or re.fullmatch(r"[A-Za-z_]+:\d+:rank", key) is not None


def sd1_module_listing(component: str) -> Listing:
    """The target-relevant part of the SD 1.x/2.x ``named_modules`` traversal (``unet`` or ``text_encoder``)."""
    out: Listing = []
    if component == "text_encoder":
        for i in range(12):
            p = f"text_model.encoder.layers.{i}.self_attn"
            out += [(p, "CLIPAttention")] + [(f"{p}.{n}", "Linear") for n in ("k_proj", "v_proj", "q_proj", "out_proj")]
        return out
    if component != "unet":
        raise ValueError(f"no built-in SD1 layout for component {component!r}")
    # diffusers registers down_blocks, up_blocks, then mid_block: that is the traversal order
    blocks = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    blocks += [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
    blocks += ["mid_block.attentions.0"]
    for block in blocks:
        t = f"{block}.transformer_blocks.0"
        for attn in ("attn1", "attn2"):
            out += [(f"{t}.{attn}", "Attention")] + [(f"{t}.{attn}.{n}", "Linear") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        out += [(f"{t}.ff.net.0", "GEGLU"), (f"{t}.ff.net.0.proj", "Linear"), (f"{t}.ff.net.2", "Linear")]
    return out


def cloneofsimo_paths(listing: Listing, targets: list[str]) -> list[str]:
    """Module paths in cloneofsimo's index order: Linear (and, with ``ResnetBlock2D``, Conv2d) descendants of
    every module whose class name is in ``targets``, in traversal order."""
    leaf = {"Linear", "Conv2d"} if "ResnetBlock2D" in targets else {"Linear"}
    out = []
    for path, cls in listing:
        if cls in targets:
            out += [p for p, c in listing if c in leaf and p.startswith(path + ".")]
    return out


def from_cloneofsimo(
    state: dict[str, torch.Tensor],
    header: dict[str, str] | None = None,
    source: str = "state dict",
    *,
    modules: dict[str, Listing] | None = None,
):
    """cloneofsimo state dict -> canonical. ``modules``: component -> module listing (default: SD 1.x layout)."""
    from .formats import LoraFormatError, LoraWeights, _check_pair, with_text_model

    header = header or {}
    modules = modules or {}
    tokens = [k for k in state if header.get(k) == EMBED_FLAG]
    if tokens:
        logger.warning("%s: learned token embeddings %s are not LoRA layers and were not loaded", source, tokens)
    by_component: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        m = _KEY.fullmatch(key)
        if m:
            by_component.setdefault(m["component"], {}).setdefault(int(m["index"]), {})[m["role"]] = tensor
    lora = {}
    for component, layers in by_component.items():
        if component not in ("unet", "text_encoder"):
            raise LoraFormatError(f"{source}: cloneofsimo component {component!r} is not supported (unet, text_encoder)")
        try:
            targets = json.loads(header[component])
        except (KeyError, ValueError):
            raise LoraFormatError(f"{source}: the header has no JSON target list for {component!r}") from None
        if component in modules:
            listing = modules[component]
        elif "ResnetBlock2D" in targets:
            raise LoraFormatError(f"{source}: ResnetBlock2D targets need the model's layout; load the file into a pipeline")
        else:
            listing = sd1_module_listing(component)
        paths = cloneofsimo_paths(listing, targets)
        if sorted(layers) != list(range(len(paths))):
            raise LoraFormatError(
                f"{source}: {component} has {len(layers)} layers (indices {min(layers)}..{max(layers)}) but "
                f"traversing the model's {targets} modules gives {len(paths)}; the file was made for another model"
            )
        for i, path in enumerate(paths):
            if set(layers[i]) != {"up", "down"}:
                raise LoraFormatError(f"{source}: {component}:{i} has only {sorted(layers[i])}")
            a, b = layers[i]["down"], layers[i]["up"]
            key = f"{component}.{with_text_model(path) if component == 'text_encoder' else path}"
            _check_pair(key, a, b, source)
            lora[key] = LoraWeights(a, b, float(a.shape[0]))
    return lora

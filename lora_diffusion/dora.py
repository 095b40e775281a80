"""DoRA modules (weight-decomposed LoRA) as the exact delta they make on the weight they are loaded onto.

A DoRA module holds LoRA factors and a magnitude ``m``; it makes a layer's weight ``W' = m * V / ||V||`` with
``V = W + alpha/r * B A``, normalising either each output row of ``V`` (PEFT's ``lora_magnitude_vector``, LyCORIS'
``wd_on_output``) or each input column (LyCORIS' first DoRA, which A1111 reads). That is not ``W`` plus a low-rank
product, and it depends on ``W``: so a file's DoRA module is read as LoRA factors with their magnitude
(``LoraWeights.magnitude``, shaped to broadcast against the weight: ``[out, 1, ...]`` or ``[1, in, ...]``), and
becomes, when it is loaded into a layer, that layer's exact delta ``D = W' - W``, computed once in fp32 from the
layer's own weight (the unfused one) and kept densely beside an identity (``formats_lycoris.dense_lora``). From
then on it is an adapter like any other: unfused, fused, blended, cached.

At a weight ``w`` the layer gets ``W + w D``, as A1111, ComfyUI and LyCORIS apply a multiplier: ``w = 1`` is the
file's ``W'`` exactly. PEFT puts ``w`` inside the norm instead (``m * V_w / ||V_w||``, ``V_w = W + w s B A``), which
agrees at ``w = 1`` only.
"""

from __future__ import annotations

import torch

from .formats import LoraWeights
from .layers import accumulation_dtype

__all__ = ["magnitude_for", "dora_delta", "as_dense"]


def magnitude_for(magnitude: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``magnitude`` shaped to broadcast against a weight of ``weight_shape``: ``[out, 1, ...]`` (per output row) or
    ``[1, in, ...]`` (per input column). Raises ``ValueError`` naming both shapes for anything else."""
    out, cols, ones = weight_shape[0], weight_shape[1], [1] * (len(weight_shape) - 2)
    shape = tuple(magnitude.shape)
    if magnitude.numel() == out and shape[:1] == (out,) and out > 1:
        return magnitude.reshape(out, 1, *ones)
    if magnitude.numel() == cols and len(shape) >= 2 and shape[:2] == (1, cols):
        return magnitude.reshape(1, cols, *ones)
    raise ValueError(
        f"has a DoRA magnitude of shape {list(shape)}; the layer's weight {list(weight_shape)} needs "
        f"[{out}, 1, ...] (per output row) or [1, {cols}, ...] (per input column)"
    )


def dora_delta(w: LoraWeights, weight: torch.Tensor) -> torch.Tensor:
    """``m * V / ||V|| - W`` with ``V = W + alpha/r * B A``, in fp32 (fp64 for an fp64 weight), in ``weight``'s shape;
    the norm over every axis but the one ``m`` runs along."""
    wide = accumulation_dtype(weight.dtype)
    base = weight.detach().to(wide)
    m = magnitude_for(w.magnitude, base.shape).to(base.device, wide)
    direction = base + w.delta(wide, base.device).reshape(base.shape)
    axes = [d for d in range(base.dim()) if m.shape[d] == 1]
    norm = torch.linalg.vector_norm(direction, dim=axes, keepdim=True).clamp_min(torch.finfo(wide).tiny)
    return direction * (m / norm) - base


def as_dense(w: LoraWeights, weight: torch.Tensor) -> LoraWeights:
    """A DoRA module on ``weight`` as plain LoRA factors of its exact delta (``D`` beside an identity, alpha = rank),
    in fp32 (the layer casts them to its dtype)."""
    from .formats_lycoris import dense_lora

    return dense_lora(dora_delta(w, weight))

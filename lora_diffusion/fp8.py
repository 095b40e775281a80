"""Weights stored in float8 (e4m3fn), each layer casting its weight up for its own call: A1111's "FP8 weight" for
generation, kohya's ``--fp8_base`` for training.

kohya casts the whole model to fp8 and lets autocast cast each weight back at each call. Autograd then keeps the
compute-dtype copy of each layer a gradient passes through until the backward: with the fp8 weights, the step
holds more than the bf16 model's weights (without gradient checkpointing; tested on the tiny UNet). Here the
layers run through ``_FrozenFp8``, which keeps only the fp8 weight (already resident) and casts it again in the
backward: the step holds the weights at one byte each. For generation it casts each weight once per call, where
diffusers' ``enable_layerwise_casting`` hook casts the layer up and back down (two casts and two module walks).
LoRA layers take either (``layers.compute_dtype``).

    >>> layers = store_fp8([("unet", pipe.unet)], torch.bfloat16)   # under autocast, or inputs in bf16
    >>> restore_fp8(layers, torch.bfloat16)                         # the fp8 values in bf16 again
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _autocast_dtype

FP8 = torch.float8_e4m3fn


class _FrozenFp8(torch.autograd.Function):
    """``module``'s op with its fp8 weight cast to ``x``'s dtype; the input gradient casts it again (nothing over
    the fp8 weight is saved; the weight and bias are frozen, so they get no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):  # noqa: D102
        ctx.module, ctx.x_shape = module, x.shape
        ctx.save_for_backward(weight)
        return module._fp8_op(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (weight,) = ctx.saved_tensors
        module, dx = ctx.module, None
        if ctx.needs_input_grad[0]:
            w = weight.to(grad.dtype)
            if isinstance(module, nn.Conv2d):
                dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, module.stride, module.padding, module.dilation,
                                                module.groups)
            else:
                dx = grad @ w
        return dx, None, None, None


class _Fp8Forward:
    """The forward of ``Fp8Linear`` / ``Fp8Conv2d``: through ``_FrozenFp8`` while the weight is fp8, in autocast's
    dtype (the input and bias cast as autocast casts them), else the layer's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8:
            return super().forward(x)
        x = x.to(_autocast_dtype(x) or x.dtype)  # (autocast's dtype where it is on, else the input's)
        return _FrozenFp8.apply(x, self.weight, None if self.bias is None else self.bias.to(x.dtype), self)


class Fp8Linear(_Fp8Forward, nn.Linear):
    """An ``nn.Linear`` whose frozen weight is fp8 (``store_fp8`` sets the class; its state is the Linear's)."""

    def _fp8_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class Fp8Conv2d(_Fp8Forward, nn.Conv2d):
    """An ``nn.Conv2d`` (zero padding) whose frozen weight is fp8, as ``Fp8Linear``."""

    def _fp8_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


_FP8_CLASSES = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def _swappable(module: nn.Module) -> bool:
    """Whether ``module`` can run as ``Fp8Linear`` / ``Fp8Conv2d``: a plain Linear, or a Conv2d with numeric zero
    padding (every SD and CLIP layer); ``store_fp8`` leaves other subclasses as they are."""
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) is nn.Linear


def store_fp8(models: list[tuple[str, nn.Module]], compute_dtype: torch.dtype) -> list[nn.Module]:
    """The weights of the ``nn.Linear`` / ``nn.Conv2d`` layers of each ``(name, model)`` (LoRA-wrapped ones included;
    our LoRA factors are not such layers; subclasses and padded modes other than zeros are left as they are) stored
    as float8 e4m3fn, rounded to nearest, and frozen, as A1111's FP8 weight stores them. Each layer computes in
    autocast's dtype where autocast is on, else its input's; ``compute_dtype`` (what the model computes in) is what
    LoRA factors loaded onto it take. Biases, norms, embeddings and the LoRA factors keep their dtype. Returns the
    layers changed, for ``restore_fp8``. ``ValueError`` names a weight past fp8's range (+-448); then nothing
    changes."""
    found = [(f"{name}.{path}.weight", module) for name, model in models for path, module in model.named_modules()
             if _swappable(module) and module.weight.dtype != FP8]
    if not found:
        return []
    with torch.no_grad():
        peaks = torch._foreach_norm([module.weight for _, module in found], float("inf"))
        peaks = torch.stack([peak.to(peaks[0].device) for peak in peaks]).tolist()
    limit = torch.finfo(FP8).max
    for (where, _), peak in zip(found, peaks):
        if not peak <= limit:  # (NaN too)
            raise ValueError(f"{where} holds {peak:g}, past float8_e4m3fn's range (+-{limit:g})")
    for _, module in found:
        module.weight.requires_grad_(False)
        module.weight.data = module.weight.data.to(FP8)
        module.fp8_compute_dtype = compute_dtype  # (``layers.compute_dtype`` reads it)
        module.__class__ = _FP8_CLASSES[type(module)]
    return [module for _, module in found]


def restore_fp8(layers: list[nn.Module], dtype: torch.dtype) -> None:
    """``store_fp8``'s layers back to their class, their weights in ``dtype`` holding their fp8 values (what the
    LoRA was trained against)."""
    plain = {fp8: base for base, fp8 in _FP8_CLASSES.items()}
    for module in layers:
        module.weight.data = module.weight.data.to(dtype)
        module.__class__ = plain[type(module)]
        del module.fp8_compute_dtype

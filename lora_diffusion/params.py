"""Deltas a LoRA file makes to parameters outside the LoRA layers: biases, norm scales, embedding tables.

ComfyUI's "Extract and Save Lora" (its default ``bias_diff``) and A1111's full networks write, beside the LoRA
factors of the Linear / Conv weights, ``.diff_b`` (a bias delta, any module), ``.diff`` of a 1-D weight (a GroupNorm
or LayerNorm scale) and LoRA factors of the text encoders' embedding tables. None of them is a LoRA layer's business,
and all are small or rarely changed, so they are written into the parameter itself, per adapter and weight:
``p = p0 + sum_active w * delta`` (fp32, rounded once). The forward is untouched (exact, and free); a weight of 0,
``disable_lora``, deleting the adapter or ``remove_lora`` give ``p0`` back bit for bit. ``fuse`` has nothing to do
for them. A model keeps its deltas in one ``ParamDeltas`` (``model.__dict__[PARAMS_ATTR]``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ParamDelta", "ParamDeltas", "PARAMS_ATTR", "param_deltas"]

PARAMS_ATTR = "_lora_param_deltas"


class ParamDelta(NamedTuple):
    """A parameter's delta at weight 1: ``delta`` itself, or ``alpha / r * B @ A`` (an embedding table's LoRA:
    ``B [rows, r]``, ``A [r, width]``)."""

    delta: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    alpha: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape) if self.delta is not None else (self.B.shape[0], self.A.shape[1])

    def value(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.to(device, dtype)
        a, b = self.A.to(device, dtype), self.B.to(device, dtype)
        return (b @ a) * (self.alpha / a.shape[0])


class _Entry:
    __slots__ = ("param", "base", "deltas", "weights")

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.base = param.detach().clone()  # p0
        self.deltas: dict[str, ParamDelta] = {}
        self.weights: dict[str, float] = {}  # the active adapters' effective weights


class ParamDeltas:
    """One model's parameter deltas, by parameter path (``down_blocks.0.resnets.0.norm1.bias``) and adapter."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def adapters(self) -> set[str]:
        return {name for entry in self.entries.values() for name in entry.deltas}

    def add(self, adapter: str, deltas: dict[str, tuple[nn.Parameter, ParamDelta]], weight: float) -> None:
        """Add ``adapter``'s deltas (``{path: (parameter, delta)}``, checked by the caller) at ``weight``; written at
        the next ``apply``."""
        for path, (param, delta) in deltas.items():
            entry = self.entries.get(path) or self.entries.setdefault(path, _Entry(param))
            entry.deltas[adapter] = delta
            entry.weights[adapter] = float(weight)

    def delete(self, adapter: str) -> None:
        for entry in self.entries.values():
            entry.deltas.pop(adapter, None)
            entry.weights.pop(adapter, None)

    def state(self) -> dict[str, dict[str, float]]:
        """The active adapters' weights per parameter, for ``set_state``."""
        return {path: dict(entry.weights) for path, entry in self.entries.items()}

    def set_state(self, state: dict[str, dict[str, float]]) -> None:
        for path, entry in self.entries.items():
            entry.weights = {n: w for n, w in state.get(path, {}).items() if n in entry.deltas}

    def set_weights(self, weight_of) -> None:
        """``weight_of(path, adapter)``: the adapter's effective weight on that parameter, or ``None`` (inactive)."""
        for path, entry in self.entries.items():
            weights = {n: weight_of(path, n) for n in entry.deltas}
            entry.weights = {n: w for n, w in weights.items() if w is not None}

    @torch.no_grad()
    def apply(self, disabled: bool = False) -> None:
        """Write ``p0 + sum w * delta`` (``p0`` while ``disabled``) into every parameter; a parameter left without
        deltas gets ``p0`` back and is forgotten."""
        for path in list(self.entries):
            entry = self.entries[path]
            param, base = entry.param, entry.base.to(entry.param.device)
            live = {} if disabled else {n: w for n, w in entry.weights.items() if w != 0.0}
            if not live:
                param.copy_(base)
            else:
                wide = torch.promote_types(param.dtype, torch.float32)
                total = base.to(wide)
                for name, w in live.items():
                    total = total + entry.deltas[name].value(wide, param.device) * w
                param.copy_(total)
            if not entry.deltas:
                del self.entries[path]


def param_deltas(model: nn.Module, create: bool = False) -> ParamDeltas | None:
    """The model's ``ParamDeltas`` (made with ``create``)."""
    store = model.__dict__.get(PARAMS_ATTR)
    if store is None and create:
        store = model.__dict__[PARAMS_ATTR] = ParamDeltas()
    return store

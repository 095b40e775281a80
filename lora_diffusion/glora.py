"""LyCORIS GLoRA and (IA)^3 modules as the exact delta they make on the weight they are loaded onto.

GLoRA ("generalised LoRA") adds to a layer's weight a low-rank transform of that weight and a LoRA:
``W' = W + s (W A + B)``, ``A = A1 A2`` ``[in, in]`` and ``B = B1 B2`` ``[out, in * k * k]``, both of rank ``r``,
``s = alpha / r`` (1 without an alpha). Files hold ``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight`` and
``alpha`` per module, in one of two layouts, told apart by their shapes as ComfyUI tells them:

- LyCORIS 3.0 and later (what ComfyUI calls the new one): ``a1`` ``[in, r]``, ``a2`` ``[r, in]``, ``b1``
  ``[out, r]``, ``b2`` ``[r, in(, k, k)]`` (a conv's ``a1`` / ``a2`` / ``b1`` as 1x1 kernels): ``A = a1 a2``,
  ``B = b1 b2``. (Its ``use_tucker`` never makes a working ``bm.weight`` core: LyCORIS 4 drops it for kernels past
  1x1, 3.0 cannot merge it, neither loads it back; the reader refuses one.)
- LyCORIS 1.9 to 2.x (ComfyUI's old one, the only one A1111 reads), Linear and 1x1 conv layers: ``a1`` ``[r, in]``,
  ``a2`` ``[in, r]``, ``b1`` ``[r, in]``, ``b2`` ``[out, r]`` (1x1 kernels on a conv's): ``A = a2 a1``, ``B = b2 b1``.

A conv's ``W A`` contracts ``W``'s input channels: ``(W A)[o, j, ...] = sum_i W[o, i, ...] A[i, j]``. The scale
``alpha / r`` is LyCORIS' own weight (its merge, every version) and ComfyUI's. A1111 applies no alpha to GLoRA
(``calc_scale`` is 1 without a ``dim``), and LyCORIS 1.9 - 2.x trained through a forward that applied it twice,
``(alpha / r)^2``: all agree where ``alpha = r``.

(IA)^3 scales a layer's output rows (or, with ``on_input``, its input columns) by ``1 + v``: ``W' = W * (1 + v)``,
``weight`` ``[out]`` / ``[in]`` (a conv's ``[1, n, 1, 1]``), ``on_input`` 0 or 1; no alpha.

Both depend on ``W``, so, as OFT (``lora_diffusion.oft``), such a module is read as ``LoraWeights.oft`` (empty
factors) and becomes, when loaded into a layer, that layer's exact delta ``D = W' - W``, computed once in fp32 (fp64
for an fp64 weight) from the layer's own (unfused) weight and kept densely. At a weight ``w`` the layer gets
``W + w D``, as LyCORIS, A1111 and ComfyUI apply a multiplier.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layers import accumulation_dtype

__all__ = ["Glora", "Ia3"]


def _wide(weight: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(weight.dtype)


class Glora(NamedTuple):
    """One GLoRA module as a file holds it (see the module docstring)."""

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: float | None = None

    kind = "GLoRA"
    described = "a GLoRA module"

    def _matrices(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.reshape(t.shape[0], -1) for t in (self.a1, self.a2, self.b1, self.b2))

    @property
    def old_layout(self) -> bool:
        """Whether the factors are in the first LyCORIS layout (``a1`` ``[r, in]``, ``a2`` ``[in, r]``). Shapes fit
        both layouts only for a square weight; then ``a2`` ``[in, r]`` (the taller) is the old one, as ComfyUI
        decides with the weight at hand."""
        old, new = self._fits()
        a2 = self._matrices()[1]
        return old and (not new or a2.shape[0] >= a2.shape[1])

    def _fits(self) -> tuple[bool, bool]:
        """Whether the factors' shapes fit the first layout, and the second."""
        a1, a2, b1, b2 = self._matrices()
        old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1] and a1.shape[1] == a2.shape[0] == b1.shape[1]
        new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0] and a1.shape[0] == a2.shape[1]
        return old, new

    @property
    def rank(self) -> int:
        return int(self.a1.shape[0] if self.old_layout else self.a2.shape[0])

    @property
    def out(self) -> int:
        """The output rows of the layer it fits."""
        return int(self.b2.shape[0] if self.old_layout else self.b1.shape[0])

    def check(self) -> None:
        """Raises ``ValueError`` naming the shapes where the four factors do not fit together."""
        if not any(self._fits()):
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(("a1", "a2", "b1", "b2"), self))
            raise ValueError(f"has GLoRA factors that do not fit together: {shapes}")

    def _check_weight(self, weight_shape: torch.Size) -> None:
        self.check()
        cols = self.a2.shape[0] if self.old_layout else self.a1.shape[0]
        if self.out != weight_shape[0] or cols != weight_shape[1]:
            raise ValueError(f"has GLoRA factors for a [{self.out}, {cols}, ...] weight; the layer's is {list(weight_shape)}")
        if self.old_layout and any(k != 1 for k in weight_shape[2:]):
            raise ValueError(f"has GLoRA factors in LyCORIS' first layout, which is for Linear and 1x1 conv layers; the "
                             f"layer's weight is {list(weight_shape)}")
        b_in = (self.b1 if self.old_layout else self.b2)  # (B's input side: a conv's kernel too)
        if b_in[0].numel() != weight_shape[1:].numel():
            raise ValueError(f"has a GLoRA {'b1' if self.old_layout else 'b2'} of shape {list(b_in.shape)}; the layer's "
                             f"weight {list(weight_shape)} needs {weight_shape[1:].numel()} values per row")

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' - W`` on ``weight``, in fp32 (fp64 for an fp64 weight), in ``weight``'s shape. Raises ``ValueError``
        (the shapes) where the module does not fit the weight."""
        self._check_weight(weight.shape)
        wide = _wide(weight)
        w = weight.detach().to(wide)
        a1, a2, b1, b2 = (t.to(w.device, wide).reshape(t.shape[0], -1) for t in (self.a1, self.a2, self.b1, self.b2))
        a, b = (a2 @ a1, b2 @ b1) if self.old_layout else (a1 @ a2, b1 @ b2)
        wa = torch.einsum("oi...,ij->oj...", w, a)
        scale = self.alpha / self.rank if self.alpha is not None else 1.0
        return (wa + b.reshape(w.shape)) * scale

    def is_zero(self) -> bool:
        """Whether it changes no weight: both of its products have a zero factor."""
        return not (bool(self.a1.any()) and bool(self.a2.any())) and not (bool(self.b1.any()) and bool(self.b2.any()))

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self._asdict().items() if isinstance(t, torch.Tensor)}


class Ia3(NamedTuple):
    """One (IA)^3 module as a file holds it (see the module docstring)."""

    weight: torch.Tensor
    on_input: bool = False

    kind = "(IA)^3"
    described = "an (IA)^3 module"

    @property
    def out(self) -> int | None:
        """The output rows of the layer it fits (``None``: it scales input columns)."""
        return None if self.on_input else int(self.weight.numel())

    def check(self) -> None:
        """Raises ``ValueError`` where the weight is not a vector (or a conv's ``[1, n, 1, 1]``)."""
        shape = list(self.weight.shape)
        if not (len(shape) == 1 or (len(shape) == 4 and shape[0] == shape[2] == shape[3] == 1)):
            raise ValueError(f"has an (IA)^3 weight of shape {shape}; it needs [n] (or a conv's [1, n, 1, 1])")

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' - W = W * v`` on ``weight``, in fp32 (fp64 for an fp64 weight), in ``weight``'s shape."""
        self.check()
        n = weight.shape[1] if self.on_input else weight.shape[0]
        if self.weight.numel() != n:
            raise ValueError(f"has an (IA)^3 weight of {self.weight.numel()} values for the layer's "
                             f"{'input columns' if self.on_input else 'output rows'} ({n}, weight {list(weight.shape)})")
        wide = _wide(weight)
        w = weight.detach().to(wide)
        shape = [1, n] if self.on_input else [n, 1]
        return w * self.weight.to(w.device, wide).reshape(*shape, *[1] * (w.dim() - 2))

    def is_zero(self) -> bool:
        return not bool(self.weight.any())

    def numel(self) -> int:
        return int(self.weight.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

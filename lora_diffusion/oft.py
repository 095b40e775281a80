"""OFT and BOFT modules (orthogonal finetuning) as the exact delta they make on the weight they are loaded onto.

An OFT module rotates a layer's output rows: ``W' = R^T W`` with ``R`` block-diagonal, each block orthogonal, made
from a trained block by the Cayley transform ``R = (I + Q)(I - Q)^-1`` of its skew-symmetric part
``Q = B - B^T``. Files hold, per module:

- ``oft_blocks`` ``[blocks, size, size]``: LyCORIS' ``diag-oft`` and kohya's ``networks.oft`` (the latter named
  ``oft_unet_...``), with ``alpha`` a constraint: where ``||Q|| > alpha * out`` (every block's ``Q`` together),
  ``Q`` is scaled down to that norm (LyCORIS: ``Q * c / (||Q|| + 1e-8)`` once ``||Q|| + 1e-8 > c``; kohya:
  ``Q * (min(||Q||, c) + 1e-8) / (||Q|| + 1e-8)``, each read as its own trainer applies it); ``alpha`` 0 or absent:
  no constraint;
- ``oft_diag`` ``[blocks, size, size]``: LyCORIS' first OFT, the rotations themselves;
- ``oft_blocks`` ``[m, blocks, size, size]``: LyCORIS' BOFT (butterfly OFT), ``m`` such rotations applied in turn,
  each to the rows permuted in a butterfly pattern (stride ``2^i * size / 2`` at step ``i``), ``W' = R_m ... R_1 W``;
- an optional ``rescale`` ``[out, 1, ...]``, a factor per output row on ``W'``.

``W'`` is not ``W`` plus a low-rank product and depends on ``W``, so, as DoRA (``lora_diffusion.dora``), such a
module is read as ``LoraWeights.oft`` and becomes, when it is loaded into a layer, that layer's exact delta
``D = W' - W``, computed once in fp32 (fp64 for an fp64 weight) from the layer's own (unfused) weight and kept
densely. At a weight ``w`` the layer gets ``W + w D``, as A1111 applies a multiplier to OFT and BOFT (and kohya and
LyCORIS to OFT); ``w = 1`` is the file's ``W'`` exactly. (LyCORIS applies ``w`` to BOFT's first rotation and outside
``rescale``; ComfyUI applies a strength twice and takes ``alpha`` itself as the constraint: they agree with the
above at ``w = 1`` and where the constraint does not bind.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layers import accumulation_dtype

__all__ = ["Oft", "oft_delta", "check_blocks"]


class Oft(NamedTuple):
    """One OFT / BOFT module as a file holds it (see the module docstring)."""

    blocks: torch.Tensor  # [blocks, size, size] (OFT), [m, blocks, size, size] (BOFT)
    rotations: bool = False  # ``oft_diag``: the blocks are the rotations themselves
    constraint: float = 0.0  # ``alpha``: the norm bound is ``alpha * out`` (0: none)
    rescale: torch.Tensor | None = None  # [out, 1, ...] or [out]
    kohya: bool = False  # kohya's ``networks.oft`` (its constraint rule)

    @property
    def kind(self) -> str:
        return "BOFT" if self.blocks.dim() == 4 else "OFT"

    @property
    def described(self) -> str:
        """``an OFT module`` / ``a BOFT module``, for messages."""
        return "a BOFT module" if self.kind == "BOFT" else "an OFT module"

    @property
    def out(self) -> int:
        """The output rows of the layer it fits."""
        return int(self.blocks.shape[-3] * self.blocks.shape[-1])

    # What every module that acts on the weight it is loaded onto has (``LoraWeights.oft``: this, or
    # ``lora_diffusion.glora``'s GLoRA and (IA)^3)
    def check(self) -> None:
        check_blocks(self)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return oft_delta(self, weight)

    def is_zero(self) -> bool:
        """Whether it changes no weight (zero ``oft_blocks`` rotate nothing; zero ``oft_diag`` rotations do)."""
        return not self.rotations and not bool(self.blocks.any()) and self.rescale is None

    def numel(self) -> int:
        return int(self.blocks.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self._asdict().items() if isinstance(t, torch.Tensor)}


def check_blocks(oft: Oft) -> None:
    """Raises ``ValueError`` naming the shape where ``oft``'s blocks are not OFT's or BOFT's."""
    blocks = oft.blocks
    if blocks.dim() not in ((3,) if oft.rotations else (3, 4)) or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(f"has {'oft_diag' if oft.rotations else 'oft_blocks'} of shape {list(blocks.shape)}; it needs "
                         f"[blocks, size, size]{'' if oft.rotations else ' (OFT) or [m, blocks, size, size] (BOFT)'}")


def _check(oft: Oft, weight_shape: torch.Size) -> None:
    """Raises ``ValueError`` naming the shapes where ``oft`` cannot act on a weight of ``weight_shape``."""
    check_blocks(oft)
    blocks, rows = oft.blocks, weight_shape[0]
    if oft.out != rows:
        raise ValueError(f"has {oft.kind} blocks {list(blocks.shape)} for {oft.out} output rows; the layer's weight "
                         f"{list(weight_shape)} has {rows}")
    if blocks.dim() == 4:
        size, steps = int(blocks.shape[-1]), int(blocks.shape[0])
        if size % 2 or any(rows % (2 ** (i + 1) * (size // 2)) for i in range(steps)):
            raise ValueError(f"has BOFT blocks {list(blocks.shape)} whose butterfly does not divide the layer's "
                             f"{rows} output rows")
    if oft.rescale is not None and oft.rescale.numel() != rows:
        raise ValueError(f"has a rescale of shape {list(oft.rescale.shape)}; the layer's weight {list(weight_shape)} "
                         f"needs one factor per output row ({rows})")


def _rotations(oft: Oft, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthogonal blocks ``R``, shaped as ``oft.blocks``."""
    blocks = oft.blocks.to(device, dtype)
    if oft.rotations:
        return blocks
    q = blocks - blocks.transpose(-1, -2)
    bound = oft.constraint * rows
    if bound > 0:
        norm = torch.linalg.vector_norm(q)
        if oft.kohya:
            q = q * ((norm.clamp(max=bound) + 1e-8) / (norm + 1e-8))
        elif float(norm) + 1e-8 > bound:
            q = q * (bound / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=dtype, device=device)
    # (I + Q)(I - Q)^-1 = ((I - Q)^-T (I + Q)^T)^T, by a solve rather than an inverse
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def oft_delta(oft: Oft, weight: torch.Tensor) -> torch.Tensor:
    """``W' - W`` of ``oft`` on ``weight``, in fp32 (fp64 for an fp64 weight), in ``weight``'s shape. Raises
    ``ValueError`` (the shapes) where the module does not fit the weight."""
    _check(oft, weight.shape)
    wide = accumulation_dtype(weight.dtype)
    base = weight.detach().to(wide)
    rows, rest = base.shape[0], base.shape[1:]
    r = _rotations(oft, rows, wide, base.device)
    if r.dim() == 3:  # W'_k = R_k^T W_k, block by block of output rows
        out = torch.einsum("kji,kj...->ki...", r, base.reshape(r.shape[0], r.shape[1], *rest)).reshape(base.shape)
    else:  # butterfly: at step i, rows paired at stride k = 2^i * size / 2 form the blocks R_i acts on
        out, size = base, r.shape[-1]
        for i, step in enumerate(r):
            k = 2**i * (size // 2)
            paired = out.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, size, *rest)
            out = torch.einsum("dij,dj...->di...", step, paired).reshape(-1, k, 2, *rest).transpose(1, 2).reshape(base.shape)
    if oft.rescale is not None:
        out = oft.rescale.to(base.device, wide).reshape(rows, *[1] * len(rest)) * out
    return out - base

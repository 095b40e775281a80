"""LoRA layers: wrappers around a frozen ``nn.Linear`` or ``nn.Conv2d`` holding named low-rank adapters.

The forward of every wrapper is ``y = base(x) + sum_i w_i * (alpha_i / r_i) * B_i(A_i(x))``.

* The base layer is kept as ``base_layer`` (never rebuilt), so ``remove_lora`` can put it back.
* One adapter in autograd (training) runs PEFT's ops in PEFT's order: the loss and gradients equal PEFT's bit for
  bit; ``B @ A`` is never materialised there, the low-rank path is two thin matmuls (or convs). Several adapters
  in autograd are one concatenated pair of matmuls: the ``A`` factors stacked along the rank axis and the ``B``
  factors side by side, each adapter's ``w * alpha / r`` folded into its columns of ``B`` (fp32 multiply, one
  rounding). The stacked tensors are cached and rebuilt only when a factor changes (tracked with the tensors'
  version counters), an adapter is added, or a weight changes.
* Outside autograd (inference), any number of adapters runs either through the merged weight
  ``W + sum s B A``, formed per call by one small GEMM from the stacked factors and fed to the base op (one extra
  kernel per layer; the base weight is never written), or, where the activations are smaller than the weight
  (few tokens: cross-attention keys and values, the text encoder), as the stacked pair whose second matmul adds
  into the base output (``merged_forward_pays`` picks by memory traffic). Either way the output equals PEFT's to
  rounding, not bit for bit; the merged weight is the fused one up to the factors' rounding.
* Fusing bakes the weighted deltas into the base weight, accumulated in fp32 (fp64 for an fp64 weight) and cast
  back once. The base weight is copied before the first fuse and ``unfuse`` restores that copy, so unfusing is
  **exact** (bit-identical), and re-weighting while fused recomputes ``W0 + delta`` from the copy, which equals fusing
  afresh bit for bit. Many layers fuse together (``fuse_many``: one batched matmul per shape of factors).
* Training differentiates a single adapter on a frozen Linear through ``W + s B A`` on CUDA (``_DenseBackward``:
  one weight-gradient GEMM in place of four rank-r matmuls); the forward stays PEFT's two thin matmuls.
* A base weight stored in fp8 (``fp8.store_fp8``, or diffusers' ``enable_layerwise_casting``: either casts it up
  only within the base layer's own call) gets its adapters beside the base output, in the compute dtype
  (``compute_dtype``), never through the weight, outside autocast; fusing rounds ``W0 + delta`` (fp32) to fp8 once.
* Under ``torch.compile`` the forward takes no cache: it stacks the factors in the graph and reads the weights
  from the ``lora_scales`` buffer, which every change updates in place, so a re-weight needs no recompile. The one
  exception is a compiled wrapper that ``pipeline.cache_merged_weights`` hooked: before each call its hook brings
  every layer's kept merged weight (the ``lora_kept`` buffer, written in place) up to date, eagerly, and the graph,
  traced while ``_KEPT_IN_GRAPH`` holds, runs the base op on that buffer alone.

Example:
    >>> layer = LoraLinear(torch.nn.Linear(8, 8))
    >>> layer.add_adapter("style", rank=2, alpha=2.0)
    >>> torch.equal(layer(torch.ones(1, 8)), layer.base_layer(torch.ones(1, 8)))  # B = 0 at init
    True
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraLayer", "LoraLinear", "LoraConv2d", "AdapterSpec", "LoraDropout"]


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter in one layer."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraDropout(nn.Module):
    """The dropouts of one adapter in training, kohya's beside PEFT's (sd-scripts' ``networks/lora.py``):

    * ``input``: PEFT's ``lora_dropout``, on the adapter's input ``x`` (what a plain float ``dropout`` is);
    * ``neuron``: kohya's ``network_dropout``, on single values of the rank-wide ``A x``;
    * ``rank``: kohya's ``rank_dropout``, whole rank rows of ``A x`` per sample, the change scaled by
      ``1 / (1 - rank)`` ("as if the rank were smaller");
    * ``module``: kohya's ``module_dropout``, the whole adapter of this layer for one forward.

    Each is a probability in ``[0, 1)``; in eval mode nothing is dropped. The masks are drawn on the input's device
    (no host sync, and the same ops under ``torch.compile``).

    Example:
        >>> inject_lora(unet, rank=8, dropout=LoraDropout(neuron=0.1, rank=0.1, module=0.1))
    """

    def __init__(self, input: float = 0.0, neuron: float = 0.0, rank: float = 0.0, module: float = 0.0) -> None:
        super().__init__()
        for name, p in (("input", input), ("neuron", neuron), ("rank", rank), ("module", module)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"LoraDropout: {name} must be a probability in [0, 1), got {p!r}")
        self.input, self.neuron, self.rank, self.module = float(input), float(neuron), float(rank), float(module)

    @property
    def hidden(self) -> bool:
        """Whether anything after ``A`` is dropped (kohya's three): the adapter then runs ``LoraLayer._dropped``."""
        return bool(self.neuron or self.rank or self.module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input's dropout (``nn.Dropout``'s op)."""
        return F.dropout(x, self.input, self.training) if self.input else x

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k):g}" for k in ("input", "neuron", "rank", "module") if getattr(self, k))


def _dropout_module(dropout: float | LoraDropout) -> nn.Module:
    """An adapter's own dropout module: ``nn.Dropout`` for a float (PEFT's) or a ``LoraDropout`` of the input alone,
    ``nn.Identity`` for none, else a copy of the ``LoraDropout``."""
    if isinstance(dropout, LoraDropout):
        if dropout.hidden:
            return LoraDropout(dropout.input, dropout.neuron, dropout.rank, dropout.module)
        dropout = dropout.input
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1) or a LoraDropout, got {dropout!r}")
    return nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def _slot(name: str) -> str:
    """Where adapter ``name`` is kept in ``lora_A`` / ``lora_B`` / ``lora_dropout``: torch's parameter and module
    names can't hold ``.``, adapter names can (A1111 names a LoRA after its file, such as ``detail_v1.5``), so a
    ``.`` is kept as ``%2E`` (and ``%`` as ``%25``, which keeps the map one to one)."""
    return name.replace("%", "%25").replace(".", "%2E") if "." in name or "%" in name else name


class _AdapterParameters(nn.ParameterDict):
    """``nn.ParameterDict`` indexed by adapter name (see ``_slot``)."""

    def __getitem__(self, name: str) -> nn.Parameter:
        return super().__getitem__(_slot(name))

    def __setitem__(self, name: str, value) -> None:
        super().__setitem__(_slot(name), value)
        bump_generation()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(_slot(name))
        bump_generation()

    def __contains__(self, name) -> bool:
        return super().__contains__(_slot(name))


class _AdapterModules(nn.ModuleDict):
    """``nn.ModuleDict`` indexed by adapter name (see ``_slot``)."""

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(_slot(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(_slot(name), module)
        bump_generation()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(_slot(name))
        bump_generation()

    def __contains__(self, name) -> bool:
        return super().__contains__(_slot(name))


# True while torch.compile traces (torch >= 2.3; older versions run the eager forward, graph breaks and all)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)

# True only within a call of a compiled wrapper that ``pipeline.cache_merged_weights`` hooked, whose pre-hook has
# just brought every ``lora_kept`` buffer up to date (``LoraLayer.refresh_kept``). A graph traced then reads those
# buffers; dynamo guards on this value, so another wrapper of the same model (a ``torch.compile`` by hand, with no
# hook to re-merge after a change) gets a graph of its own that never reads them. (Dynamo keeps its graphs on the
# model's code, shared by every wrapper: a flag on the model could not tell the wrappers apart.) One flag for the
# process: a wrapper compiled by hand and called from another thread during a hooked call would read them too.
_KEPT_IN_GRAPH = False

# Moved by every change a kept merged weight depends on other than a tensor's values or a base weight's identity:
# a layer's Python state (the ``_KEPT_INPUTS`` attributes, ``_changed``, a cast or move), its factor and dropout
# stores, and the module tree (``inject``: wrap, unwrap, attach, detach). While it stands still, a hooked compiled
# wrapper checks its layers in bulk (``kept_holds``) rather than one by one (``refresh_kept``).
_GENERATION = 0


def bump_generation() -> None:
    """Something a kept merged weight depends on changed (see ``_GENERATION``)."""
    global _GENERATION
    _GENERATION += 1


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs on ``x``'s device to, or ``None`` where it is off."""
    try:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    except (TypeError, AttributeError):  # torch < 2.4: no per-device query
        return torch.get_autocast_gpu_dtype() if x.is_cuda and torch.is_autocast_enabled() else None


# what autocast casts to its dtype on the way into a matmul (float64 stays)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)

# dtypes a weight is stored in but never computed in: fp8 (diffusers' ``enable_layerwise_casting``, A1111's "FP8
# weight"), which the base layer's own call casts up
FLOAT8 = frozenset(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, name))


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype ``layer`` (a frozen Linear / Conv2d) computes in: its weight's, or for a weight stored in fp8 the
    one ``fp8.store_fp8`` or diffusers' layerwise-casting hook on it names (bf16 without either). LoRA factors
    loaded for the layer take it."""
    dtype = layer.weight.dtype
    if dtype not in FLOAT8:
        return dtype
    hook = getattr(getattr(layer, "_diffusers_hook", None), "hooks", {}).get("layerwise_casting")
    return getattr(layer, "fp8_compute_dtype", None) or getattr(hook, "compute_dtype", None) or torch.bfloat16

# (weakref to an input, its version, weakref to its cast): the last input ``_cast_shared`` cast
_LAST_CAST: tuple = (None, 0, None)


def _cast_shared(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, one tensor for consecutive calls on the same unchanged ``x``: q, k and v of a
    self-attention read one LayerNorm output (fp32 under CUDA autocast), so they share one cast, and the dense
    backward saves that one copy for all three. Weak references only: nothing is kept alive."""
    global _LAST_CAST
    ref, version, cast_ref = _LAST_CAST
    try:
        current = x._version
    except RuntimeError:  # an inference tensor: no version counter, no sharing
        return x.to(dtype)
    if ref is not None and ref() is x and version == current:
        cast = cast_ref()
        if cast is not None and cast.dtype == dtype:
            return cast
    cast = x.to(dtype)
    _LAST_CAST = (weakref.ref(x), current, weakref.ref(cast))
    return cast


def _autocast_recasts(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device with ``x``'s dtype: then the low-rank matmuls cast their inputs
    to that dtype anyway, and casting ``x`` up to the fp32 factors' dtype first (as PEFT does) is a lossless round
    trip that costs two activation-sized kernels forward and two backward per layer. Skipping it is bit-exact."""
    return _autocast_dtype(x) == x.dtype


def _tracked(x: torch.Tensor, params: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether autograd records a LoRA call on ``x`` with factors ``params``."""
    return torch.is_grad_enabled() and (x.requires_grad or any(a.requires_grad or b.requires_grad for a, b in params))


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _factor_key(names: list[str], params: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple | None:
    """What identifies the current values of ``params``: their version counters (in-place updates) and storage
    (replaced ``.data``); ``None`` for factors made under ``torch.inference_mode()``, which count no versions."""
    try:
        return tuple((n, a._version, b._version, a.data_ptr(), b.data_ptr()) for n, (a, b) in zip(names, params))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _scale_columns(b: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``B`` ``[out, R, ...]`` times ``scales`` ``[R]`` per column, multiplied in fp32 (fp64 for an fp64 ``B``) and
    rounded once to ``dtype`` (default ``B``'s; a bf16 B times a bf16 scale would round the scale first)."""
    wide = torch.promote_types(b.dtype, torch.float32)  # (an fp64 B stays fp64)
    scaled = _cast(b, wide) * _cast(scales, wide).view(1, -1, *([1] * (b.dim() - 2)))
    return _cast(scaled, dtype or b.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What fusing and its checks compute in for weights of ``dtype``: fp32 (for fp16, bf16 and fp8 too), fp64 for
    fp64 (a Python test, not ``torch.promote_types``, which dispatches an op per call and refuses fp8)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` (all on one device) hold no NaN or Inf, with one host read: their 2-norms (fp32; fp64
    for fp64 tensors) in one multi-tensor pass per width (a few kernels for any number of tensors, where a
    reduction each would launch one per tensor), non-finite iff some element is or the squares overflow (|w| >
    ~1e18 in fp32): only then is each tensor checked element by element, so huge finite weights pass."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(accumulation_dtype(t.dtype) if t.dtype not in FLOAT8 else t.dtype, []).append(t)
    if not groups:
        return True
    finite = [torch.isfinite(torch.stack(torch._foreach_norm(ts, 2, dtype=dtype))) if dtype not in FLOAT8 else
              torch.stack([torch.isfinite(t.float()).all() for t in ts]) for dtype, ts in groups.items()]  # (fp8: no norm)
    if bool((finite[0] if len(finite) == 1 else torch.cat(finite)).all()):
        return True
    return all(bool(torch.isfinite(t if t.dtype not in FLOAT8 else t.float()).all()) for t in tensors)


BACKWARD_MODES = ("auto", "dense", "lowrank", "merged")


def dense_backward_pays(in_features: int, out_features: int) -> bool:
    """Whether ``auto`` takes the dense backward for a Linear of this size on a GPU. Per row of activations it
    trades the low-rank backward's memory traffic (its rank-r matmuls and the add read or write ~7 bf16 values per
    element of ``in + out``: ~14 bytes) for a weight-gradient GEMM of ``2 * in * out`` FLOP, so it pays while
    ``in * out / (in + out)`` stays under the GPU's FLOP per byte (~200 on an H100) times 7, ~1400. The bound, 1024,
    takes square layers up to 2048 wide: every SD1.5 / SDXL attention projection and every CLIP-L layer; wider
    layers keep the low-rank backward."""
    return in_features * out_features <= 1024 * (in_features + out_features)


# Elements of memory traffic worth one kernel launch's fixed cost on CUDA: the merged weight takes one extra kernel
# per layer where the stacked pair takes two (a GPU launch costs ~2-5 us, ~2M bf16 elements at 3 TB/s; a CPU op's
# overhead is small next to its FLOP)
_CUDA_LAUNCH_ELEMENTS = 1 << 21


def merged_forward_min_tokens(in_features: int, out_features: int, weight_numel: int, cuda: bool) -> int:
    """The fewest rows of activations for which ``merged_forward_pays``: ``ceil((2 * |W| - launch) / (in + 2 out))``."""
    launch = _CUDA_LAUNCH_ELEMENTS if cuda else 0
    return max(0, -(-(2 * weight_numel - launch) // (in_features + 2 * out_features)))


def merged_forward_pays(tokens: int, in_features: int, out_features: int, weight_numel: int, device: str = "cpu") -> bool:
    """Whether an inference call on ``tokens`` rows of activations runs through the merged weight
    ``W' = W + sum_i s_i B_i A_i`` (one small GEMM that reads ``W`` and writes ``W'``, then the base op on ``W'``:
    one extra kernel per layer, for any number of adapters) rather than the stacked low-rank pair (two matmuls
    over the activations, the second adding into the base output). By memory traffic, which bounds both on a GPU:
    the merged weight moves ``2 * weight_numel`` elements, the pair reads ``x`` and reads and writes the output,
    ``tokens * (in + 2 * out)``, and takes one more kernel (``_CUDA_LAUNCH_ELEMENTS``); on a CPU the FLOP counts
    order the two about the same way. An SD1.5 UNet at 512 px with CFG takes the merged weight in every layer but
    the 8x8 mid block's on a GPU; on a CPU, also not in the 16x16 level's or for the 77 text tokens
    (cross-attention keys and values, the text encoder). Each layer keeps its thresholds (``_merge_min``)."""
    return tokens >= merged_forward_min_tokens(in_features, out_features, weight_numel, device == "cuda")


class _DenseBackward(torch.autograd.Function):
    """One adapter on a frozen ``nn.Linear``: ``y = W x + b + s B A x``. The forward is the layer's own (PEFT's
    ops, bit for bit, eagerly). The backward goes through the dense weight ``W' = W + s B A`` ([out, in], a few
    small kernels): the input gradient is the one matmul ``g W'`` that the frozen layer pays anyway, and the factor
    gradients come from the weight gradient ``G = g^T x``: ``dB = s G A^T``, ``dA = s B^T G``. One compute-bound
    GEMM over the activations replaces four rank-r matmuls and an add (each a memory-bound pass over them), so a
    step costs less wherever ``in * out / (in + out)`` is small next to the GPU's FLOP per byte (every SD layer).
    Gradients equal the low-rank ones up to rounding (``G`` is accumulated in fp32 on CUDA).

    ``scale``: ``None`` eagerly (the layer's Python weights), or the ``lora_scales`` entry under torch.compile."""

    @staticmethod
    def forward(ctx, x, a, b, weight, bias, layer, name, scale):  # noqa: D102 - weight, bias: the frozen nn.Linear's
        # The input and the factors cast once, as autocast would cast them inside each F.linear (the same bits),
        # and kept for the backward: an fp32 input (a LayerNorm's output under CUDA autocast) is cast once, not
        # once per matmul and again in the backward, saved at half the size, and (eagerly) shared by the layers
        # that read it (q, k, v).
        dtype = _autocast_dtype(x)
        ctx.x_dtype = x.dtype
        if dtype is not None:
            a_c, b_c = _cast(a, dtype), _cast(b, dtype)
            if x.dtype != dtype and x.dtype in _AUTOCAST_ELIGIBLE:
                x = x.to(dtype) if scale is not None else _cast_shared(x, dtype)  # (scale: under torch.compile)
        else:
            a_c, b_c = a, b
        ctx.save_for_backward(x, a, b, a_c, b_c, weight)
        ctx.scale = layer.weights[name] * layer.specs[name].scale if scale is None else scale
        if layer.backward_mode == "merged":  # the forward through W' too: the base GEMM on W', nothing over x
            return F.linear(x, _dense_weight(weight, a_c, b_c, ctx.scale, dtype or weight.dtype), bias)
        return layer._add_adapter(F.linear(x, weight, bias), x, name, a_c, b_c, scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        device = grad.device.type
        if torch.is_autocast_enabled(device):  # backward() called inside autocast: the casts below are explicit
            with torch.autocast(device, enabled=False):
                return _DenseBackward._grads(ctx, grad)
        return _DenseBackward._grads(ctx, grad)

    @staticmethod
    def _grads(ctx, grad):
        x, a, b, a_c, b_c, weight = ctx.saved_tensors
        scale, dtype, needs = ctx.scale, grad.dtype, ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dx = da = db = None
        if needs[0]:
            dx = _cast((g @ _dense_weight(weight, a_c, b_c, scale, dtype)).view(x.shape), ctx.x_dtype)
        if needs[1] or needs[2]:
            gw = _mm_fp32(g.t(), _cast(x.reshape(-1, x.shape[-1]), dtype))  # [out, in], fp32
            if isinstance(scale, torch.Tensor) or scale != 1.0:
                gw = gw.mul_(scale)
            if needs[1]:
                da = _cast(torch.mm(_cast(b, torch.float32).t(), gw), a.dtype)
            if needs[2]:
                db = _cast(torch.mm(gw, _cast(a, torch.float32).t()), b.dtype)
        return dx, da, db, None, None, None, None, None


def _dense_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """``W + s B A`` in ``dtype``: one GEMM (accumulated in fp32 on CUDA, rounded once); ``scale`` a float or, under
    torch.compile, a 0-d tensor."""
    if isinstance(scale, torch.Tensor):
        return torch.addmm(_cast(weight, dtype), _cast(b * scale, dtype), _cast(a, dtype))
    return torch.addmm(_cast(weight, dtype), _cast(b, dtype), _cast(a, dtype), alpha=scale)


def _writable_as(kept: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether ``t`` can be written into ``kept`` in place (its address kept: what a CUDA graph read stays current)."""
    return kept is not None and kept.shape == t.shape and kept.dtype == t.dtype and kept.device == t.device \
        and (torch.is_inference_mode_enabled() or not kept.is_inference())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where it is a no-op (~1 us each, several per layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mm_fp32(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """``m1 @ m2`` as fp32: accumulated and written in fp32 by one CUDA GEMM where torch has it, else cast after."""
    if m1.is_cuda and m1.dtype != torch.float32:
        try:
            return torch.mm(m1, m2, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
            pass
    return torch.mm(m1, m2).float()


class LoraLayer(nn.Module):
    """Base class for LoRA wrappers. Subclasses define the shapes and the two low-rank ops."""

    # How a training step differentiates a single adapter: "lowrank" through the factors (PEFT's ops, bit for bit),
    # "dense" through W + s B A (``_DenseBackward``: Linear only), "auto" dense in eager CUDA steps where it pays
    # (``dense_backward_pays``), "merged" dense with the forward through W + s B A too (the loss PEFT's to
    # rounding, not bit for bit). Set with ``set_backward``.
    backward_mode = "auto"

    # Inference outside autograd: keep the merged weight ``W + sum w s B A`` between calls (one extra copy of the
    # wrapped weight per layer, what ``fuse`` keeps too) so that an unfused call runs the base model's kernels alone;
    # rebuilt by the first call after anything it depends on changes. Set with ``pipeline.cache_merged_weights``.
    merge_cache = False

    # Adapters trained as DoRA here (``add_adapter(dora=True)``): their forward is PEFT's DoRA, outside every fast
    # path; empty (and no ``lora_magnitude`` store) for all other layers. (DoRA *files* load as dense deltas.)
    _dora: frozenset[str] = frozenset()

    # Plain Python state, never a parameter, buffer or module: set without nn.Module.__setattr__'s bookkeeping
    # (~1.5 us a call; a re-weight sets several per layer, 176 layers in SD1.5 with its text encoder).
    _PLAIN = frozenset({"specs", "weights", "active", "disabled", "fused", "backward_mode", "_base_backup",
                        "_cache_key", "_cache", "merge_cache", "_merged_key", "_merged", "_kept_check", "_fuse_key", "_fuse_cache", "_compiled_names", "_merge_min", "_escaped",
                        "_dora"})
    # the plain state a kept merged weight (or whether a graph reads it) depends on: setting one moves _GENERATION
    _KEPT_INPUTS = frozenset({"specs", "weights", "active", "disabled", "fused", "merge_cache", "_escaped", "_dora",
                              "_compiled_names"})

    def __setattr__(self, name: str, value) -> None:
        if name in LoraLayer._PLAIN:
            self.__dict__[name] = value
            if name in LoraLayer._KEPT_INPUTS:
                bump_generation()
        else:
            super().__setattr__(name, value)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = _AdapterParameters()  # adapter name -> parameter (a name may hold '.': ``_slot``)
        self.lora_B = _AdapterParameters()
        self.lora_dropout = _AdapterModules()
        self.specs: dict[str, AdapterSpec] = {}
        self.weights: dict[str, float] = {}  # user weight per adapter (strength); 0 or absent = inactive
        self.active: list[str] = []  # adapters that take part in forward/fuse, in insertion order
        self.disabled = False
        self._escaped = False  # some adapter name is kept escaped (``_slot``): the hot paths map names only then
        self.fused: dict[str, float] = {}  # adapter -> effective weight baked into base_layer.weight
        self._base_backup: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._merged_key: tuple | None = None  # the kept merged weight (``merge_cache``) and what it was made from
        self._merged: torch.Tensor | None = None
        self._kept_check: tuple | None = None  # what ``_kept_valid`` checks; good while ``_merged_key`` is its key
        self._fuse_key: tuple | None = None  # widened factors kept while fused (re-weighting reuses them)
        self._fuse_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # What a compiled forward reads: the active unfused adapters and their ``w * alpha / r`` per rank row as a
        # tensor, kept current by every method that changes them (in place where the shape stays), so that
        # torch.compile / CUDA graphs follow a re-weight without recompiling.
        self._compiled_names: list[str] = []
        # the input sizes (elements) from which inference takes the merged weight, (CPU, CUDA): fixed by the base
        # weight's shape (``merged_forward_pays``); ``None``: a base whose op ``_merged_forward`` does not repeat
        weight = base_layer.weight
        self._merge_min = None if type(base_layer) is not self._MERGEABLE else tuple(
            weight.shape[1] * merged_forward_min_tokens(weight.shape[1], weight.shape[0], weight.numel(), cuda)
            for cuda in (False, True))
        self.register_buffer("lora_scales", torch.zeros(0, device=base_layer.weight.device), persistent=False)

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight without any adapter: the base layer's, or, while fused, the copy the first fuse took."""
        return self.base_layer.weight if self._base_backup is None else self._base_backup

    # ------------------------------------------------------------------ shapes (subclasses)
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def _a_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _b_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _max_rank(self) -> int:
        raise NotImplementedError

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    _rank_axis = -1  # the axis of ``_down``'s output that holds the rank

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A x``, the first of ``_low_rank``'s two ops (apart only where something comes between them)."""
        raise NotImplementedError

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B h``, the second."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float | None = None,
        dropout: float | LoraDropout = 0.0,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
        weight: float = 1.0,
        dora: bool = False,
    ) -> None:
        """Add a fresh adapter ``name``, active at ``weight``: ``A`` random (kaiming-uniform, as PEFT), ``B`` zero.
        ``dora``: also a magnitude per output row (DoRA, PEFT's ``use_dora``), ``||W||`` of each row at the start.
        ``dropout``: in training, PEFT's dropout of the input (a float) or ``LoraDropout`` (kohya's too).

        Raises ``ValueError`` if the name exists or the rank exceeds what the layer allows.
        """
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if rank > self._max_rank():
            raise ValueError(
                f"rank {rank} is larger than this layer allows ({self._max_rank()} for "
                f"{type(self.base_layer).__name__} {tuple(self.base_layer.weight.shape)})"
            )
        drop = _dropout_module(dropout)
        if dora and isinstance(drop, LoraDropout) and drop.hidden:
            raise ValueError("kohya's neuron / rank / module dropout is not built for DoRA adapters (only the input's)")
        device = self.base_layer.weight.device
        dtype = dtype or torch.float32
        a = torch.empty(self._a_shape(rank), device=device, dtype=dtype)
        b = torch.zeros(self._b_shape(rank), device=device, dtype=dtype)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        else:
            raise ValueError(f"unknown init {init!r}; use 'kaiming' or 'gaussian'")
        self._escaped = self._escaped or _slot(name) != name
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = drop
        if dora:
            if "lora_magnitude" not in self._modules:
                self.lora_magnitude = _AdapterParameters()
            self.lora_magnitude[name] = nn.Parameter(self._weight_norm(self.base_layer.weight.detach().to(dtype)))
            self._dora = self._dora | {name}
        self.specs[name] = AdapterSpec(rank=rank, alpha=float(rank if alpha is None else alpha))
        self.weights[name] = float(weight)
        self.active.append(name)
        self._changed()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; a fused layer stays fused with the other adapters."""
        self._require(name)
        if name in self.fused:
            self.restore_fused({n: w for n, w in self.fused.items() if n != name})
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        if name in self._dora:
            del self.lora_magnitude[name]
            self._dora = self._dora - {name}
        del self.specs[name]
        del self.weights[name]
        if name in self.active:
            self.active.remove(name)
        self._changed()

    def set_weights(self, weights: dict[str, float], fuse_now: bool = True) -> None:
        """Activate exactly the adapters named in ``weights`` (those in this layer) with these weights.

        A fused layer is re-fused at once unless ``fuse_now=False`` (the caller re-fuses many layers together and
        calls ``sync_scales`` for them all); if that fuse is refused, the old weights stay."""
        fuse_here = bool(self.fused) and fuse_now
        previous = self.weight_state() if fuse_here else None
        self.active = [n for n in self.specs if n in weights]
        for name in self.active:
            self.weights[name] = float(weights[name])
        self._changed(sync=fuse_now)
        if fuse_here:
            try:
                self.fuse()
            except ValueError:
                self.restore_weights(previous)
                raise

    def weight_state(self) -> tuple[list[str], dict[str, float]]:
        """The active adapters and their weights, for ``restore_weights``."""
        return list(self.active), dict(self.weights)

    def restore_weights(self, state: tuple[list[str], dict[str, float]]) -> None:
        """Put back a ``weight_state()`` (after a refused re-weight; the fused weight is the caller's business)."""
        self.active, self.weights = list(state[0]), dict(state[1])
        self._changed()

    def set_lora_weights(self, name: str, a: torch.Tensor, b: torch.Tensor, alpha: float | None = None) -> None:
        """Copy given factors into adapter ``name``; shapes must match exactly."""
        self._require(name)
        for label, src, dst in (("lora_A", a, self.lora_A[name]), ("lora_B", b, self.lora_B[name])):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{label} of adapter {name!r}: file has shape {tuple(src.shape)}, layer expects {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(src)
        if alpha is not None:
            self.specs[name] = AdapterSpec(rank=self.specs[name].rank, alpha=float(alpha))
        self._changed()

    def _changed(self, sync: bool = True) -> None:
        """Adapters, weights or the fused set changed: drop the eager caches and refresh the compiled forward's."""
        # (freed now, not when the next call replaces them; plain state, written to the instance dict directly: a
        # re-weight passes here once per layer)
        state = self.__dict__
        state["_cache_key"] = state["_merged_key"] = state["_merged"] = state["_kept_check"] = None
        bump_generation()
        if sync:
            self.sync_scales()

    def _unfused_active(self) -> list[str]:
        """The adapters a compiled forward computes: active and not fused (zero weights too, so that a slider at 0
        costs no recompile)."""
        return [n for n in self.active if n not in self.fused]

    def compiled_scale_row(self) -> list[float]:
        """The values ``lora_scales`` should hold: ``scale_row`` of ``_unfused_active()``."""
        return self.scale_row({n: self.weights[n] for n in self._unfused_active()})

    def sync_scales(self, values: torch.Tensor | None = None, copies: list | None = None) -> None:
        """Bring ``lora_scales`` up to date with ``compiled_scale_row()`` (given as ``values`` by a caller that
        refreshes many layers with one host-device copy). Updated in place when the length is unchanged, so a
        captured CUDA graph reads the new weights; ``copies``: append ``(buffer, values)`` there instead, for the
        caller to copy all layers' in one ``torch._foreach_copy_``."""
        names = self._unfused_active()
        buffer, device = self._buffers["lora_scales"], self._modules["base_layer"]._parameters["weight"].device
        if values is None:
            if not names and buffer.numel() == 0 and buffer.device == device and buffer.dtype == torch.float32:
                # e.g. every adapter fused (a re-weight of a fused model: each layer): nothing to do, no ops
                self._compiled_names = names
                return
            values = torch.tensor(self.scale_row({n: self.weights[n] for n in names}), dtype=torch.float32)
        with torch.no_grad():
            if buffer.shape == values.shape and buffer.device == device and buffer.dtype == torch.float32 and (
                torch.is_inference_mode_enabled() or not buffer.is_inference()
            ):
                if copies is None:
                    buffer.copy_(values)
                else:
                    copies.append((buffer, values))
            else:
                self.lora_scales = values.to(device=device, dtype=torch.float32, copy=True)
        self._compiled_names = names

    def follow_base(self) -> None:
        """Move the adapters (and the fused base copy) to the base layer's device if the model moved without
        them: while fused the wrapper is out of the module tree, so ``model.to(device)`` moves only its base."""
        device = self._modules["base_layer"]._parameters["weight"].device  # (dict reads: a re-weight, per layer)
        if self._buffers["lora_scales"].device != device:
            self.to(device)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda(): the module's tensors move; so must the fused base copy, the caches are rebuilt on
        # the new device, and scales that a cast rounded are recomputed from the Python weights (they stay fp32)
        super()._apply(fn, *args, **kwargs)
        if self._base_backup is not None:
            self._base_backup = fn(self._base_backup)
        self._fuse_key = self._fuse_cache = None
        self._cache_key = self._cache = None
        self._merged_key = self._merged = self._kept_check = None
        bump_generation()
        if self.lora_scales.dtype != torch.float32:
            self.sync_scales()
        return self

    def _require(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(f"no adapter {name!r} in this layer; have {list(self.specs)}")

    # ------------------------------------------------------------------ forward
    def _live(self) -> list[str]:
        """Adapters that contribute to the forward (active, non-zero weight, not fused)."""
        return [n for n in self.active if self.weights.get(n, 0.0) != 0.0 and n not in self.fused]

    def _factors(self, names: list[str]) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``[(A, B)]`` of ``names``, read from the ParameterDicts' own store: their ``__getitem__`` costs ~1 us,
        which adds up over ~100 layers x several adapters per UNet call."""
        modules = self._modules
        store_a, store_b = modules["lora_A"]._parameters, modules["lora_B"]._parameters
        return [(store_a[k], store_b[k]) for k in (map(_slot, names) if self._escaped else names)]

    def _stacked(self, names: list[str], params: list[tuple[nn.Parameter, nn.Parameter]], tracked: bool,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``A`` (rank-stacked) and ``B`` with ``w * alpha / r`` folded in (multiplied in fp32,
        rounded once), in ``dtype`` if given (the merged forward's: the base weight's); cached outside autograd.
        ``params``: ``self._factors(names)``; ``tracked``: ``_tracked``."""
        # (factors made under torch.inference_mode() have no key: rebuilt each call, not cached)
        factors = None if tracked else _factor_key(names, params)
        dtype = dtype or params[0][1].dtype
        key = factors and (factors, tuple((self.weights[n], self.specs[n].scale) for n in names), dtype)
        if key and key == self._cache_key and self._cache is not None:
            return self._cache
        a_cat, b_cat = torch.cat([a for a, _ in params], dim=0), torch.cat([b for _, b in params], dim=1)
        wide = torch.promote_types(b_cat.dtype, torch.float32)  # (fp64 only for fp64 factors: MPS has none)
        scales = torch.tensor(self.scale_row({n: self.weights[n] for n in names}), dtype=wide)
        a_cat, b_cat = _cast(a_cat, dtype), _scale_columns(b_cat, scales.to(b_cat.device), dtype)
        # (not from a frame torch.compile traces: where dynamo gives up on a model it compiles the frames it calls,
        # this one too, and under CUDA graphs their outputs are overwritten by the next replay)
        if key and not _is_compiling():
            self._cache_key, self._cache = key, (a_cat.detach(), b_cat.detach())
        return a_cat, b_cat

    def _one_by_one(self, names: list[str], tracked: bool) -> bool:
        """Adapter by adapter (one adapter in autograd, or a training dropout) rather than one stacked matmul pair.
        ``tracked``: whether autograd records this call (``_tracked``)."""
        if tracked and len(names) == 1:
            return True
        return self.training and any(not isinstance(self._dropout(n), nn.Identity) for n in names)

    def _dropout(self, name: str) -> nn.Module:
        """Adapter ``name``'s dropout, read from the ModuleDict's own store (see ``_factors``)."""
        return self._modules["lora_dropout"]._modules[_slot(name) if self._escaped else name]

    def _adapter_input(self, x: torch.Tensor, a: torch.Tensor, drop: nn.Module) -> torch.Tensor:
        """``drop(x)`` in the factors' dtype, as PEFT; the cast is skipped where autocast casts back anyway."""
        identity = isinstance(drop, nn.Identity)
        h = x if x.dtype == a.dtype or (identity and _autocast_recasts(x)) else x.to(a.dtype)
        return h if identity else drop(h)

    def _dense_backward(self, x: torch.Tensor, names: list[str], compiling: bool) -> bool:
        """Whether this call trains through ``_DenseBackward`` (a ``LoraLinear`` decides)."""
        return False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._modules["base_layer"]  # (nn.Module.__getattr__ costs ~0.5 us a call)
        if self.disabled:
            return base(x, *args, **kwargs)
        compiling = _is_compiling()
        fast = None if compiling else self._kept_check  # (never read in a graph: dynamo would guard on its type)
        if fast is not None and fast[0] is self._merged_key and self.merge_cache \
                and not (args or kwargs) and not torch.is_grad_enabled() and self._kept_valid(fast):
            return self._base_op(x, self._merged)
        names = self._compiled_names if compiling else self._live()
        # a weight stored in fp8 outside autocast (``fp8.store_fp8``, diffusers' layerwise casting: cast up only
        # within the base layer's own call): the adapters beside the base output, never through the weight
        stored_fp8 = base._parameters["weight"].dtype in FLOAT8 and _autocast_dtype(x) is None
        if self._dora and not self._dora.isdisjoint(names):
            return self._dora_forward(x, names, args, kwargs, stored_fp8)
        if not stored_fp8 and torch.is_grad_enabled() and not (args or kwargs) and self._dense_backward(x, names, compiling):
            a, b = self._factors(names)[0]
            scale = self.lora_scales[0] if compiling else None
            return _DenseBackward.apply(x, a, b, base.weight, base.bias, self, names[0], scale)
        if compiling:
            return self._compiled_forward(x, args, kwargs, stored_fp8)
        if not names:
            return base(x, *args, **kwargs)
        params = self._factors(names)
        tracked = _tracked(x, params)
        # Several adapters, or any number outside autograd: one cached pair of stacked factors with the scales
        # folded into B. Outside autograd, through the merged weight where that moves fewer bytes, else the second
        # matmul adds into the base output (LoraLinear: one kernel). With ``merge_cache``, through the kept merged weight.
        one_by_one = self._one_by_one(names, tracked)
        if not tracked and not (args or kwargs) and not stored_fp8 and not one_by_one:
            if self.merge_cache and self._merge_min is not None:
                return self._base_op(x, self._kept_merged(names, params))
            if self._merge_pays(x):
                a_cat, b_cat = self._stacked(names, params, tracked, base._parameters["weight"].dtype)
                return self._merged_forward(x, a_cat, b_cat)
        return self._beside_base(x, names, params, tracked, one_by_one, args, kwargs)

    def _beside_base(self, x: torch.Tensor, names: list[str], params: list[tuple[nn.Parameter, nn.Parameter]],
                     tracked: bool, one_by_one: bool, args: tuple, kwargs: dict) -> torch.Tensor:
        """The base layer's output with the adapters ``names`` added beside it: one adapter in autograd (training)
        as PEFT, ``B(A(dropout(x))) * scale`` in its op order (bit for bit); else the stacked pair, whose second
        matmul adds into the base output outside autograd."""
        result = self._modules["base_layer"](x, *args, **kwargs)
        if one_by_one:
            for n, (a, b) in zip(names, params):
                result = self._add_adapter(result, x, n, a, b)
            return result
        a_cat, b_cat = self._stacked(names, params, tracked)
        if not tracked:
            return self._add_low_rank_(result, x, a_cat, b_cat)
        h = x if x.dtype == a_cat.dtype or _autocast_recasts(x) else x.to(a_cat.dtype)
        return result + self._low_rank(h, a_cat, b_cat).to(result.dtype)

    def _dora_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict,
                      stored_fp8: bool = False) -> torch.Tensor:
        """The forward of a layer holding DoRA adapters trained here: adapter by adapter, PEFT's DoRA for those
        (``W' = m * V / ||V||`` per output row, ``V = W + s B A``, the norm a constant to autograd, as the paper
        and PEFT), PEFT's LoRA for the others. A weight ``w`` scales the whole change, ``W + w (W' - W)``, as
        A1111 applies DoRA files and as ours load (PEFT moves ``w`` into ``s``; the same at ``w = 1``)."""
        if stored_fp8:
            raise ValueError(f"the DoRA adapter(s) {sorted(self._dora & set(names))} need the base weight, which is stored in "
                             "fp8 here: generate with the weights in their compute dtype")
        base = self._modules["base_layer"]
        result = base_out = base(x, *args, **kwargs)
        for name, (a, b) in zip(names, self._factors(names)):
            if name not in self._dora:
                result = self._add_adapter(result, x, name, a, b)
                continue
            h = x if x.dtype == a.dtype else x.to(a.dtype)  # as PEFT: in the factors' dtype (fp32 under autocast)
            scale = self.specs[name].scale
            weight, lora_weight = self._dora_weights(h, a, b)
            norm = self._out_view(self._weight_norm(weight + scale * lora_weight.detach())).detach()
            # the base output less its bias, as PEFT (which, after another adapter, takes the sum so far: each
            # adapter's change is its own here, as a DoRA file's is when loaded)
            drop = self._dropout(name)
            if isinstance(drop, nn.Identity) or not self.training:
                plain = base_out if base.bias is None else base_out - self._out_view(base.bias)
            else:
                h = drop(h)
                plain = self._no_bias_op(h, weight)
            mag = self._out_view(self.lora_magnitude[name]) / norm
            delta = (mag - 1) * plain + mag * self._low_rank(h, a, b) * scale
            w = self.weights[name]
            result = result + (delta if w == 1.0 else delta * w)
        # (an fp32 magnitude lifts a bf16 output to fp32 under autocast: back to the base output's dtype, as PEFT)
        return result if result.dtype == base_out.dtype else result.to(base_out.dtype)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2-norm of each output row of a weight, ``[out]``, as PEFT's DoRA takes it (a magnitude's start)."""
        raise NotImplementedError

    def _dora_weights(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, B A)`` in the weight's shape, in the dtypes PEFT's DoRA takes them for input ``h`` (its Linear and
        Conv layers differ), for the norm of ``W + s B A``."""
        raise NotImplementedError

    def _out_view(self, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel ``[out]`` tensor shaped to broadcast over the layer's output."""
        raise NotImplementedError

    def _no_bias_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op on ``x`` with ``weight`` and no bias."""
        raise NotImplementedError

    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, name: str, a: torch.Tensor, b: torch.Tensor,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
        """``result + B(A(dropout(x))) * w * alpha / r`` for one adapter, in PEFT's op order (bit for bit); no-op
        casts and Identity dropouts are skipped (each module/op call costs ~1 us per layer). ``scale``: a tensor
        (``lora_scales``, under torch.compile) in place of the Python weight."""
        drop = self._dropout(name)
        h = self._adapter_input(x, a, drop)
        if self.training and type(drop) is LoraDropout:  # (one only where kohya's dropouts after A are set)
            return self._dropped(result, h, a, b, drop, self.weights[name] * self.specs[name].scale if scale is None else scale)
        if scale is not None:
            # in fp32, rounded once, as eager multiplies by a Python float (a bf16 tensor times an fp32 0-d tensor
            # would round the scale to bf16 first)
            delta = self._low_rank(h, a, b)
            delta = delta * scale if delta.dtype == torch.float32 else (delta.float() * scale).to(delta.dtype)
            return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))
        scale = self.weights[name] * self.specs[name].scale
        if scale == 1.0:  # alpha = rank, weight 1: the multiply is a no-op
            delta = self._low_rank(h, a, b)
        elif math.frexp(scale)[0] in (0.5, -0.5):  # a power of two scales B exactly: same bits, small tensor
            delta = self._low_rank(h, a, b * scale)
        else:
            delta = self._low_rank(h, a, b) * scale
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))

    def _dropped(self, result: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, drop: LoraDropout,
                 scale: float | torch.Tensor) -> torch.Tensor:
        """``result + B(mask * dropout(A h)) * scale / (1 - p_rank)`` for one adapter in training: kohya's neuron,
        rank and module dropouts (``LoraDropout``). The rank mask is one row per sample, broadcast over the other
        axes; the module's keep is one draw folded into it (a dropped module adds exact zeros)."""
        # (drawn in kohya's order: the module's keep, the neuron dropout, the rank rows; on the CPU the same numbers)
        on = torch.rand([1] * h.dim(), device=h.device) >= drop.module if drop.module else None
        low = self._down(h, a)
        if drop.neuron:
            low = F.dropout(low, drop.neuron)
        if drop.rank:
            axis = self._rank_axis % low.dim()
            keep = torch.rand([n if i in (0, axis) else 1 for i, n in enumerate(low.shape)], device=low.device) > drop.rank
            on = keep if on is None else keep & on
        if on is not None:
            low = low * on.to(low.dtype)
        delta = self._up(low, b)
        if drop.rank:
            scale = scale * (1.0 / (1.0 - drop.rank))
        if isinstance(scale, torch.Tensor) and delta.dtype != torch.float32:
            delta = (delta.float() * scale).to(delta.dtype)  # (as ``_add_adapter``: the scale rounded once)
        else:
            delta = delta * scale
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))

    def _compiled_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, stored_fp8: bool = False) -> torch.Tensor:
        """The forward as torch.compile traces it: no caches, version counters or Python-float weights, so the
        graph guards only on which adapters are active and fused (and, for the merged weight, on the input's
        size) and reads their scales from ``lora_scales``. The same ops as eager, up to where the (exact) scale
        multiply happens."""
        base, names = self._modules["base_layer"], self._compiled_names
        if not names:
            return base(x, *args, **kwargs)
        scales, params = self.lora_scales, self._factors(names)
        tracked = _tracked(x, params)
        if self._one_by_one(names, tracked):
            result, row = base(x, *args, **kwargs), 0
            for n, (a, b) in zip(names, params):
                result = self._add_adapter(result, x, n, a, b, scales[row])
                row += self.specs[n].rank
            return result
        if _KEPT_IN_GRAPH and self.merge_cache and not tracked and not (args or kwargs) and not stored_fp8 \
                and "lora_kept" in self._buffers:
            return self._base_op(x, self._buffers["lora_kept"])  # (``refresh_kept`` wrote it before this call)
        merge = not tracked and not (args or kwargs) and not stored_fp8 and self._merge_pays(x)
        a_cat = torch.cat([a for a, _ in params], dim=0)
        b_cat = torch.cat([b for _, b in params], dim=1)
        if merge:
            weight = base.weight
            return self._merged_forward(x, _cast(a_cat, weight.dtype), _scale_columns(b_cat, scales, weight.dtype))
        result, b_cat = base(x, *args, **kwargs), _scale_columns(b_cat, scales)
        if not tracked:
            return self._add_low_rank_(result, x, a_cat, b_cat)
        h = x if x.dtype == a_cat.dtype or _autocast_recasts(x) else x.to(a_cat.dtype)
        return result + self._low_rank(h, a_cat, b_cat).to(result.dtype)

    _MERGEABLE: type | None = None  # the exact base type whose op ``_merged_forward`` repeats

    def _merge_pays(self, x: torch.Tensor) -> bool:
        """Whether this inference call runs through the merged weight (``merged_forward_pays``, by the layer's
        thresholds); only for a plain ``nn.Linear`` / ``nn.Conv2d`` base, whose op ``_merged_forward`` repeats."""
        limits = self._merge_min  # (indexed by an int: torch 2.11's dynamo cannot index a tuple by a bool)
        return limits is not None and x.numel() >= limits[1 if x.is_cuda else 0]

    def _merged_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The base op on ``W + B A`` (``B`` with the scales folded in, both in the weight's dtype)."""
        return self._base_op(x, self._merged_weight(a, b))

    def _merged_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``W + B A`` in the base weight's shape and dtype (one GEMM, rounded once)."""
        raise NotImplementedError

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op on ``x`` with ``weight`` in place of its own (its bias and settings)."""
        raise NotImplementedError

    def _kept_merged(self, names: list[str], params: list[tuple[nn.Parameter, nn.Parameter]]) -> torch.Tensor:
        """The merged weight of ``names`` at their weights (``merge_cache``): the kept one while the factors, the
        weights and the base weight are as they were when it was made (version counters and storage), else made
        afresh (``_merged_weight``, the bits of the uncached merged forward) and kept. Eager calls only; never
        kept for tensors made under ``torch.inference_mode()``, which count no versions."""
        weight = self._modules["base_layer"]._parameters["weight"]
        factors = _factor_key(names, params)
        try:
            key = factors and (factors, tuple((self.weights[n], self.specs[n].scale) for n in names),
                               weight._version, weight.data_ptr(), weight.dtype)
        except RuntimeError:  # an inference-mode base weight
            key = None
        if key and key == self._merged_key:
            return self._merged
        self._merged_key = self._merged = self._kept_check = None  # (the old one freed before the new one is made)
        a, b = self._stacked(names, params, False, weight.dtype)
        merged = self._merged_weight(a, b).detach()
        kept = self._buffers.get("lora_kept")
        if _writable_as(kept, merged):
            merged = kept.copy_(merged)  # (a hooked compiled wrapper's graph reads this buffer: one copy, in place)
        if key:
            self._merged_key, self._merged = key, merged
            tensors = [*itertools.chain.from_iterable(params), weight]
            state = tuple(c if isinstance(c, frozenset) else type(c)(c) for c in self._kept_state())  # (copies)
            self._kept_check = (key, state, names, tensors, [*map(_VERSION, tensors)],
                                [*map(_DATA_PTR, tensors)], any(not isinstance(self._dropout(n), nn.Identity) for n in names))
        return merged

    def _kept_state(self) -> tuple:
        """The Python state a kept merged weight depends on, as containers compared by value (specs are frozen:
        compared by identity first; so are the dropout modules)."""
        return self.active, self.weights, self.fused, self.specs, self._dora, self._modules["lora_dropout"]._modules

    def _kept_valid(self, fast: tuple) -> bool:
        """Whether the kept merged weight still holds, checked in a few C-level passes rather than by rebuilding
        ``_kept_merged``'s key (with 8 adapters that took the call's cost over the bare layer from ~8 to ~4.6 us
        on the CPU): the Python state as it was (``_kept_state``), and the same parameter objects, base weight
        included, with the same version counters and storage."""
        _, state, names, tensors, versions, ptrs, dropout = fast
        if (dropout and self.training) or state != self._kept_state():
            return False
        current = [*itertools.chain.from_iterable(self._factors(names)), self._modules["base_layer"]._parameters["weight"]]
        return all(map(operator.is_, current, tensors)) and [*map(_VERSION, tensors)] == versions \
            and [*map(_DATA_PTR, tensors)] == ptrs

    def refresh_kept(self) -> bool | None:
        """Bring ``lora_kept`` up to date: the merged weight of the live adapters (``_kept_merged``, the bits of the
        eager kept weight; the base weight itself when every weight is 0), written in place so that a CUDA graph
        that read it reads the new values. Run eagerly, before each call of a compiled wrapper that
        ``pipeline.cache_merged_weights`` hooked; nothing to do while disabled, fused or without adapters, where the
        graph takes the base op, or for a DoRA adapter, outside the merged paths. A first call registers the buffer
        (one copy of the wrapped weight, as the eager kept weight: the two are one tensor).

        Returns ``None`` where the graph does not read the buffer, ``True`` where it is kept current with what
        ``_kept_check`` records (``kept_snapshot`` checks that in bulk), ``False`` where nothing records it (factors
        made under inference mode, every weight 0): to be merged again before each call."""
        names, weight = self._compiled_names, self._modules["base_layer"]._parameters["weight"]
        if self.disabled or not self.merge_cache or self._merge_min is None or not names or not self._dora.isdisjoint(names) \
                or (weight.dtype in FLOAT8 and _autocast_dtype(weight) is None):  # (fp8 outside autocast: beside the base)
            return None
        kept, fast = self._buffers.get("lora_kept"), self._kept_check
        if kept is not None and fast is not None and fast[0] is self._merged_key and self._merged is kept and self._kept_valid(fast):
            return True
        live = self._live()
        with torch.no_grad():
            merged = self._kept_merged(live, self._factors(live)) if live else weight
            if merged is not kept:
                if _writable_as(kept, merged):
                    kept.copy_(merged)
                else:  # (a normal tensor even under inference mode: later calls write into it outside it too)
                    with torch.inference_mode(False):
                        kept = merged.clone()
                    self.register_buffer("lora_kept", kept, persistent=False)
                    if self._merged is merged:
                        self._merged = kept
        return self._kept_check is not None and self._merged is kept

    def drop_kept(self) -> None:
        """Free ``lora_kept`` and the eager kept weight (``cache_merged_weights(..., enabled=False)``)."""
        self._buffers.pop("lora_kept", None)
        self._merged_key = self._merged = self._kept_check = None

    def _add_low_rank_(self, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``result + B(A(x))`` outside autograd; a subclass may add into ``result`` in place."""
        return result + self._low_rank(x.to(a.dtype), a, b).to(result.dtype)

    # ------------------------------------------------------------------ fuse
    def fuse_weights(self) -> dict[str, float]:
        """``{adapter: weight}`` that ``fuse`` bakes in: the active adapters with a non-zero weight. Raises
        ``ValueError`` for a DoRA adapter trained here (its change depends on its norm: save it and load the file,
        which loads as the exact dense delta and fuses)."""
        weights = {n: self.weights[n] for n in self.active if self.weights.get(n, 0.0) != 0.0}
        dora = sorted(self._dora.intersection(weights)) if self._dora else None
        if dora:
            raise ValueError(f"cannot fuse the DoRA adapter(s) {dora} trained in this process: save_lora them and "
                             "load_lora the file (a loaded DoRA file fuses), or generate unfused")
        return weights

    def scale_row(self, weights: dict[str, float], into: list[float] | None = None) -> list[float]:
        """``w * alpha / r`` of each adapter in ``weights``, repeated over its rank rows (the stacked-B scales);
        appended to ``into`` if given (and that is returned)."""
        row: list[float] = [] if into is None else into
        specs = self.specs
        for n, w in weights.items():
            spec = specs[n]
            row += [w * (spec.alpha / spec.rank)] * spec.rank  # (spec.scale's value, without a property call)
        return row

    def _fuse_factors(self, names: list[str], cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` stacked ``[R, in*k*k]`` and ``B`` side by side ``[out, R]``, unscaled, on the weight's device, in
        the dtype fusing accumulates in: fp32 (fp64 for an fp64 weight).

        While fused they are kept (keyed on the factors' version counters), so a re-weight recomputes only the
        batched matmul of ``fuse_many``."""
        params = self._factors(names)
        key = _factor_key(names, params) if cache else None
        if key is not None and key == self._fuse_key and self._fuse_cache is not None:
            return self._fuse_cache
        weight = self._modules["base_layer"]._parameters["weight"]
        wide = accumulation_dtype(weight.dtype)
        a_cat = torch.cat([a.detach().reshape(a.shape[0], -1) for a, _ in params]).to(weight.device, wide)
        b_cat = torch.cat([b.detach().reshape(b.shape[0], -1) for _, b in params], dim=1).to(weight.device, wide)
        if key is not None:
            self._fuse_key, self._fuse_cache = key, (a_cat, b_cat)
        return a_cat, b_cat

    def _delta(self, weights: dict[str, float]) -> torch.Tensor:
        """``sum w s B A`` as ``[out, in*k*k]`` in fusing's dtype: the batched matmul that fusing uses (one layer of
        the batch)."""
        a, b = self._fuse_factors(list(weights), cache=False)
        scales = torch.tensor(self.scale_row(weights), dtype=b.dtype, device=b.device)
        return torch.bmm((b * scales)[None], a[None])[0]

    def delta_weight(self, names: list[str] | None = None, weights: dict[str, float] | None = None) -> torch.Tensor:
        """``sum_i w_i (alpha_i/r_i) B_i A_i`` in the base weight's shape (default: active adapters), in the dtype
        fusing accumulates in: fp32 (fp64 for an fp64 weight)."""
        names = list(self.active if names is None else names)
        weights = self.weights if weights is None else weights
        w = self.base_layer.weight
        if not names:
            return torch.zeros(w.shape, dtype=accumulation_dtype(w.dtype), device=w.device)
        return self._delta({n: weights[n] for n in names}).view(w.shape)

    def write_fused(self, weights: dict[str, float]) -> torch.Tensor:
        """Set ``W = W0 + sum w s B A`` (fp32 or fp64, rounded once) for ``weights`` and return the new weight.
        No host-device sync here: the caller checks the weights of many layers at once (``all_finite``), so a
        model fuses with one sync in all (``pipeline.fuse_layers``, which fuses many layers with ``fuse_many``)."""
        return fuse_many([(self, weights)])[0]

    def _set_fused(self, weights: dict[str, float]) -> None:
        """Record that ``weights`` (some of the active adapters) are fused in now and drop the caches. The scales a
        compiled forward reads are refreshed unless it computes no adapter, before or now: then they are empty
        already (a re-weight of a fused model, every layer: ~1.5 us each)."""
        self.fused = dict(weights)
        if weights:  # (a compiled graph of a fused model reads the fused base weight: the kept buffer goes)
            self.drop_kept()
        self._changed(sync=bool(self._compiled_names) or len(self.fused) != len(self.active))

    def restore_fused(self, previous: dict[str, float]) -> None:
        """Back to the fused state ``previous`` (``{}``: unfused), after a refused fuse."""
        if previous:
            self.write_fused(previous)
        else:
            self.unfuse()

    def fuse(self) -> None:
        """Bake the active adapters at their weights into the base weight: ``W = W0 + delta`` (fp32 or fp64, cast
        once).

        Calling it again after a weight change recomputes from the saved ``W0``, equal to fusing afresh. Raises
        ``ValueError`` (and leaves the layer as it was) if the fused weight would hold NaN or Inf.
        """
        previous, weights = dict(self.fused), self.fuse_weights()
        if not all_finite([self.write_fused(weights)]):
            self.restore_fused(previous)
            raise ValueError(f"refusing to fuse: adapters {list(weights)} give NaN or Inf weights")

    def unfuse(self, sync: bool = True) -> None:
        """Restore the base weight exactly (bit-identical) from the copy taken at the first fuse.
        ``sync=False``: the caller refreshes ``lora_scales`` for many layers at once (``sync_scales``)."""
        self.follow_base()
        if self._base_backup is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._base_backup)
        self._base_backup = None
        self._fuse_key = self._fuse_cache = None
        self.fused = {}
        self._changed(sync=sync)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={s.rank} alpha={s.alpha:g} w={self.weights[n]:g}" for n, s in self.specs.items())


_FUSE_CHUNK = 1 << 24  # elements of the deltas that one batched matmul of fuse_many writes at most (64 MB in fp32)


def kept_snapshot(layers: list[LoraLayer]) -> tuple:
    """``refresh_kept`` of every layer, then what ``kept_holds`` checks before a later call: ``_GENERATION``, each
    base weight (identity), and each tracked layer's factors and base weight (the tensors ``_kept_check`` records:
    version counters and storage); last, the layers to merge again before every call."""
    statuses = [layer.refresh_kept() for layer in layers]
    tensors = [t for layer, status in zip(layers, statuses) if status for t in layer._kept_check[3]]
    weights = [layer._modules["base_layer"]._parameters["weight"] for layer in layers]
    return (_GENERATION, _autocast_state(), layers, weights, tensors, [*map(_VERSION, tensors)],
            [*map(_DATA_PTR, tensors)], [layer for layer, status in zip(layers, statuses) if status is False])


def _autocast_state() -> tuple:
    """Autocast's state for CUDA and the CPU: an fp8-stored layer's kept weight exists only under autocast."""
    try:
        return tuple(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) for d in ("cuda", "cpu"))
    except (TypeError, AttributeError):  # torch < 2.4: no per-device query
        return (torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype(),
                torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype())


def kept_holds(snapshot: tuple) -> bool:
    """Whether every kept buffer of ``kept_snapshot``'s layers is as current as it was then: nothing moved
    ``_GENERATION``, the base weights are the same objects, and the tracked tensors kept their versions and storage
    (a few C-level passes over all layers: ~1 us a layer, against ~10 for ``refresh_kept`` one by one)."""
    generation, autocast, layers, weights, tensors, versions, ptrs, _ = snapshot
    return generation == _GENERATION and autocast == _autocast_state() \
        and all(map(operator.is_, [layer._modules["base_layer"]._parameters["weight"] for layer in layers], weights)) \
        and [*map(_VERSION, tensors)] == versions and [*map(_DATA_PTR, tensors)] == ptrs


def fuse_many(items: list[tuple[LoraLayer, dict[str, float]]]) -> list[torch.Tensor]:
    """``write_fused`` for many layers: each ``(layer, {adapter: weight})`` gets ``W = W0 + sum w s B A`` (in fp32,
    fp64 for an fp64 weight; rounded once), and the new weights come back in order. No host-device sync (see
    ``all_finite``).

    Layers whose widened factors have the same shapes and dtype on the same device share one batched matmul, their scales
    travel in one host-device copy per device, and the adds and casts run as two multi-tensor ops per batch, so an
    SD1.5 UNet (128 layers, ~10 shapes) fuses or re-weights in a few dozen kernels where a scale, a matmul and an
    add per layer took ~400. A batch writes at most ``_FUSE_CHUNK`` elements of deltas at a time.
    """
    groups: dict[tuple, tuple[list[tuple], list[float]]] = {}  # shapes -> (members, their scale rows end to end)
    out = []
    with torch.no_grad():
        for layer, weights in items:
            layer.follow_base()
            weight = layer._modules["base_layer"]._parameters["weight"]  # (Module.__getattr__: ~1 us a layer)
            if layer._base_backup is None:
                layer._base_backup = weight.detach().clone()
            out.append(weight)
            if not weights:
                weight.copy_(layer._base_backup)
                continue
            a, b = layer._fuse_factors(list(weights), cache=True)
            group = groups.get(key := (weight.device, a.dtype, a.shape, b.shape))
            if group is None:
                group = groups[key] = ([], [])
            group[0].append((a, b, layer._base_backup, weight))
            layer.scale_row(weights, into=group[1])
        scales = floats_on_devices([(device, dtype, rows) for (device, dtype, _, _), (_, rows) in groups.items()])
        for ((_, _, a_shape, b_shape), (members, _)), rows in zip(groups.items(), scales):
            rows = rows.view(len(members), 1, b_shape[1])
            step = max(1, _FUSE_CHUNK // (b_shape[0] * a_shape[1]))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                b = torch.stack([m[1] for m in chunk]) * rows[start : start + step]
                delta = torch.bmm(b, torch.stack([m[0] for m in chunk]))
                # (a Linear's delta has its weight's shape already; a view each costs ~1 us of host time)
                deltas = [d if m[3].dim() == 2 else d.view(m[3].shape) for d, m in zip(delta.unbind(0), chunk)]
                # W0 + delta, in fp32 (fp64); a W0 stored in fp8 widened first (no fp8 arithmetic)
                torch._foreach_add_(deltas, [m[2] if m[2].dtype not in FLOAT8 else m[2].float() for m in chunk])
                torch._foreach_copy_([m[3] for m in chunk], deltas)  # rounded once to the weight's dtype
        for layer, weights in items:
            layer._set_fused(weights)
    return out


def floats_on_devices(rows: list[tuple[torch.device, torch.dtype, list[float]]]) -> list[torch.Tensor]:
    """Each ``(device, dtype, floats)`` as a tensor there: slices of one tensor per device and dtype (one
    host-device copy each)."""
    flat: dict[tuple[torch.device, torch.dtype], list[float]] = {}
    spans = []
    for device, dtype, row in rows:
        values = flat.setdefault((device, dtype), [])
        spans.append(((device, dtype), len(values), len(row)))
        values.extend(row)
    tensors = {(device, dtype): torch.tensor(values, dtype=dtype).to(device) for (device, dtype), values in flat.items()}
    return [tensors[key][start : start + n] for key, start, n in spans]


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``."""

    _MERGEABLE = nn.Linear

    def __init__(self, base_layer: nn.Linear) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features)

    def _b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank)

    def _max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, a), b)

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)

    def _dense_backward(self, x: torch.Tensor, names: list[str], compiling: bool) -> bool:
        mode = self.backward_mode
        if mode == "lowrank" or len(names) != 1:
            return False
        if mode == "auto" and not (x.is_cuda and not compiling and dense_backward_pays(self.in_features, self.out_features)):
            return False  # (compiled, inductor fuses most of the low-rank backward's extra passes away)
        base = self._modules["base_layer"]
        if type(base) is not self._MERGEABLE:  # a subclass may compute (or store its weight) otherwise
            return False
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        return frozen and not (self.training and type(self._dropout(names[0])) is not nn.Identity)

    def _merged_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self._modules["base_layer"]._parameters["weight"], b, a)

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self._modules["base_layer"]._parameters["bias"])

    def _out_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def _dora_weights(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (PEFT: W and B A in the input's dtype)
        return self._modules["base_layer"].weight.to(h.dtype), (b @ a).to(h.dtype)

    def _no_bias_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def _add_low_rank_(self, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # the second matmul adds into the base output (one kernel for matmul + add, one rounding)
        if a.dtype != result.dtype or not result.is_contiguous() or x.dtype != a.dtype:
            return super()._add_low_rank_(result, x, a, b)
        h = F.linear(x, a)
        result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t())
        return result


class LoraConv2d(LoraLayer):
    """LoRA around ``nn.Conv2d`` (LoCon): ``A`` is a conv ``[r, in, k, k]`` with the base kernel, stride,
    padding and dilation; ``B`` is a 1x1 conv ``[out, r, 1, 1]``."""

    _MERGEABLE = nn.Conv2d

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoraConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d with padding_mode={base_layer.padding_mode!r} is not supported")
        super().__init__(base_layer)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def _a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features, *self.base_layer.kernel_size)

    def _b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, 1, 1)

    def _max_rank(self) -> int:
        k = self.base_layer.kernel_size
        return min(self.in_features * k[0] * k[1], self.out_features)

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = F.conv2d(x, a, None, base.stride, base.padding, base.dilation)
        return F.conv2d(h, b)

    _rank_axis = 1

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.conv2d(x, a, None, base.stride, base.padding, base.dilation)

    def _up(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b)

    def _merged_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        weight = self._modules["base_layer"]._parameters["weight"]
        merged = torch.addmm(weight.reshape(weight.shape[0], -1), b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
        return merged.view(weight.shape)

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self._modules["base_layer"]
        return base._conv_forward(x, weight, base._parameters["bias"])

    def _out_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.norm(p=2, dim=(1, 2, 3), keepdim=True).reshape(-1)

    def _dora_weights(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self._modules["base_layer"].weight  # (PEFT's conv DoRA keeps W and B A in their own dtypes)
        return weight, torch.mm(b.view(b.shape[0], -1), a.view(a.shape[0], -1)).reshape(weight.shape)

    def _no_bias_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._modules["base_layer"]._conv_forward(x, weight, None)

"""LyCORIS LoHa, LoKr, Tucker-LoCon, DoRA, OFT / BOFT and full-delta files, read as exact LoRA factors (DoRA and
OFT: as what they make of the weight they are loaded onto, ``lora_diffusion.dora``, ``lora_diffusion.oft``).

These files name modules as kohya does (``lora_unet_..._to_q``, ``lora_te_...``) and hold, per module, one of:

- LoRA / LoCon: ``lora_down.weight``, ``lora_up.weight`` and, for a Tucker (CP) conv, ``lora_mid.weight``;
- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2`` for a Tucker conv):
  ``dW = s * (W1a W1b) * (W2a W2b)``, a Hadamard (elementwise) product;
- LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``): ``dW = s * kron(W1, W2)``;
- a full delta (A1111's ``network_full``): ``diff``, in the weight's own shape, ``dW = diff``;
- OFT / BOFT: ``oft_blocks`` (+ ``rescale``; ``alpha`` is its constraint) or ``oft_diag``, kept as
  ``LoraWeights.oft`` (empty factors) and resolved against the layer it is loaded into (``lora_diffusion.oft``);

each with an optional ``alpha``. ``s = alpha / dim``, ``dim`` being the inner width of the factors (LoHa: ``hada_w1_b``'s
rows; LoKr: ``lokr_w2_b``'s, else ``lokr_w1_b``'s), and 1 where there is no alpha or no decomposed factor: what
A1111 and ComfyUI compute. A DoRA module (LyCORIS' ``dora_wd``) has a ``dora_scale`` beside its factors: the
magnitude, ``[out, 1, ...]`` (``wd_on_output``) or ``[1, in, ...]``, kept as ``LoraWeights.magnitude`` and resolved
against the layer it is loaded into (``lora_diffusion.dora``).

Each is a product of low-rank matrices, so each is a LoRA of a known rank, exactly (no SVD):
``(U1 V1) * (U2 V2) = (U1 . U2)(V1 : V2)`` (the face-splitting identity: row-wise Kronecker products of the up
factors, column-wise of the down factors; rank ``r1 * r2``), and ``kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)``
(a full ``W`` is ``W I`` or ``I W``, whichever is thinner). The scale goes into the up factor (``alpha`` = rank).
Where that rank would exceed the layer's full rank, the delta is formed once and stored as ``I @ dW`` (or ``dW @ I``):
exact, at the cost of the layer's weight in memory. From then on such a file is a LoRA like any other: it loads
unfused, fuses, blends, merges and converts (``convert --to kohya`` writes the plain LoRA it equals).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["is_lycoris", "from_lycoris", "is_comfyui", "from_comfyui", "comfyui_key", "read_modules", "module_kinds", "dense_lora", "LYCORIS_SUFFIXES"]

# suffix -> role, for the per-module keys this reader understands
LYCORIS_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b", ".dora_scale": "dora_scale",
    ".oft_blocks": "oft_blocks", ".oft_diag": "oft_diag", ".rescale": "rescale", ".w_norm": "w_norm", ".b_norm": "b_norm",
    ".a1.weight": "glora_a1", ".a2.weight": "glora_a2", ".b1.weight": "glora_b1", ".b2.weight": "glora_b2",
    ".bm.weight": "glora_bm", ".weight": "ia3_weight", ".on_input": "ia3_on_input",
}  # fmt: skip
_SUFFIX_RE = re.compile("(" + "|".join(re.escape(s) for s in sorted(LYCORIS_SUFFIXES, key=len, reverse=True)) + ")$")
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}

# The SD UNets' 3x3 and 1x1 convolutions (diffusers paths). A LoHa / LoKr conv without Tucker factors stores its
# down factor flattened, [r, in*k*k]; these names give it its kernel back, so that a file written from it (convert,
# merge) carries conv-shaped factors, as diffusers and kohya expect. (The loader, which sees the layers, also
# reshapes flattened and 1x1 factors to fit them, as A1111 does.)
_CONV3 = re.compile(r"(^|\.)(conv1|conv2|conv_in|conv_out|(down|up)samplers\.\d+\.conv)$")
_CONV1 = re.compile(r"\.(conv_shortcut|proj_in|proj_out)$")
_PARAM_DELTA_ROLES = ("diff_b", "w_norm", "b_norm")  # deltas to a bias or a norm, whatever else the module holds
_NO_KIND_ROLES = ("alpha", "dora_scale", *_PARAM_DELTA_ROLES)  # roles that are no adapter kind of their own


class _Error(ValueError):
    pass


def _split(key: str) -> tuple[str, str] | None:
    match = _SUFFIX_RE.search(key)
    return (key[: match.start()], LYCORIS_SUFFIXES[match.group(1)]) if match else None


def is_lycoris(state: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> bool:
    """Every key is a kohya-named module key this reader understands, and some module is LoHa, LoKr, Tucker LoCon,
    DoRA or a full delta."""
    from .formats_kohya import KOHYA_PREFIXES

    roles = [_split(k) for k in state]
    if not state or any(r is None for r in roles) or not all(k.startswith(tuple(KOHYA_PREFIXES)) for k in state):
        return False
    return any(role.startswith(("hada_", "lokr_", "oft_", "glora_", "ia3_")) or role in ("mid", "diff", "dora_scale", *_PARAM_DELTA_ROLES)
               for _, role in roles)


def module_kinds(keys: list[str]) -> dict[str, int]:
    """How many modules of each kind (``LoRA``, ``LoHa``, ``LoKr``, ``full``, ``bias``; ``+bias`` with a bias delta,
    ``+DoRA`` with a magnitude) per-module keys hold, e.g. ``{"LoHa": 182, "LoRA+DoRA": 64}``."""
    roles: dict[str, set[str]] = {}
    for key in keys:
        split = _split(key)
        if split is not None:
            roles.setdefault(split[0], set()).add(split[1])

    def kind(rs: set[str]) -> str:
        kinds = "/".join(sorted(_kinds(rs)))
        alone = "norm" if rs & {"w_norm", "b_norm"} else "bias"  # (a module with parameter deltas only)
        return (kinds or alone) + ("+bias" if kinds and "diff_b" in rs else "") + ("+DoRA" if "dora_scale" in rs else "")

    return dict(sorted(Counter(kind(rs) for rs in roles.values()).items()))


def _kinds(roles) -> set[str]:
    """The adapter kinds a module's key roles belong to (one, in a well-formed file): LoHa, LoKr, OFT (BOFT too), GLoRA,
    (IA)^3, full, LoRA."""
    return {"LoHa" if r.startswith("hada_") else "LoKr" if r.startswith("lokr_") else "full" if r == "diff" else
            "OFT" if r.startswith("oft_") or r == "rescale" else "GLoRA" if r.startswith("glora_") else
            "(IA)^3" if r.startswith("ia3_") else "LoRA" for r in roles if r not in _NO_KIND_ROLES}


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return _wide(t).reshape(t.shape[0], -1)


def _tucker(t: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``einsum("ijkl,ip,jc->pckl", t, up, down)`` as ``U [out, r] @ V [r, in*k*k]``: ``U = up^T``,
    ``V[i] = sum_j t[i, j] down[j]``."""
    return _wide(up).T.contiguous(), torch.einsum("ijkl,jc->ickl", _wide(t), _wide(down)).reshape(t.shape[0], -1)


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as the thinner of ``w @ I`` and ``I @ w``."""
    w = _matrix(w)
    rows, cols = w.shape
    return (w, torch.eye(cols, dtype=w.dtype)) if cols <= rows else (torch.eye(rows, dtype=w.dtype), w)


class _Product(NamedTuple):
    """A module's delta before its scale: ``up @ down`` of rank ``rank`` (the exact factorisation), or ``delta()``
    formed directly (cheaper than the product where that rank exceeds the layer's)."""

    out: int
    cols: int
    rank: int
    factors: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    delta: Callable[[], torch.Tensor]
    kernel: tuple[int, ...] | None
    dim: int | None  # the inner width that alpha is divided by (None: scale 1)


def _face_split(u1, v1, u2, v2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u1 v1) * (u2 v2)`` (elementwise) as one product: rows of ``u`` and columns of ``v`` Kronecker-multiplied."""
    u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    return u, v


def _loha(p: dict[str, torch.Tensor]) -> _Product:
    missing = sorted(_LOHA - set(p))
    if missing:
        raise _Error(f"is LoHa but has no {', '.join(missing)}")
    halves, kernel = [], None
    for i in (1, 2):
        a, b, t = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
        if t is not None:
            halves.append(_tucker(t, a, b))
            kernel = tuple(t.shape[2:])
        else:
            halves.append((_matrix(a), _matrix(b)))
            kernel = tuple(b.shape[2:]) if b.dim() == 4 else kernel
    (u1, v1), (u2, v2) = halves
    if u1.shape[0] != u2.shape[0] or v1.shape[1] != v2.shape[1] or u1.shape[1] != v1.shape[0] or u2.shape[1] != v2.shape[0]:
        shapes = f"{list(u1.shape)} x {list(v1.shape)} and {list(u2.shape)} x {list(v2.shape)}"
        raise _Error(f"has LoHa halves that do not fit together: {shapes}")
    return _Product(u1.shape[0], v1.shape[1], u1.shape[1] * u2.shape[1], lambda: _face_split(u1, v1, u2, v2),
                    lambda: (u1 @ v1) * (u2 @ v2), kernel, int(p["hada_w1_b"].shape[0]))


def _lokr_factor(p: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    full, a, b, t = p.get(f"lokr_w{i}"), p.get(f"lokr_w{i}_a"), p.get(f"lokr_w{i}_b"), p.get(f"lokr_t{i}")
    if full is not None:
        return _full(full)
    if a is None or b is None:
        raise _Error(f"is LoKr but has neither lokr_w{i} nor both lokr_w{i}_a and lokr_w{i}_b")
    return _tucker(t, a, b) if t is not None else (_matrix(a), _matrix(b))


def _lokr(p: dict[str, torch.Tensor]) -> _Product:
    (u1, v1), (u2, v2) = _lokr_factor(p, 1), _lokr_factor(p, 2)
    if u1.shape[1] != v1.shape[0] or u2.shape[1] != v2.shape[0]:
        raise _Error(f"has LoKr factors that do not fit together: {list(u1.shape)} x {list(v1.shape)}, {list(u2.shape)} x {list(v2.shape)}")
    w2 = p.get("lokr_w2", p.get("lokr_t2", p.get("lokr_w2_b")))
    kernel = tuple(w2.shape[2:]) if w2 is not None and w2.dim() == 4 else None
    dim = next((int(p[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)
    return _Product(u1.shape[0] * u2.shape[0], v1.shape[1] * v2.shape[1], u1.shape[1] * u2.shape[1],
                    lambda: (torch.kron(u1, u2), torch.kron(v1, v2)), lambda: torch.kron(u1 @ v1, u2 @ v2), kernel, dim)


def _tucker_locon(p: dict[str, torch.Tensor]) -> _Product:
    if "down" not in p or "up" not in p:
        raise _Error("has lora_mid but not both lora_down and lora_up")
    mid, down, up = p["mid"], _matrix(p["down"]), _matrix(p["up"])
    if mid.dim() != 4 or mid.shape[:2] != (up.shape[1], down.shape[0]):
        raise _Error(f"has lora_mid {list(mid.shape)} that does not fit lora_up {list(p['up'].shape)} and lora_down {list(p['down'].shape)}")
    # dW[o, c, k, l] = sum_{n, m} up[o, n] mid[n, m, k, l] down[m, c]: U = up, V[n] = sum_m mid[n, m] down[m]
    v = torch.einsum("nmkl,mc->nckl", _wide(mid), down).reshape(mid.shape[0], -1)
    return _Product(up.shape[0], v.shape[1], up.shape[1], lambda: (up, v), lambda: up @ v, tuple(mid.shape[2:]), int(mid.shape[0]))


def _kernel(key: str, kernel: tuple[int, ...] | None, cols: int, linear_projections: bool) -> tuple[int, ...] | None:
    """The conv kernel of a module whose factors do not show it: the SD UNets' 3x3 convs by name; ``conv_shortcut``,
    and ``proj_in`` / ``proj_out`` unless the file is for SD 2.x / SDXL (whose are Linear), 1x1."""
    if kernel or not key.startswith("unet."):
        return kernel
    if _CONV3.search(key) and cols % 9 == 0:
        return (3, 3)
    if _CONV1.search(key) and (not linear_projections or key.endswith("conv_shortcut")):
        return (1, 1)
    return None


def _as_lora(product: _Product, kernel: tuple[int, ...] | None, scale: float, dtype: torch.dtype):
    """``scale * delta`` as ``LoraWeights`` (``alpha`` = rank) in ``dtype`` (the file's), conv-shaped for a
    ``kernel``: the exact low-rank factors, each rank-one pair balanced to equal norms (a LoHa's up factor is a product
    of two up factors and the scale, which can fall below float16's normal range while the down factor does not), or,
    where their rank would exceed the layer's full rank, the delta itself beside an identity."""
    out, cols = product.out, product.cols
    if product.rank <= min(out, cols):
        u, v = product.factors()
        u = u * scale
        norm_u, norm_v = u.norm(dim=0), v.norm(dim=1)
        balance = torch.where((norm_u > 0) & (norm_v > 0), (norm_v / norm_u.clamp_min(1e-30)).sqrt(), torch.ones_like(norm_u))
        u, v = u * balance, v / balance[:, None]
    else:
        u, v = _full(product.delta() * scale)
    return _lora_weights(u, v, kernel, dtype)


def _lora_weights(u: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...] | None, dtype: torch.dtype):
    """``u [out, r] @ v [r, in*k*k]`` as ``LoraWeights`` (alpha = rank) in ``dtype``, conv-shaped for a ``kernel``."""
    from .formats import LoraWeights

    (out, rank), cols = u.shape, v.shape[1]
    if kernel:
        size = kernel[0] * kernel[1]
        if cols % size:
            raise _Error(f"has a down factor {cols} wide, not a multiple of its {kernel[0]}x{kernel[1]} kernel")
        v, u = v.reshape(rank, cols // size, *kernel), u.reshape(out, rank, 1, 1)
    return LoraWeights(v.to(dtype).contiguous(), u.to(dtype).contiguous(), float(rank))


def _oft(p: dict[str, torch.Tensor], alpha: float | None, magnitude: torch.Tensor | None, kohya: bool):
    """An OFT / BOFT module's keys as ``LoraWeights`` holding ``oft`` (empty factors, rank 0)."""
    from .formats import LoraWeights
    from .oft import Oft, check_blocks

    if "oft_blocks" in p and "oft_diag" in p:
        raise _Error("has both oft_blocks and oft_diag; an OFT module has one")
    blocks = p.get("oft_blocks", p.get("oft_diag"))
    if blocks is None:
        raise _Error(f"has only {sorted(p)}: no oft_blocks")
    if magnitude is not None:
        raise _Error("has OFT blocks and a DoRA magnitude (dora_scale): not supported")
    oft = Oft(blocks, "oft_diag" in p, alpha or 0.0, p.get("rescale"), kohya)
    try:
        check_blocks(oft)
    except ValueError as e:
        raise _Error(str(e)) from None
    return LoraWeights(blocks.new_zeros(0, 0), blocks.new_zeros(oft.out, 0), 0.0, oft=oft)


def _glora(p: dict[str, torch.Tensor], alpha: float | None, magnitude: torch.Tensor | None, kohya: bool):
    """A GLoRA module's keys as ``LoraWeights`` holding it in ``oft`` (empty factors, rank 0)."""
    from .formats import LoraWeights
    from .glora import Glora

    missing = [f"{n}.weight" for n in ("a1", "a2", "b1", "b2") if f"glora_{n}" not in p]
    if missing:
        raise _Error(f"has GLoRA keys without {', '.join(missing)}")
    if magnitude is not None:
        raise _Error("has GLoRA factors and a DoRA magnitude (dora_scale): not supported")
    if "glora_bm" in p:
        raise _Error("has a GLoRA Tucker core (bm.weight), which no LyCORIS version applies or loads: not supported")
    module = Glora(p["glora_a1"], p["glora_a2"], p["glora_b1"], p["glora_b2"], alpha)
    try:
        module.check()
    except ValueError as e:
        raise _Error(str(e)) from None
    cols = module.a2.shape[0] if module.old_layout else module.a1.shape[0]
    return LoraWeights(module.a1.new_zeros(0, cols), module.a1.new_zeros(module.out, 0), 0.0, oft=module)


def _ia3(p: dict[str, torch.Tensor], alpha: float | None, magnitude: torch.Tensor | None, kohya: bool):
    """An (IA)^3 module's keys as ``LoraWeights`` holding it in ``oft`` (empty factors, rank 0)."""
    from .formats import LoraWeights
    from .glora import Ia3

    if "ia3_weight" not in p or "ia3_on_input" not in p:
        raise _Error(f"has only {sorted(p)}: an (IA)^3 module has weight and on_input")
    if magnitude is not None:  # (an alpha, which LyCORIS does not write, scales nothing: A1111 ignores it too)
        raise _Error("has an (IA)^3 weight and a DoRA magnitude (dora_scale): not supported")
    flag = p["ia3_on_input"]
    if flag.numel() != 1 or float(flag.reshape(-1)[0]) not in (0.0, 1.0):
        raise _Error(f"has on_input {', '.join(f'{v:g}' for v in flag.reshape(-1).tolist())}; it is 0 or 1")
    module = Ia3(p["ia3_weight"], bool(flag.reshape(-1)[0]))
    try:
        module.check()
    except ValueError as e:
        raise _Error(str(e)) from None
    n, weight = module.weight.numel(), module.weight
    return LoraWeights(weight.new_zeros(0, n if module.on_input else 0), weight.new_zeros(0 if module.on_input else n, 0),
                       0.0, oft=module)


def dense_lora(delta: torch.Tensor, dtype: torch.dtype | None = None):
    """A dense delta ``[out, in(, k, k)]`` as exact LoRA factors, ``delta`` beside an identity (the thinner of
    ``delta @ I`` and ``I @ delta``; alpha = rank), conv-shaped for a conv's; in ``dtype`` (default: the delta's,
    widened to fp32)."""
    u, v = _full(delta)
    return _lora_weights(u, v, tuple(delta.shape[2:]) or None, dtype or u.dtype)


def read_modules(state: dict[str, torch.Tensor], source: str, canonical: Callable[[str], str], naming: str):
    """Per-module LoRA / LoCon / Tucker LoCon / LoHa / LoKr / full-delta keys (``<module name><suffix>``, mixed as they
    come; a DoRA module's ``dora_scale`` beside its factors) -> canonical ``{"<component>.<path>": LoraWeights}``, each
    module exactly as the LoRA it equals (a DoRA module with its ``magnitude``, resolved against the layer it loads into);
    deltas to parameters outside the LoRA layers (``diff_b``, a norm's 1-D ``diff``, an embedding table's factors) as
    ``params.ParamDelta`` under ``"<component>.<module path>.<bias | weight>"``. ``canonical`` maps a
    module name to its canonical key; ``naming`` names the scheme in errors (``kohya``, ``ComfyUI``)."""
    from .formats import LoraFormatError, LoraWeights, _check_pair, guess_architecture

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = _split(key)
        if split is None:
            raise LoraFormatError(f"{source}: key {key!r} is not a LoRA / LoHa / LoKr key")
        modules.setdefault(split[0], {})[split[1]] = tensor
    lora: dict = {}
    params: dict = {}  # "<component>.<module path>.<bias | weight>" -> ParamDelta
    products = {}  # canonical key -> (module name, product, scale)
    for name, p in modules.items():
        kinds = _kinds(p)
        if len(kinds) > 1:
            raise LoraFormatError(f"{source}: {name} mixes {' and '.join(sorted(kinds))} keys; one module has one kind")
        if "alpha" in p and p["alpha"].numel() != 1:
            raise LoraFormatError(f"{source}: {name}.alpha has shape {list(p['alpha'].shape)}; an alpha is one number")
        try:
            key = canonical(name)
        except ValueError as e:
            raise LoraFormatError(f"{source}: {e}") from None
        if key in lora or key in products:
            raise LoraFormatError(f"{source}: two {naming} names map to the same module {key} (one is {name})")
        alpha = float(p["alpha"].float().item()) if "alpha" in p else None
        embedding = _EMBEDDING.search(key) is not None
        if not p.keys().isdisjoint(_PARAM_DELTA_ROLES) or ("diff" in p and p["diff"].dim() < 2) or embedding:  # parameter deltas
            try:
                params.update(_param_deltas(key, p, alpha, embedding))
            except _Error as e:
                raise LoraFormatError(f"{source}: {name} {e}") from None
            p = {role: t for role, t in p.items() if role not in _PARAM_DELTA_ROLES and not (role == "diff" and t.dim() < 2)}
            if not set(p) - {"alpha"} or embedding:
                continue
        scalars = sorted(role for role, t in p.items() if role not in ("alpha", "ia3_on_input") and t.dim() == 0)
        if scalars:
            raise LoraFormatError(f"{source}: {name} has {', '.join(scalars)} as a single number, not a tensor shaped "
                                  "for the layer")
        magnitude = p.get("dora_scale")
        if kinds & {"OFT", "GLoRA", "(IA)^3"}:  # made from the weight it is loaded onto (lora_diffusion.oft, .glora)
            read = _oft if kinds == {"OFT"} else _glora if kinds == {"GLoRA"} else _ia3
            try:
                lora[key] = read(p, alpha, magnitude, name.startswith("oft_unet_"))
            except _Error as e:
                raise LoraFormatError(f"{source}: {name} {e}") from None
            continue
        if kinds <= {"full"}:  # a full delta (A1111's network_full): the weight's own shape, scale 1
            if "diff" not in p:
                raise LoraFormatError(f"{source}: {name} has only {sorted(p)}: no factors (lora_down / lora_up, hada_*, lokr_* or diff)")
            if magnitude is not None:
                raise LoraFormatError(f"{source}: {name} has a full delta (diff) and a DoRA magnitude (dora_scale); DoRA needs LoRA factors")
            lora[key] = dense_lora(p["diff"], p["diff"].dtype)
            continue
        if kinds == {"LoRA"} and "mid" not in p:  # a plain LoRA / LoCon module, as it is
            if "down" not in p or "up" not in p:
                raise LoraFormatError(f"{source}: {name} has only {sorted(p)}; both lora_down and lora_up are needed")
            _check_pair(key, p["down"], p["up"], source)
            lora[key] = LoraWeights(p["down"], p["up"], float(p["down"].shape[0]) if alpha is None else alpha, magnitude)
            continue
        try:
            product = _loha(p) if kinds == {"LoHa"} else _lokr(p) if kinds == {"LoKr"} else _tucker_locon(p)
        except _Error as e:
            raise LoraFormatError(f"{source}: {name} {e}") from None
        except RuntimeError as e:  # shapes that do not multiply (e.g. a Tucker core against its factors)
            shapes = ", ".join(f"{role} {list(t.shape)}" for role, t in sorted(p.items()) if role != "alpha")
            raise LoraFormatError(f"{source}: {name} has factors that do not fit together: {shapes}") from e
        dtype = next(t.dtype for role, t in p.items() if role != "alpha")  # the file's
        products[key] = (name, product, alpha / product.dim if alpha is not None and product.dim else 1.0, dtype, magnitude)
    if not products:
        return {**lora, **params}
    # SD 2.x and SDXL have Linear proj_in / proj_out, SD 1.x 1x1 convs: told by the text width, as for any LoRA
    widths = {k: LoraWeights(torch.empty(0, product.cols), torch.empty(product.out, 0), 1.0) for k, (_, product, *_) in products.items()}
    linear_projections = guess_architecture({**lora, **widths}).startswith(("SDXL", "SD 2"))
    for key, (name, product, scale, dtype, magnitude) in products.items():
        try:
            w = _as_lora(product, _kernel(key, product.kernel, product.cols, linear_projections), scale, dtype)
            lora[key] = w._replace(magnitude=magnitude)
        except _Error as e:
            raise LoraFormatError(f"{source}: {name} {e}") from None
    return {**lora, **params}


# the text encoders' embedding tables (nn.Embedding: not a LoRA layer; ComfyUI's extraction gives them LoRA factors)
_EMBEDDING = re.compile(r"\.embeddings\.(token_embedding|position_embedding)$")


def _param_deltas(key: str, p: dict[str, torch.Tensor], alpha: float | None, embedding: bool) -> dict:
    """A module's deltas to parameters outside the LoRA layers (``lora_diffusion.params``): ``diff_b`` to its bias,
    a 1-D ``diff`` to its weight (a norm's scale), a ``diff`` or LoRA factors to an embedding table; LyCORIS' norm
    deltas, ``w_norm`` to a norm's weight and ``b_norm`` to its bias (added, times the weight, as LyCORIS, A1111 and
    ComfyUI add them)."""
    from .params import ParamDelta

    other = sorted(set(p) - {"down", "up", "alpha", "diff", "diff_b"}) if embedding else []
    if other:
        raise _Error(f"is an embedding table, which takes a plain LoRA or a full delta, not {', '.join(other)}")
    for a, b in (("diff_b", "b_norm"), ("diff", "w_norm")):
        if a in p and b in p:
            raise _Error(f"has both {a} and {b}, two deltas to one parameter")
    out = {}
    if "diff_b" in p or "b_norm" in p:
        out[f"{key}.bias"] = ParamDelta(p["diff_b"] if "diff_b" in p else p["b_norm"])
    if "diff" in p and (p["diff"].dim() < 2 or embedding):
        out[f"{key}.weight"] = ParamDelta(p["diff"])
    if "w_norm" in p:
        out[f"{key}.weight"] = ParamDelta(p["w_norm"])
    if embedding and ("down" in p or "up" in p):
        down, up = p.get("down"), p.get("up")
        if down is None or up is None or down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            shapes = ", ".join(f"{role} {list(t.shape)}" for role, t in sorted(p.items()) if role in ("down", "up"))
            raise _Error(f"is an embedding table with factors that do not fit together ({shapes}); it needs lora_down "
                         "[r, width] and lora_up [rows, r]")
        out[f"{key}.weight"] = ParamDelta(None, down, up, float(down.shape[0]) if alpha is None else alpha)
    return out


def from_lycoris(state: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict"):
    """LyCORIS / kohya state dict (LoHa, LoKr, LoRA, LoCon, Tucker LoCon modules, mixed as they come) ->
    canonical ``{"<component>.<path>": LoraWeights}``, each module exactly as the LoRA it equals."""
    from .formats_kohya import canonical_key

    return read_modules(state, source, canonical_key, "kohya")


# ---------------------------------------------------------------------------------------------- ComfyUI's own names
# ComfyUI writes LoRAs (its LoraSave / extraction and training nodes) under its state-dict names:
# ``diffusion_model.<LDM / SGM path>`` and ``text_encoders.<clip_l | clip_g | clip_h>.transformer.<CLIP path>``
COMFYUI_ENCODERS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
_COMFYUI_TEXT = re.compile(r"text_encoders\.(clip_[lgh])\.transformer\.(.+)")


def comfyui_key(name: str) -> str:
    """ComfyUI module name -> canonical key: ``diffusion_model.input_blocks.1.1.proj_in`` ->
    ``unet.down_blocks.0.attentions.0.proj_in``; ``text_encoders.clip_g.transformer.text_model....q_proj`` ->
    ``text_encoder_2.text_model....q_proj``."""
    from .formats import with_text_model
    from .formats_kohya import ldm_to_diffusers

    if name.startswith("diffusion_model."):
        return "unet." + ldm_to_diffusers(name.removeprefix("diffusion_model."))
    match = _COMFYUI_TEXT.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a ComfyUI module name (diffusion_model.* or text_encoders.clip_[lgh].transformer.*)")
    return f"{COMFYUI_ENCODERS[match.group(1)]}.{with_text_model(match.group(2))}"


def is_comfyui(state: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> bool:
    """Every key is a ComfyUI-named module key (``diffusion_model.*`` / ``text_encoders.*`` + a known suffix)."""
    return bool(state) and all(k.startswith(("diffusion_model.", "text_encoders.")) and _split(k) is not None for k in state)


def from_comfyui(state: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict"):
    """A LoRA (or LoCon / LoHa / LoKr) that ComfyUI wrote under its own module names -> canonical form. SD 1.x's
    ``clip_l`` and SD 2.x's ``clip_h`` are the text encoder, SDXL's ``clip_l`` / ``clip_g`` its two."""
    return read_modules(state, source, comfyui_key, "ComfyUI")

"""Blending adapters: per-block weights, prompt syntax, and exact or SVD merges of LoRA files.

Every blend acts on ``delta W = w * (alpha / r) * B @ A``; the factors ``A`` and ``B`` of different adapters
are never averaged (that adds cross terms). A concatenated merge is exact (ranks add up); an SVD merge is
labelled approximate and reports its relative Frobenius error per layer and overall.

Example:
    >>> report = merge_loras({"style.safetensors": 0.7, "subject.safetensors": 0.3}, "both.safetensors")
    >>> report = merge_loras({"a.safetensors": 1, "b.safetensors": 1}, "ab16.safetensors", mode="svd", rank=16)
    >>> report.error                                   # overall relative Frobenius error of the rank-16 merge
    >>> prompt, weights = parse_prompt("a cat <lora:style:0.7> <lora:subject:1:0.8>")
    >>> block_factor({"down": 0.5, "up": {"block_1": [1, 0.5, 0]}}, "unet", "up_blocks.1.attentions.2.proj_in")
    0.0
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .formats import FORMAT_VERSION, Lora, LoraWeights, read_bundled_embeddings, read_lora_file_with_params, write_lora_file

logger = logging.getLogger(__name__)

__all__ = [
    "LBW_SD1",
    "LBW_SDXL",
    "LBW_SD1_ALL",
    "LBW_SDXL_ALL",
    "lbw_block",
    "lbw_blocks",
    "LBW_PRESETS",
    "block_factor",
    "check_blocks",
    "merge_lora_dicts",
    "merge_loras",
    "MergeReport",
    "parse_prompt",
    "PromptWeight",
    "apply_prompt_loras",
]

# ---------------------------------------------------------------------------------------------- block weights
# LoRA Block Weight (sd-webui-lora-block-weight) SD1 vector: BASE = text encoder, then the LDM UNet blocks
# that hold attention. Block names refer to the original LDM input_blocks / output_blocks indices.
LBW_SD1 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
           "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")  # fmt: skip
# and its 12-value SDXL vector (SDXL's UNet has three levels, attention in the lower two and the middle)
LBW_SDXL = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
# every block, as the LBW extension takes them for LyCORIS / LoCon files: SD1's 26 and SDXL's 20
LBW_SD1_ALL = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
LBW_SDXL_ALL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))

_BLOCK_PATH = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)(\.|$)")

BlockSpec = float | Sequence[float] | Mapping[str, object] | None


def lbw_block(component: str, path: str, layers_per_block: int = 2) -> str | None:
    """LBW block name of a layer (``"BASE"``, ``"IN04"``, ``"MID"``, ``"OUT07"``), ``None`` outside the blocks.

    Example:
        >>> lbw_block("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        'IN04'
    """
    if component.startswith("text_encoder"):
        return "BASE"
    if path.startswith("mid_block."):
        return "MID"
    if path == "conv_in" or path.startswith("conv_in."):
        return "IN00"  # (the LDM input_blocks.0)
    m = _BLOCK_PATH.match(path)
    if not m:
        return None  # time_embedding, conv_out
    kind, b, sub, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    n = layers_per_block + 1
    if kind == "down_blocks":
        index = n * b + (n if sub == "downsamplers" else j + 1)
        return f"IN{index:02d}"
    index = n * b + (n - 1 if sub == "upsamplers" else j)
    return f"OUT{index:02d}"


def _diffusers_block_factor(spec: Mapping[str, object], path: str) -> float:
    """diffusers-style ``{"down": x, "mid": y, "up": {"block_0": [..]}}`` factor for one UNet module path."""
    if path.startswith("mid_block."):
        mid = spec.get("mid", 1.0)
        return float(mid[0] if isinstance(mid, (list, tuple)) else mid)
    m = _BLOCK_PATH.match(path)
    if not m:
        return 1.0
    updown = "down" if m.group(1) == "down_blocks" else "up"
    value = spec.get(updown, 1.0)
    if isinstance(value, Mapping):
        value = value.get(f"block_{m.group(2)}", 1.0)
    if isinstance(value, (list, tuple)):
        if m.group(3) in ("downsamplers", "upsamplers"):
            return float(value[-1])  # a sampler follows the block's last layer
        j = int(m.group(4))
        if len(value) == 1:
            return float(value[0])
        if j >= len(value):
            raise ValueError(f"blocks[{updown!r}][block_{m.group(2)}] has {len(value)} values but {path} is layer {j}")
        return float(value[j])
    return float(value)


def block_factor(spec: BlockSpec, component: str, path: str, layers_per_block: int = 2) -> float:
    """Multiplier of one layer's weight under a block spec.

    ``spec`` is ``None`` (1.0), a LoRA Block Weight vector as the LBW extension for A1111 takes it (17 values in
    ``LBW_SD1`` order, SDXL's 12 in ``LBW_SDXL`` order, or every block: SD1's 26, ``LBW_SD1_ALL``, SDXL's 20,
    ``LBW_SDXL_ALL``; BASE scales the text encoders; a block the vector leaves out, such as SD1's IN00 (conv_in),
    IN03 or OUT00-OUT02, which only LoCon layers reach, gets 0, as there; the time embedding and conv_out keep 1.0),
    or a diffusers-style dict ``{"down": 0.3, "mid": 0, "up": {"block_0": [1.0, 0.5, 0.2]}}`` (a number
    for a whole side or block; a list per layer index, shared by ``attentions.j`` and ``resnets.j``; samplers
    take the block's last value; text encoders and layers outside the blocks 1.0). ``path`` is the module path
    inside ``component``.

    Example:
        >>> block_factor([1, 0, 0, 0, 0, 0, 0, 0.5] + [1] * 9, "unet", "mid_block.attentions.0.proj_in")
        0.5
    """
    if spec is None:
        return 1.0
    if isinstance(spec, Mapping):
        return 1.0 if component.startswith("text_encoder") else _diffusers_block_factor(spec, path)
    if isinstance(spec, (int, float)):
        return 1.0 if component.startswith("text_encoder") else float(spec)
    values = list(spec)
    names = _lbw_names(len(values))
    name = lbw_block(component, path, layers_per_block)
    if name is None:
        return 1.0
    return float(values[names.index(name)]) if name in names else 0.0


def _lbw_names(count: int) -> tuple[str, ...]:
    """The block names of an LBW vector of ``count`` values: SD1's 17 or 26, SDXL's 12 or 20."""
    for names in (LBW_SD1, LBW_SDXL, LBW_SD1_ALL, LBW_SDXL_ALL):
        if count == len(names):
            return names
    raise ValueError(f"a LoRA Block Weight vector has {len(LBW_SD1)} values ({', '.join(LBW_SD1)}), 12 for SDXL "
                     f"({', '.join(LBW_SDXL)}), or one per block: 26 (SD1) or 20 (SDXL); got {count}")


def check_blocks(spec: BlockSpec, layers_per_block: int = 2) -> None:
    """Raise ``ValueError`` early for a malformed block spec: unknown keys, a wrong LBW vector length, or (as
    diffusers) a per-layer list whose length is not the block's layer count: ``layers_per_block`` down,
    one more up, 1 for mid (a one-value list stands for the whole block)."""
    if spec is None or isinstance(spec, (int, float)):
        return
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"down", "mid", "up"})
        if unknown:
            raise ValueError(f"block weights take keys 'down', 'mid', 'up'; got {unknown}")
        counts = {"down": layers_per_block, "up": layers_per_block + 1, "mid": 1}
        for side, count in counts.items():
            value = spec.get(side)
            if isinstance(value, Mapping) and side != "mid":
                bad = [k for k in value if not re.fullmatch(r"block_\d+", str(k))]
                if bad:
                    raise ValueError(f"blocks[{side!r}] keys must be 'block_<i>', got {bad}")
            lists = value.items() if isinstance(value, Mapping) else [(None, value)]
            for block, values in lists:
                if isinstance(values, (list, tuple)) and len(values) not in (1, count):
                    where = side if block is None else f"{side}.{block}"
                    raise ValueError(f"blocks: expected {count} values for {where} (one per layer), got {len(values)}")
        return
    _lbw_names(len(list(spec)))


# ---------------------------------------------------------------------------------------------- merging
@dataclass
class MergeReport:
    """Result of a merge (or of an extraction, ``lora_diffusion.extract``: mode ``extract``): the merged LoRA, its
    mode, and (svd, extract) the relative Frobenius error per layer and overall.

    ``errors[key] = ||dW - dW_merged||_F / ||dW||_F`` measured on the factors as written; ``error`` is the same
    over all layers together, ``sqrt(sum ||dW - dW_merged||^2 / sum ||dW||^2)``. A concat merge reports zeros.
    """

    lora: Lora = field(repr=False)
    mode: str
    errors: dict[str, float] = field(default_factory=dict, repr=False)
    error: float = 0.0
    path: Path | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted({w.rank for w in self.lora.values()})


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _delta(weights: Sequence[tuple[LoraWeights, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated fp32 ``(A_cat [R, in*k*k], B_cat [out, R])`` with ``w * alpha / r`` folded into B."""
    a = torch.cat([_flat(w.A.float()) for w, _ in weights], dim=0)
    b = torch.cat([_flat(w.B.float()) * (weight * w.alpha / w.rank) for w, weight in weights], dim=1)
    return a, b


def _as_layer(a: torch.Tensor, b: torch.Tensor, like: LoraWeights) -> LoraWeights:
    """Flat factors back to the layer's shapes (conv: ``[r, in, k, k]`` and ``[out, r, 1, 1]``); alpha = rank."""
    r = a.shape[0]
    if like.A.dim() == 4:
        return LoraWeights(a.reshape(r, *like.A.shape[1:]), b.reshape(b.shape[0], r, 1, 1), float(r))
    return LoraWeights(a, b, float(r))


def finite_number(value, what: str) -> float:
    """``value`` as a float, else ``ValueError`` naming ``what``: a weight (or a guidance...) that is not a finite
    number (NaN or Inf make a black image, or a file of NaNs)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return x


def _weighted_inputs(inputs: Sequence[tuple]) -> list[tuple[dict, float, BlockSpec]]:
    """``(dict, weight)`` or ``(dict, weight, block spec)`` entries as ``(dict, weight, spec or None)``, each spec
    checked (``check_blocks``)."""
    out = []
    for i, entry in enumerate(inputs):
        lora, w, spec = (*entry, None)[:3]
        check_blocks(spec)
        out.append((lora, finite_number(w, f"merge input {i}: the weight"), spec))
    return out


def _parts(inputs: list[tuple[dict, float, BlockSpec]], key: str, module: str) -> list[tuple[object, float]]:
    """The inputs' entries for ``key`` with their weights on the layer ``module`` names (``"<component>.<path>"``):
    the weight times the block spec's factor there, as ``set_adapters(blocks=...)`` weighs it. An entry that its
    block spec weighs at 0 is left out (a zero weight given as such stays, as before block specs)."""
    component, _, path = module.partition(".")
    parts = []
    for entries, w, spec in inputs:
        if key in entries:
            weight = w if spec is None else w * block_factor(spec, component, path)
            if spec is None or weight != 0.0:
                parts.append((entries[key], weight))
    return parts


def merge_params(inputs: Sequence[tuple]) -> dict:
    """Weighted sum of parameter deltas (``params.ParamDelta``): full deltas added, an embedding table's factors
    concatenated (``w * alpha / r`` folded into B, alpha = rank), as ``merge_lora_dicts`` merges LoRA layers; a
    table with both kinds is summed densely. Entries ``(deltas, weight)`` or ``(deltas, weight, block spec)``."""
    from .params import ParamDelta

    out = {}
    inputs = _weighted_inputs(inputs)
    for key in dict.fromkeys(k for params, _, _ in inputs for k in params):
        parts = _parts(inputs, key, key.rsplit(".", 1)[0])  # (a parameter's module: its block)
        if not parts:
            continue
        if all(d.delta is None for d, _ in parts):
            a = torch.cat([d.A.float() for d, _ in parts])
            b = torch.cat([d.B.float() * (w * d.alpha / d.A.shape[0]) for d, w in parts], dim=1)
            out[key] = ParamDelta(None, a, b, float(a.shape[0]))
        else:
            out[key] = ParamDelta(sum(d.value(torch.float32, torch.device("cpu")) * w for d, w in parts))
    return out


def _bundled(pairs, headers) -> dict[str, dict[str, torch.Tensor]]:
    """The embeddings bundled in the inputs (``bundle_emb.*``), all of them; one name with other vectors in two inputs
    is refused, naming it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (path, _), header in zip(pairs, headers):
        if "_bundled_embeddings" not in header:
            continue
        for name, parts in read_bundled_embeddings(path).items():
            same = name in out and out[name].keys() == parts.keys() and all(torch.equal(out[name][k], parts[k]) for k in parts)
            if name in out and not same:
                raise ValueError(f"{path}: bundles an embedding {name!r} that another input bundles with other vectors")
            out[name] = parts
    return out


def _refuse_base_dependent(lora: Lora, source: str) -> None:
    key = next((k for k, w in lora.items() if w.magnitude is not None or w.oft is not None), None)
    if key is not None:
        kind = "a DoRA module" if lora[key].magnitude is not None else lora[key].oft.described
        raise ValueError(f"{source}: {key} is {kind}, whose delta depends on the base model's weights: it cannot be "
                         "merged without them. Load the files into a pipeline (load_lora, set_adapters, fuse) or bake them")


def merge_lora_dicts(
    loras: Sequence[tuple[Lora, float] | tuple[Lora, float, BlockSpec]],
    *,
    mode: str = "concat",
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    fro: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    conv_rank: int | None = None,
) -> MergeReport:
    """Merge canonical LoRAs with weights into one: ``dW = sum_i w_i (alpha_i/r_i) B_i A_i`` per layer.

    ``mode="concat"``: exact; ``A = [A_1; A_2; ...]``, ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, rank = sum of
    ranks, alpha = rank. ``mode="svd"``: the best rank-``rank`` approximation of ``dW`` (``rank=None``: the
    concatenated rank, exact), computed from QR factors of ``B`` and ``A`` so it never forms an SVD of the full
    matrix; the singular values are split evenly between the factors. Errors are measured after casting the
    factors to ``dtype`` (what the file will hold). Layers present in only some inputs are merged from those.
    ``fro`` (svd): a rank per layer, the fewest singular values that keep this share of ``dW``'s Frobenius norm
    (kohya's ``resize_lora.py --dynamic_method sv_fro``), at most ``rank``; ``sv_cumulative``: the fewest whose sum
    reaches this share of the sum of all (``sv_cumulative``); ``sv_ratio``: those above the largest divided by this
    ratio (``sv_ratio``); one of the three at a time. ``conv_rank`` (svd): the rank of the 3x3 convolutions'
    layers (LoCon; kohya's ``--new_conv_rank``), ``rank`` the others'. An entry ``(lora, w, blocks)`` weighs its
    layers by a block spec too (``block_factor``: an LBW vector or preset's values, a diffusers block dict), as
    ``set_adapters(blocks=...)`` does at run time; an input its blocks weigh at 0 on a layer is left out there (a layer
    that all inputs' blocks zero, altogether).

    Example:
        >>> report = merge_lora_dicts([(style, 0.7), (subject, 0.3)], mode="svd", rank=8)
        >>> report = merge_lora_dicts([(style, 1.0, LBW_PRESETS["OUTD"]), (subject, 0.5)])
    """
    if mode not in ("concat", "svd"):
        raise ValueError(f"mode must be 'concat' or 'svd', got {mode!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and mode != "svd":
        raise ValueError(f"rank={rank} needs mode='svd' (a concat merge is exact: its ranks add up)")
    if fro is not None and (mode != "svd" or not 0 < fro <= 1):
        raise ValueError(f"fro={fro} needs mode='svd' and a share in (0, 1]")
    if sv_cumulative is not None and (mode != "svd" or not 0 < sv_cumulative <= 1):
        raise ValueError(f"sv_cumulative={sv_cumulative} needs mode='svd' and a share in (0, 1]")
    if sv_ratio is not None and (mode != "svd" or not sv_ratio >= 1):
        raise ValueError(f"sv_ratio={sv_ratio} needs mode='svd' and a ratio of at least 1")
    if sum(v is not None for v in (fro, sv_ratio, sv_cumulative)) > 1:
        raise ValueError("give one of fro, sv_ratio and sv_cumulative (each picks a rank per layer)")
    if conv_rank is not None and (mode != "svd" or isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 1):
        raise ValueError(f"conv_rank={conv_rank!r} needs mode='svd' and a positive integer")
    if not loras:
        raise ValueError("nothing to merge")
    loras = _weighted_inputs(loras)
    for lora, _, _ in loras:
        _refuse_base_dependent(lora, "a LoRA to merge")
    keys = list(dict.fromkeys(k for lora, _, _ in loras for k in lora))
    merged: Lora = {}
    errors: dict[str, float] = {}
    err_sq = norm_sq = 0.0
    for key in keys:
        parts = _parts(loras, key, key)
        if not parts:
            continue  # (every input's blocks weigh this layer at 0)
        shapes = {(tuple(p.A.shape[1:]), tuple(p.B.shape[:1])) for p, _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"{key}: the inputs disagree on the layer's shape ({sorted(shapes)}); they target different models")
        a0, b0 = a, b = _delta(parts)
        if mode == "svd":
            qb, rb = torch.linalg.qr(b)  # b = qb rb
            qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
            u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
            like = parts[0][0].A
            cap = conv_rank if conv_rank is not None and like.dim() == 4 and like.shape[2:] != (1, 1) else rank
            k = min(cap or a.shape[0], s.numel(), _dynamic_rank(s, fro, sv_ratio, sv_cumulative))
            root = s[:k].sqrt()
            b, a = (qb @ u[:, :k]) * root, root[:, None] * (vh[:k] @ qa.T)
        out = _as_layer(a, b, parts[0][0])
        if dtype is not None:
            out = LoraWeights(out.A.to(dtype), out.B.to(dtype), out.alpha)
        merged[key] = out
        if mode == "svd":
            exact = b0 @ a0
            diff = float((exact - _flat(out.B.float()) @ _flat(out.A.float())).pow(2).sum())
            total = float(exact.pow(2).sum())
            errors[key] = (diff / total) ** 0.5 if total > 0 else 0.0
            err_sq, norm_sq = err_sq + diff, norm_sq + total
    if keys and not merged:
        raise ValueError("the inputs' block weights weigh every layer at 0: nothing to merge")
    report = MergeReport(merged, mode, errors, (err_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0)
    if mode == "svd":
        logger.info("svd merge to rank %s: overall relative Frobenius error %.3g", rank, report.error)
    return report


def _dynamic_rank(s: torch.Tensor, fro: float | None, ratio: float | None, cumulative: float | None) -> int:
    """The rank that ``merge_lora_dicts``' ``fro`` / ``sv_ratio`` / ``sv_cumulative`` pick from the singular values
    ``s`` (descending): at least one, all of them where none is given."""
    s = s.double()
    if fro is not None or cumulative is not None:  # the fewest values reaching the share (1e-12: rounding)
        total = s.pow(2).cumsum(0) if fro is not None else s.cumsum(0)
        share = fro**2 if fro is not None else cumulative
        return max(1, int(torch.searchsorted(total, share * total[-1] * (1 - 1e-12)).item()) + 1)
    if ratio is not None:
        return max(1, int((s > s[0] / ratio).sum()))
    return s.numel()


def merge_loras(
    inputs: Mapping[str | os.PathLike, float | tuple[float, BlockSpec]] | Sequence[tuple],
    out: str | os.PathLike | None = None,
    *,
    mode: str = "concat",
    rank: int | None = None,
    format: str = "diffusers",
    dtype: torch.dtype = torch.float16,
    metadata: dict | None = None,
    fro: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    conv_rank: int | None = None,
) -> MergeReport:
    """Merge LoRA files with weights (any readable format, mixed ranks and alphas) and write ``out``.

    See ``merge_lora_dicts`` for the modes (and ``fro`` / ``sv_ratio`` / ``sv_cumulative``, ``conv_rank``; one input with ``mode="svd"`` resizes a LoRA). ``format``: ``"diffusers"`` or ``"kohya"``. The merge's inputs,
    weights, mode, rank and (svd) overall error go into the file's metadata. Returns the ``MergeReport``. An input
    may come with a block spec, ``{path: (weight, blocks)}`` or ``(path, weight, blocks)``: an LBW vector (or a preset's
    values, ``LBW_PRESETS``) or a diffusers block dict, weighing its layers as ``set_adapters(blocks=...)`` does.

    Example:
        >>> merge_loras({"a.safetensors": 0.7, "b.safetensors": 0.3}, "out.safetensors", mode="svd", rank=16).error
        0.0123
        >>> merge_loras([("a.safetensors", 1.0, LBW_PRESETS["OUTD"]), ("b.safetensors", 0.5)], "out.safetensors")
    """
    triples = [_input_triple(entry) for entry in (inputs.items() if isinstance(inputs, Mapping) else inputs)]
    pairs = [(path, w) for path, w, _ in triples]
    read = [read_lora_file_with_params(path) for path, _ in pairs]
    loras = [(lora, float(w), blocks) for (lora, _, _), (_, w, blocks) in zip(read, triples)]
    params = merge_params([(p, float(w), blocks) for (_, p, _), (_, w, blocks) in zip(read, triples)])
    for (path, _), (lora, _, _) in zip(pairs, loras):
        _refuse_base_dependent(lora, str(path))
    embeddings = _bundled(pairs, [header for _, _, header in read])
    if embeddings and format != "kohya":
        raise ValueError(f"the inputs bundle the embeddings {', '.join(embeddings)}, which a {format} file cannot hold: "
                         "merge with format='kohya' (--format kohya) to keep them")
    dynamic = {"fro": fro, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative, "conv_rank": conv_rank}
    report = merge_lora_dicts(loras, mode=mode, rank=rank, dtype=dtype, **dynamic)
    if out is not None:
        meta = {
            "format_version": FORMAT_VERSION,
            "name": Path(out).stem,
            "merged_from": [{"file": Path(p).name, "weight": float(w), **({"blocks": _jsonable(b)} if b is not None else {})}
                            for p, w, b in triples],
            "merge_mode": mode,
            **({"merge_rank": rank, "merge_rel_error": report.error} if mode == "svd" else {}),
            **{f"merge_{k}": v for k, v in dynamic.items() if v is not None},
            **(metadata or {}),
        }
        write_lora_file(out, report.lora, metadata=meta, format=format, dtype=dtype, embeddings=embeddings or None, params=params or None)
        report.path = Path(out)
    return report


def _input_triple(entry: tuple) -> tuple[str | os.PathLike, float, BlockSpec]:
    """A merge input, ``(path, weight)``, ``(path, weight, blocks)`` or ``(path, (weight, blocks))``, as
    ``(path, weight, blocks or None)``."""
    path, *rest = entry
    if len(rest) == 1 and isinstance(rest[0], tuple):
        rest = list(rest[0])
    if len(rest) not in (1, 2):
        raise ValueError(f"a merge input is (file, weight) or (file, weight, blocks), got {entry!r}")
    return path, finite_number(rest[0], f"{path}: the weight"), rest[1] if len(rest) == 2 else None


def _jsonable(spec: BlockSpec):
    """A block spec as the metadata holds it (a vector as a list)."""
    return dict(spec) if isinstance(spec, Mapping) else spec if isinstance(spec, (int, float)) else [float(v) for v in spec]


# ---------------------------------------------------------------------------------------------- prompt syntax
class PromptWeight(NamedTuple):
    """Weights of one ``<lora:...>`` tag: text encoder (``te``), UNet (``unet``) and, where the tag gives one, a LoRA
    Block Weight vector (``blocks``, as ``set_adapters(blocks=...)`` takes it)."""

    te: float
    unet: float
    blocks: tuple[float, ...] | None = None


# The LBW extension's default presets (its DEF_WEIGHT_PRESET), 17 values in LBW_SD1 order, for ``<lora:name:w:IND>``
# and ``lbw=IND``; a vector of 12, 17, 20 or 26 values is taken as it is
LBW_PRESETS = {
    "NONE": (0,) * 17, "ALL": (1,) * 17, "ALL0.5": (0.5,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13, "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10, "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0) + (1,) * 8 + (0,) * 5, "OUTD": (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5,
    "OUTS": (1,) + (0,) * 11 + (1,) * 5, "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
}  # fmt: skip


def lbw_blocks(text: str) -> tuple[float, ...]:
    """A LoRA Block Weight preset name (``LBW_PRESETS``: ``OUTD``...) or comma-separated vector (17 values for SD1,
    12 for SDXL, or one per block) as the vector; ``ValueError`` saying what is wrong.

    Example:
        >>> lbw_blocks("OUTD")[:9]
        (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    """
    text = text.strip()
    if text in LBW_PRESETS:
        return tuple(float(v) for v in LBW_PRESETS[text])
    try:
        vector = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is neither a block weight preset ({', '.join(LBW_PRESETS)}) nor a vector of "
                         "numbers (the LBW extension's random R / U and inherited X values are not supported)") from None
    _lbw_names(len(vector))
    return vector


def _lbw_vector(value: str, tag: str) -> tuple[float, ...] | None:
    """An LBW tag argument as a vector: a preset name or comma-separated values (``None`` for anything else)."""
    if value not in LBW_PRESETS and "," not in value:
        return None
    try:
        return lbw_blocks(value)
    except ValueError as e:
        raise ValueError(f"bad LoRA tag {tag!r}: {e}") from None


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # an A1111 extra-network tag: <kind:args>
_LORA_KINDS = ("lora", "lyco")


def parse_prompt(prompt: str) -> tuple[str, dict[str, PromptWeight]]:
    """Split A1111-style LoRA tags out of a prompt: ``(clean prompt, {name: PromptWeight(te, unet)})``.

    ``<lora:name>`` is weight 1, ``<lora:name:w>`` sets both, ``<lora:name:te:unet>`` each (A1111 order), and
    the named forms ``te=`` / ``unet=`` work too. A LoRA Block Weight (the LBW extension's syntax) comes as ``lbw=``
    (or ``w=``) or in the third place: a preset (``LBW_PRESETS``: ``<lora:name:0.8:IND>``) or a vector
    (``<lora:name:1:lbw=1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0>``); the UNet weight is then the text encoder's. A name given twice keeps the last tag (with a warning; A1111
    applies such a LoRA twice, at the last tag's weights). Every ``<kind:...>`` tag is taken out as A1111 takes it
    out, by nothing, others (``<hypernet:...>``) with a warning; runs of whitespace become one space, as CLIP's
    tokenizer makes them: the clean prompt gives A1111's tokens.

    Example:
        >>> parse_prompt("a cat <lora:style:0.7> <lora:subject:1:0.8>")
        ('a cat', {'style': PromptWeight(te=0.7, unet=0.7), 'subject': PromptWeight(te=1.0, unet=0.8)})
    """
    found: dict[str, PromptWeight] = {}

    def take(m: re.Match) -> str:
        if m.group(1) not in _LORA_KINDS:
            logger.warning("prompt tag %s: <%s:...> tags are not supported here; taken out of the prompt, as A1111 "
                           "takes them out", m.group(0), m.group(1))
            return ""
        name, *args = (a.strip() for a in m.group(2).split(":"))
        if not name:
            raise ValueError(f"bad LoRA tag {m.group(0)!r}: no name")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        spec = named.get("lbw", named.get("w"))
        blocks = _lbw_vector(spec, m.group(0)) if spec is not None else None
        if spec is not None and blocks is None:
            raise ValueError(f"bad LoRA tag {m.group(0)!r}: lbw={spec} is neither a block weight preset "
                             f"({', '.join(LBW_PRESETS)}) nor a vector")
        if blocks is None and len(positional) > 1:
            blocks = _lbw_vector(positional[1], m.group(0))
            if blocks is not None:  # (the LBW extension's place for it: the UNet weight follows the text encoder's)
                positional = positional[:1]
        ignored = [f"{k}=" for k in named if k not in ("te", "unet", "lbw", "w")] + (["dyn"] if len(positional) > 2 else [])
        if ignored:
            logger.warning("LoRA tag %s: %s not supported, ignored", m.group(0), ", ".join(ignored))
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"bad LoRA tag {m.group(0)!r}: weights must be numbers") from None
        if name in found:
            logger.warning("LoRA %r is tagged twice in the prompt; the last tag wins", name)
        found[name] = PromptWeight(te, unet, blocks)
        return ""

    clean = " ".join(_EXTRA_NETWORK.sub(take, prompt).split())
    return clean, found


def apply_prompt_loras(pipe, prompt: str, lora_dir: str | os.PathLike | None = None) -> str:
    """Load (from ``lora_dir/<name>.safetensors``, once) and weight the LoRAs tagged in ``prompt``; return the
    prompt without tags. Adapters already loaded but not tagged are switched off, as in A1111.

    Every tag is checked before anything loads (a name must stay inside ``lora_dir``: no absolute paths, no
    ``..``), and on any error the adapters this call loaded are deleted again: the pipeline stays as it was.

    Example:
        >>> prompt = apply_prompt_loras(pipe, "a cat <lora:style:0.7>", "loras/")
        >>> image = pipe(prompt).images[0]
    """
    from .pipeline import delete_adapter, list_adapters, load_lora, set_adapters  # pipeline builds on this module

    clean, tags = parse_prompt(prompt)
    loaded = {n for names in list_adapters(pipe).values() for n in names}
    paths = {name: _tag_path(name, lora_dir, loaded) for name in tags if name not in loaded}
    added: list[str] = []
    try:
        for name, path in paths.items():
            added.append(load_lora(pipe, path, adapter=name, weight=0.0))
        blocks = {n: list(w.blocks) for n, w in tags.items() if w.blocks is not None}
        set_adapters(pipe, {n: w.unet for n, w in tags.items()}, text_encoder={n: w.te for n, w in tags.items()},
                     blocks=blocks or None)
    except BaseException:
        for name in added:
            delete_adapter(pipe, name)
        raise
    return clean


def _tag_path(name: str, lora_dir: str | os.PathLike | None, loaded: set[str]) -> Path:
    """The file of the tag ``<lora:name:...>``, found as A1111 finds it: ``lora_dir/<name>.safetensors``, else a
    ``<name>.safetensors`` in a subfolder, else the file whose alias (kohya's ``ss_output_name``, which A1111's
    cards insert) is ``name``; it must lie inside ``lora_dir``."""
    if lora_dir is None:
        raise KeyError(f"LoRA {name!r} is not loaded and no lora_dir was given; loaded: {sorted(loaded)}")
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in PurePath(name.replace("\\", "/")).parts:
        raise ValueError(f"<lora:{name}:...>: a LoRA name is a file name inside {lora_dir}, not a path out of it")
    path = Path(lora_dir) / f"{name}.safetensors"
    if path.is_file():
        return path
    if "/" not in name and "\\" not in name:
        files = sorted(p for p in Path(lora_dir).rglob("*.safetensors") if p.is_file())
        for found in ([p for p in files if p.stem == name], [p for p in files if _alias(p) == name]):
            if found:
                if len(found) > 1:
                    logger.warning("<lora:%s:...> names %d files in %s; taking %s", name, len(found), lora_dir, found[0])
                return found[0]
    raise FileNotFoundError(f"{path}: no LoRA file for the tag <lora:{name}:...> (nor one of that name or alias "
                            "in its subfolders)")


def _alias(path: Path) -> str | None:
    """A LoRA file's alias in A1111: its ``ss_output_name`` (read from the header alone), if any."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("ss_output_name")
    except (OSError, SafetensorError):
        return None

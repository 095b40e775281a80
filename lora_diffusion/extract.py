"""Extract a LoRA from a fine-tuned model: the best rank-r approximation of each targeted layer's change.

For every layer the targets select (as ``inject_lora`` selects them: attention by default, ``full`` for LoCon's
convolutions too) in the UNet and the text encoder(s), ``dW = W_tuned - W_base`` (a conv's as ``[out, in*k*k]``) is
cut to rank ``r`` by a singular value decomposition (in fp32, fp64 for an fp64 model) (Eckart-Young: no rank-r product is closer in Frobenius norm),
``sqrt(s)`` on each side, alpha = rank. Layers whose weights are equal are left out; so is a text encoder with no
change at all. The report gives each layer's relative error ``||dW - B A|| / ||dW||`` and the error over all layers,
as an SVD merge reports it (kohya's ``extract_lora_from_models.py``, ComfyUI's "Extract and Save Lora" do the same).

Example:
    >>> report = extract_lora("models/sd15", "models/sd15-finetuned", "finetune_r32.safetensors", rank=32)
    >>> report.error   # relative Frobenius error over every extracted layer
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .blend import MergeReport
from .formats import FILE_COMPONENTS, WRITERS, LoraWeights, with_text_model, write_lora_file
from .inject import resolve_targets, unwrap
from .layers import LoraLayer, accumulation_dtype

logger = logging.getLogger(__name__)

__all__ = ["extract_lora"]


def _computed_weight(module: torch.nn.Module, key: str) -> torch.Tensor:
    """The weight a layer computes with: its own, or, for a LoRA layer with unfused adapters, ``W + sum w s B A`` of
    those active (the base weight while disabled); a pipeline given as ``base`` or ``tuned`` may hold adapters."""
    if not isinstance(module, LoraLayer):
        return module.weight.detach()
    weight = module.base_layer.weight.detach()
    if module.disabled or not module.active:
        return weight
    if module._dora.intersection(module.active):
        raise ValueError(f"{key}: a DoRA adapter trained in this process is active; save_lora and load the file (it loads "
                         "as its exact delta), or fuse, then extract")
    return weight.to(accumulation_dtype(weight.dtype)) + module.delta_weight()


def extract_lora(
    base,
    tuned,
    out: str | os.PathLike | None = None,
    *,
    rank: int = 32,
    targets: str | list[str] | None = "attn",
    text_encoder: bool = True,
    base_config: str | os.PathLike | None = None,
    format: str = "diffusers",
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> MergeReport:
    """A LoRA of ``tuned`` minus ``base`` at ``rank`` (see the module docstring), written to ``out`` if given.

    ``base`` and ``tuned`` are diffusers folders, hub ids, single-file checkpoints (``base_config``: their configs,
    as ``bake`` takes it) or loaded pipelines of the same architecture; ``targets`` a preset (``attn``, ``full``...),
    a regex or suffixes, as ``inject_lora`` takes them. Returns a ``MergeReport`` (``mode`` ``"extract"``, the errors
    per layer and overall, ``path``). Raises ``ValueError`` where the models differ in a layer's shape or do not differ
    at all."""
    from .tools import check_output, load_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if format not in WRITERS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(WRITERS)}")
    named = [(label, m) for label, m in (("the base model", base), ("the tuned model", tuned)) if isinstance(m, (str, os.PathLike))]
    if out is not None:
        check_output(out, named, overwrite=overwrite)
    pipes = [load_model(m, base_config) if isinstance(m, (str, os.PathLike)) else m for m in (base, tuned)]
    lora: dict[str, LoraWeights] = {}
    errors: dict[str, float] = {}
    err_sq = norm_sq = 0.0
    for component in FILE_COMPONENTS:
        models = [getattr(p, component, None) for p in pipes]
        if component != "unet" and not text_encoder or models[0] is None:
            continue
        if models[1] is None:
            raise ValueError(f"the base model has a {component}, the tuned one has none: not the same architecture")
        base_model, tuned_model = (unwrap(m) for m in models)
        tuned_modules = dict(tuned_model.named_modules())
        for name in resolve_targets(base_model, targets):
            w0 = _computed_weight(base_model.get_submodule(name), f"{component}.{name}")
            other = tuned_modules.get(name)
            w1 = None if other is None else _computed_weight(other, f"{component}.{name}")
            if w1 is None or w1.shape != w0.shape:
                found = "no such layer" if w1 is None else f"{list(w1.shape)}"
                raise ValueError(f"{component}.{name}: the base model's weight is {list(w0.shape)}, the tuned model's "
                                 f"{found}: not the same architecture")
            wide = accumulation_dtype(w0.dtype)  # (fp32; fp64 for fp64 models)
            delta = (w1.to(wide) - w0.to(w1.device, wide)).cpu()
            if not delta.any():
                continue
            flat = delta.reshape(delta.shape[0], -1)
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            k = min(rank, s.numel())
            root = s[:k].sqrt()
            b, a = u[:, :k] * root, root[:, None] * vh[:k]
            key = f"{component}.{with_text_model(name) if component != 'unet' else name}"
            if delta.dim() == 4:  # LoCon: down [r, in, k, k], up [out, r, 1, 1]
                lora[key] = LoraWeights(a.reshape(k, *delta.shape[1:]), b.reshape(b.shape[0], k, 1, 1), float(k))
            else:
                lora[key] = LoraWeights(a, b, float(k))
            diff, total = float((flat - b @ a).pow(2).sum()), float(flat.pow(2).sum())
            errors[key] = (diff / total) ** 0.5
            err_sq, norm_sq = err_sq + diff, norm_sq + total
    if not lora:
        raise ValueError(f"the two models have the same weights in every layer the targets {targets!r} select: "
                         "nothing to extract")
    report = MergeReport(lora, "extract", errors, (err_sq / norm_sq) ** 0.5)
    if out is not None:
        from .pipeline import _unet_architecture

        architecture = _unet_architecture(unwrap(pipes[0].unet))
        sources = {label.split()[-2]: str(m) for label, m in named}  # {"base": ..., "tuned": ...} where given as paths
        meta = {"name": Path(out).stem, "extracted": {"rank": rank, "targets": targets, "rel_error": report.error, **sources},
                **({"architecture": architecture} if architecture else {})}
        write_lora_file(out, lora, metadata=meta, format=format, dtype=dtype)
        report.path = Path(out)
    logger.info("extracted %d layers at rank %d: relative Frobenius error %.3g", len(lora), rank, report.error)
    return report

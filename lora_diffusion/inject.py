"""Which layers get LoRA (targets are data, matched by module path) and the model-level operations.

Targets are plain regexes over the module path of a diffusers ``UNet2DConditionModel`` or a transformers CLIP
text encoder (with or without the ``text_model.`` level that transformers >= 5.6 flattened away). They do not
depend on class names, so an upstream class rename does not silently disable LoRA.

Example:
    >>> params = inject_lora(pipe.unet, rank=4, targets="attn")          # to_q/k/v/out.0 in attn1 and attn2
    >>> params = inject_lora(pipe.text_encoder, rank=4)                   # q/k/v/out_proj
    >>> inject_lora(pipe.unet, rank=8, targets=["attn2.to_k", "attn2.to_v"], adapter="cross-kv")
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from .layers import BACKWARD_MODES, LoraConv2d, LoraDropout, LoraLayer, LoraLinear, bump_generation
from .params import PARAMS_ATTR

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_PRESETS",
    "inject_lora",
    "remove_lora",
    "lora_layers",
    "model_kind",
    "resolve_targets",
    "lora_parameters",
    "attach",
    "detach",
]

# One place for every default target list: component kind -> preset -> regex over the full module path.
_UNET_ATTN = r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_UNET_CROSS = r"(.*\.)?attn2\.(to_q|to_k|to_v|to_out\.0)"
_UNET_MLP = r"(.*\.)?(transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|attentions\.\d+\.(proj_in|proj_out))"
_UNET_CONV = r"(.*\.)?(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.\d+\.conv)"
_TE_ATTN = r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_MLP = r"(.*\.)?mlp\.(fc1|fc2)"

TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "unet": {
        "attn": [_UNET_ATTN],
        "cross": [_UNET_CROSS],
        "attn-mlp": [_UNET_ATTN, _UNET_MLP],
        "full": [_UNET_ATTN, _UNET_MLP, _UNET_CONV],
    },
    "text_encoder": {
        "attn": [_TE_ATTN],
        "cross": [_TE_ATTN],  # a text encoder has no cross-attention: its attention is the sensible subset
        "attn-mlp": [_TE_ATTN, _TE_MLP],
        "full": [_TE_ATTN, _TE_MLP],
    },
}

Targets = str | Iterable[str] | None


def strip_text_model(path: str) -> str:
    """``text_model.encoder.x`` -> ``encoder.x`` (the module path without the pre-5.6 ``text_model.`` level)."""
    return path.removeprefix("text_model.")


def with_text_model(path: str) -> str:
    """The canonical text-encoder module path, with ``text_model.``."""
    return path if path.startswith("text_model.") else "text_model." + path


def pattern_value(patterns: Mapping[str, float] | None, path: str, default, *, text_encoder: bool = False):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the value of the
    first key, in order, that is a regex matching the module path or a ``.``-separated tail of it; ``default``
    where none does. A text-encoder path is tried with and without ``text_model.`` (transformers >= 5.6 has no
    such level). ``ValueError`` names a key that is no regex."""
    candidates = (with_text_model(path), strip_text_model(path)) if text_encoder else (path,)
    for key, value in (patterns or {}).items():
        try:
            if any(re.match(rf"(.*\.)?({key})$", cand) for cand in candidates):
                return value
        except re.error as e:
            raise ValueError(f"pattern {key!r} is not a valid regex ({e})") from None
    return default


def is_compiled(model) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled unless dynamo is loaded
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)`` (a pipeline may hold the compiled wrapper): LoRA works on the
    original module, so paths and file keys carry no ``_orig_mod.`` and the compiled wrapper sees every change."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def model_kind(model: nn.Module) -> str:
    """``"unet"`` for a diffusers UNet, ``"text_encoder"`` for a CLIP-like text encoder."""
    model = unwrap(model)
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        return "unet"
    if any(name.endswith("self_attn") for name, _ in model.named_modules()):
        return "text_encoder"
    raise TypeError(
        f"{type(model).__name__} is neither a diffusers UNet (down_blocks/up_blocks) nor a CLIP-like text "
        "encoder (self_attn); pass `targets` as a regex or suffix list"
    )


def parse_targets(spec: str) -> Targets:
    """A command line's targets: a preset name, a regex (where it holds regex characters), or comma-separated
    module-name suffixes."""
    if spec in TARGET_PRESETS["unet"] or any(c in spec for c in "*()|\\[]+?^$"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def resolve_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Module paths of ``model`` selected by ``targets`` (a preset name, a regex, or a list of suffixes)."""
    model = unwrap(model)
    if targets is None:
        targets = "attn"
    if isinstance(targets, str) and targets in TARGET_PRESETS["unet"]:
        patterns = [re.compile(p) for p in TARGET_PRESETS[model_kind(model)][targets]]

        def match(name: str) -> bool:
            return any(p.fullmatch(name) for p in patterns)

    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is neither a preset {sorted(TARGET_PRESETS['unet'])} nor a valid regex: {e}") from e

        def match(name: str) -> bool:
            return pattern.fullmatch(name) is not None

    else:
        suffixes = list(targets)

        def match(name: str) -> bool:
            return any(name == s or name.endswith("." + s) for s in suffixes)

    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if match(name):
                names.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and match(name) and not _inside_lora(name, model):
            names.append(name)
    return names


def _inside_lora(name: str, model: nn.Module) -> bool:
    return ".base_layer" in name or ".lora_" in name


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_layer(model: nn.Module, name: str) -> LoraLayer:
    """The LoRA wrapper at module path ``name``, wrapping the Linear/Conv2d there first if needed (detached
    wrappers are put back first: a model's tree holds wrappers only while none is detached)."""
    model = unwrap(model)
    attach(model)
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    wrapper = LoraLinear(module) if isinstance(module, nn.Linear) else LoraConv2d(module)
    wrapper.merge_cache = model.__dict__.get(MERGE_CACHE_ATTR, False)
    parent, child = _get_parent(model, name)
    setattr(parent, child, wrapper)
    bump_generation()
    return wrapper


def unwrap_layer(model: nn.Module, name: str) -> None:
    """Put the base layer back at module path ``name`` in place of its LoRA wrapper (the same tensors)."""
    parent, child = _get_parent(model, name)
    setattr(parent, child, parent.get_submodule(child).base_layer)
    bump_generation()


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(module path, layer)`` for every LoRA layer in ``model``, detached (fused) ones included."""
    model = unwrap(model)
    detached = getattr(model, DETACHED_ATTR, {})
    if not detached:  # while fused, ``detach`` has taken every wrapper out of the tree: no walk (a re-weight's 15 %)
        yield from _wrappers_in_tree(model)
    yield from detached.items()


def _wrappers_in_tree(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """The LoRA wrappers in ``model``'s module tree, in ``named_modules`` order, but without entering them (a LoRA
    layer holds no other): an SD1.5 UNet with adapters on attention is walked in 0.3 ms instead of 1 ms, which
    every ``set_adapters`` pays."""
    stack, seen = [("", model)], set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, LoraLayer):
            yield name, module
            continue
        prefix = f"{name}." if name else ""
        stack.extend((prefix + key, child) for key, child in reversed(module._modules.items()) if child is not None)


# While fused, wrappers are swapped out for their base layers so that generation runs the base modules
# themselves (zero added latency); the wrappers wait in this attribute of the model until `attach`.
DETACHED_ATTR = "_lora_detached"
MERGE_CACHE_ATTR = "_lora_merge_cache"  # model attribute: its LoRA layers keep merged weights (new ones too)
_REQUIRES_GRAD_ATTR = "_lora_requires_grad"  # parameter name -> requires_grad before the first inject_lora


def detach(model: nn.Module) -> None:
    """Swap every LoRA wrapper for its (fused) base layer; the wrappers are kept on the model."""
    model = unwrap(model)
    detached = getattr(model, DETACHED_ATTR, {})
    for name, layer in list(_wrappers_in_tree(model)):
        parent, child = _get_parent(model, name)
        setattr(parent, child, layer.base_layer)
        detached[name] = layer
    object.__setattr__(model, DETACHED_ATTR, detached)
    bump_generation()


def attach(model: nn.Module) -> None:
    """Put detached LoRA wrappers back in place of their base layers."""
    model = unwrap(model)
    for name, layer in getattr(model, DETACHED_ATTR, {}).items():
        parent, child = _get_parent(model, name)
        setattr(parent, child, layer)
        layer.follow_base()
    object.__setattr__(model, DETACHED_ATTR, {})
    bump_generation()


def inject_lora(
    model: nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float | LoraDropout = 0.0,
    targets: Targets = None,
    adapter: str = "default",
    use_dora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> list[nn.Parameter]:
    """Wrap each target layer of ``model`` in a LoRA layer holding a fresh adapter and return its parameters.

    ``targets``: a preset (``"attn"`` default: to_q/k/v/out.0 of attn1 and attn2 in the UNet, q/k/v/out_proj in
    the text encoder; ``"cross"``: UNet attn2 only; ``"attn-mlp"``: adds feed-forward and proj_in/out, kohya's
    default; ``"full"``: adds ResNet convs, LoCon), a regex fully matching module paths, or a list of module
    path suffixes. ``alpha=None`` means alpha = rank. A layer already wrapped gets the adapter beside the others.
    ``dropout``: in training, PEFT's dropout of the LoRA input (a float), or ``LoraDropout`` for kohya's neuron,
    rank and module dropouts too.
    ``use_dora``: DoRA (PEFT's ``use_dora``): each layer also learns a magnitude per output row, returned after
    its factors. All other parameters of ``model`` are frozen; the returned LoRA parameters require grad.
    ``rank_pattern`` / ``alpha_pattern``: PEFT's per-layer ranks and alphas, ``{regex: value}`` matched against
    the module path or a tail of it, the first match winning (``pattern_value``); a layer matching no
    ``alpha_pattern`` key takes ``alpha``, or its own rank where ``alpha`` is None.

    Example:
        >>> params = inject_lora(unet, rank=4, alpha=8)
        >>> optimizer = torch.optim.AdamW(params, lr=1e-4)
    """
    model = unwrap(model)
    attach(model)
    names = resolve_targets(model, targets)
    if not names:
        raise ValueError(f"targets {targets!r} matched no Linear/Conv2d layer in {type(model).__name__}")
    try:
        text_encoder = model_kind(model) == "text_encoder"
    except TypeError:  # a model of other layers (targets given as regexes or suffixes): its paths as they are
        text_encoder = False
    shapes = {name: (pattern_value(rank_pattern, name, rank, text_encoder=text_encoder),
                     pattern_value(alpha_pattern, name, alpha, text_encoder=text_encoder)) for name in names}
    for name, (r, a) in shapes.items():  # checked before any layer is wrapped
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}: rank must be a positive integer, got {r!r}")
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)):
            raise ValueError(f"{name}: alpha must be a finite number, got {a!r}")
    # which parameters trained before the first injection: remove_lora gives them back
    model.__dict__.setdefault(_REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        module = wrap_layer(model, name)
        try:
            module.add_adapter(adapter, rank=shapes[name][0], alpha=shapes[name][1], dropout=dropout, dora=use_dora)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        for p in _adapter_parameters(module, adapter):
            p.requires_grad_(True)
            params.append(p)
    ranks = sorted({r for r, _ in shapes.values()})
    logger.info("injected adapter %r (rank %s) into %d layers of %s", adapter, "/".join(map(str, ranks)), len(names), type(model).__name__)
    return params


def remove_lora(model: nn.Module) -> None:
    """Put the original modules back (the same weight tensors, unfused first if fused), with the
    ``requires_grad`` they had before ``inject_lora`` froze them, and the parameters a loaded file changed outside
    the LoRA layers (``params``) as they were."""
    model = unwrap(model)
    store = model.__dict__.pop(PARAMS_ATTR, None)
    if store is not None:
        for adapter in store.adapters():
            store.delete(adapter)
        store.apply()
    attach(model)
    for name, layer in list(lora_layers(model)):
        layer.unfuse()
        unwrap_layer(model, name)
    flags = model.__dict__.pop(_REQUIRES_GRAD_ATTR, {})
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))


def lora_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """LoRA parameters of ``model`` (of one adapter, or all)."""
    out = []
    for _, layer in lora_layers(model):
        for name in layer.specs:
            if adapter is None or name == adapter:
                out += _adapter_parameters(layer, name)
    return out


def _adapter_parameters(layer: LoraLayer, name: str) -> list[nn.Parameter]:
    """Adapter ``name``'s parameters in ``layer``: ``A``, ``B`` and, for DoRA, the magnitude."""
    return [layer.lora_A[name], layer.lora_B[name]] + ([layer.lora_magnitude[name]] if name in layer._dora else [])


def set_backward(model: nn.Module, mode: str) -> None:
    """How training differentiates ``model``'s single-adapter LoRA Linears: ``"dense"`` through ``W + s B A`` (one
    weight-gradient GEMM in place of four rank-r matmuls: faster on a GPU, gradients equal up to rounding),
    ``"lowrank"`` through the factors (PEFT's ops: its gradients bit for bit), or ``"auto"`` (the default: dense
    in eager CUDA steps for layers up to 2048 wide, ``layers.dense_backward_pays``; low-rank under
    torch.compile, whose fused kernels take most of the low-rank backward's extra passes away). The forward is the
    same in these three. ``"merged"`` is ``"dense"`` with the forward through ``W + s B A`` as well: the step runs
    the frozen model's GEMMs on the merged weights plus one small GEMM per layer and nothing over the activations,
    and the loss equals PEFT's to rounding (the merged weight is rounded once to the compute dtype), not bit for bit.

    Example:
        >>> set_backward(pipe.unet, "lowrank")  # gradients exactly as diffusers+PEFT's
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode {mode!r}: choose one of {', '.join(BACKWARD_MODES)}")
    for _, layer in lora_layers(model):
        layer.backward_mode = mode

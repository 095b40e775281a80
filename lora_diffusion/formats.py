"""LoRA file formats as pure functions over plain dicts of tensors.

The canonical in-memory form is ``dict[str, LoraWeights]`` keyed by ``"<component>.<module path>"``, e.g.
``"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"`` or
``"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"`` (SDXL's second encoder: ``text_encoder_2.``):
text-encoder paths always carry the ``text_model.`` level, as every shared format does, whatever the installed
transformers calls its modules.
Each value holds ``A`` (down, ``[r, in]`` or ``[r, in, k, k]``), ``B`` (up, ``[out, r]`` or ``[out, r, 1, 1]``)
and ``alpha`` (``alpha = rank`` when a format stores none).

Each format is a ``to_x`` / ``from_x`` pair; ``read_lora_file`` detects the format, ``write_lora_file``
writes one. Only safetensors is read: pickled checkpoints are refused without being opened.

Example:
    >>> lora, meta = read_lora_file("pytorch_lora_weights.safetensors")
    >>> sd, header = to_diffusers(lora)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .inject import pattern_value, strip_text_model, with_text_model  # noqa: F401  (re-exported)
from .oft import Oft
from .params import ParamDelta

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "LoraWeights",
    "LoraFormatError",
    "COMPONENTS",
    "FILE_COMPONENTS",
    "to_diffusers",
    "from_diffusers",
    "detect_format",
    "read_lora_file",
    "read_lora_file_with_params",
    "bundled_embeddings",
    "read_bundled_embeddings",
    "read_embedding_file",
    "write_lora_file",
    "READERS",
    "WRITERS",
    "guess_architecture",
    "lycoris_types",
    "to_kohya",
    "from_kohya",
    "from_cloneofsimo",
    "from_lycoris",
    "from_comfyui",
]

FORMAT_VERSION = 1
FILE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what files hold and formats carry (SDXL: two encoders)
COMPONENTS = FILE_COMPONENTS  # what a pipeline loads adapters into (those it has: SDXL's text_encoder_2 too)
METADATA_KEY = "lora_diffusion"  # our own header entry: JSON with format_version, base_model, trigger words...
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
DEFAULT_FILE_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class LoraWeights(NamedTuple):
    """One layer's adapter: ``A`` (down), ``B`` (up), ``alpha``. Rank is ``A.shape[0]``.

    ``magnitude``: a DoRA module's magnitude ``m`` (``W' = m * V / ||V||``, ``V = W + alpha/r * B A``), shaped to
    broadcast against the layer's weight: ``[out, 1, ...]`` normalises each output row (PEFT, LyCORIS'
    ``wd_on_output``), ``[1, in, ...]`` each input column (LyCORIS' first DoRA, A1111). See ``lora_diffusion.dora``.

    ``oft``: a module whose delta is made from the weight it is loaded onto: OFT / BOFT (``lora_diffusion.oft.Oft``),
    which rotates it, GLoRA or (IA)^3 (``lora_diffusion.glora``); its ``A`` and ``B`` are then empty (rank 0, ``B``
    ``[out, 0]``) and it becomes that layer's exact delta when loaded (its ``delta(weight)``)."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    oft: Oft | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """``alpha / r * B @ A`` as ``[out, in * k * k]``, in ``dtype``."""
        a, b = self.A.to(device, dtype), self.B.to(device, dtype)
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * (self.alpha / self.rank)


class LoraFormatError(ValueError):
    """A LoRA file or state dict that cannot be read: the message names the file, key and shapes."""


Lora = dict[str, LoraWeights]


# ---------------------------------------------------------------------------------------------- diffusers/PEFT
def suffix_regex(paths: list[str] | set[str]) -> str:
    """A short regex whose ``re.fullmatch`` accepts a module path iff it is one of ``paths`` or ends with
    ``"." + path``: PEFT's matching of a ``target_modules`` list, as one string (PEFT full-matches a string).

    The paths form a trie over their dot-separated parts, and siblings whose subtrees print the same share one
    alternation, so the 128 attention projections of SD1.5 print in a few hundred characters where the list
    takes ~8 KB (diffusers' own ``LoraConfig`` header is ~3 KB).

    Example:
        >>> suffix_regex(["a.0.q", "a.1.q", "b.k"])
        '(?:.*\\.)?(?:a\\.(?:0|1)\\.q|b\\.k)'
    """
    trie: dict = {}
    for path in sorted(paths):
        node = trie
        for part in path.split("."):
            node = node.setdefault(part, {})
        node[None] = {}  # a path ends here

    def pattern(node: dict) -> str:
        groups: dict[str, list[str]] = {}
        for part, child in node.items():
            if part is None:
                continue
            rest = pattern({k: v for k, v in child.items() if k is not None}) if len(child) > (None in child) else ""
            if rest and None in child:
                tail = rf"(?:\.{rest})?"
            else:
                tail = rf"\.{rest}" if rest else ""
            groups.setdefault(tail, []).append(re.escape(part))
        alts: list[str] = []  # each without a top-level "|"
        for tail, names in groups.items():
            if not tail:
                alts.extend(names)
            else:
                alts.append((f"(?:{'|'.join(names)})" if len(names) > 1 else names[0]) + tail)
        return alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"

    return rf"(?:.*\.)?{pattern(trie)}" if trie else ""


def _most_common(values: dict[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def check_components(lora: Lora, format: str) -> None:
    """Refuse (naming it) a component that ``format`` cannot hold, rather than drop its layers."""
    unknown = sorted({k.split(".", 1)[0] for k in lora} - set(FILE_COMPONENTS))
    if unknown:
        example = next(k for k in lora if k.split(".", 1)[0] == unknown[0])
        raise LoraFormatError(f"the {format} format has no place for component {unknown[0]!r} (e.g. {example}); it holds {FILE_COMPONENTS}")
    oft = next((k for k, w in lora.items() if w.oft is not None), None)
    if oft is not None:
        raise LoraFormatError(f"{oft} is {lora[oft].oft.described}, which acts on the base model's weights: it is "
                              f"loaded (load_lora) or baked into a checkpoint (lora-diffusion bake), not written as {format}")


def to_diffusers(lora: Lora, metadata: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical -> (state dict, safetensors header) that stock ``pipe.load_lora_weights`` reads.

    Keys ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``, ``text_encoder_2.``); rank and alpha go to the header's
    ``lora_adapter_metadata`` as PEFT ``LoraConfig`` fields per component (``unet.r``, ``unet.lora_alpha``,
    ``unet.target_modules``, ``unet.rank_pattern``, ``unet.alpha_pattern``), so alpha != rank loads right.
    ``metadata`` (our own) is not used here; ``write_lora_file`` stores it in its own header entry.
    """
    check_components(lora, "diffusers")
    state: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, object] = {}
    for component in FILE_COMPONENTS:
        items = {k.split(".", 1)[1]: v for k, v in lora.items() if k.split(".", 1)[0] == component}
        if not items:
            continue
        dora = _peft_magnitudes(component, items)
        for path, w in items.items():
            state[f"{component}.{path}.lora_A.weight"] = w.A
            state[f"{component}.{path}.lora_B.weight"] = w.B
            if dora:
                state[f"{component}.{path}.lora_magnitude_vector"] = dora[path]
        # PEFT matches target_modules and patterns as module-path suffixes: the text-encoder paths without
        # `text_model.` match both the flattened (transformers >= 5.6) and the older CLIPTextModel.
        short = {strip_text_model(p): w for p, w in items.items()}
        ranks = {p: w.rank for p, w in short.items()}
        alphas = {p: float(w.alpha) for p, w in short.items()}
        r, alpha = _most_common(ranks), _most_common(alphas)
        adapter_meta.update(
            {
                f"{component}.r": r,
                f"{component}.lora_alpha": alpha,
                f"{component}.target_modules": suffix_regex(short),
                f"{component}.rank_pattern": {p: v for p, v in ranks.items() if v != r},
                f"{component}.alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
                f"{component}.use_dora": bool(dora),
                f"{component}.lora_dropout": 0.0,
                f"{component}.init_lora_weights": True,
                f"{component}.bias": "none",
            }
        )
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True)}
    return state, header


def _peft_magnitudes(component: str, items: dict[str, LoraWeights]) -> dict[str, torch.Tensor]:
    """The ``lora_magnitude_vector`` of each module of a component whose modules are all DoRA (``{}`` where none is),
    in PEFT's shapes: ``[out]`` (Linear), ``[1, out, 1, 1]`` (conv). PEFT makes every module of a ``use_dora`` component
    DoRA and normalises output rows, so a component that mixes plain and DoRA modules, or a magnitude per input
    column (LyCORIS' first DoRA), has no PEFT form: refused, naming the module."""
    dora = {p: w for p, w in items.items() if w.magnitude is not None}
    if not dora:
        return {}
    plain = next((p for p in items if p not in dora), None)
    if plain is not None:
        raise LoraFormatError(f"{component}: DoRA and plain LoRA modules mixed ({plain} has no magnitude); PEFT makes "
                              "every module of a component DoRA, so a diffusers file cannot hold this: convert --to kohya")
    out = {}
    for path, w in dora.items():
        rows = w.B.shape[0]
        if w.magnitude.shape[0] != rows or w.magnitude.numel() != rows:
            raise LoraFormatError(f"{component}.{path}: a DoRA magnitude per input column ({list(w.magnitude.shape)}) has no "
                                  "diffusers / PEFT form (PEFT normalises output rows): convert --to kohya")
        out[path] = w.magnitude.reshape(rows) if w.A.dim() == 2 else w.magnitude.reshape(1, rows, 1, 1)
    return out


def _pattern_value(patterns: dict, path: str, default: float, where: str = f"the {DIFFUSERS_METADATA_KEY} header") -> float:
    """A file's ``rank_pattern`` / ``alpha_pattern`` value for a canonical module path (``inject.pattern_value``)."""
    try:
        return float(pattern_value(patterns, path, default, text_encoder=path.startswith("text_model.")))
    except ValueError as e:
        raise LoraFormatError(f"{e} in {where}") from None


_DIFFUSERS_SUFFIXES = {
    # current PEFT keys and the older diffusers attention-processor / text-encoder keys
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    # PEFT's DoRA magnitude (per output row; [out] for a Linear, [1, out, 1, 1] for a conv)
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
    # PEFT's lora_bias (LoRAs extracted from full fine-tunes): lora_B's own bias, [out]
    ".lora_B.bias": "bias",
}
_OLD_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _split_diffusers_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _DIFFUSERS_SUFFIXES.items():
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            # old attention-processor keys: `...attn1.processor.to_q_lora.down.weight`
            head, _, last = path.rpartition(".processor.")
            if last in _OLD_PROCESSOR:
                path = f"{head}.{_OLD_PROCESSOR[last]}"
            return path, role
    for old, new in _OLD_PROCESSOR.items():
        for part, role in ((".down.weight", "A"), (".up.weight", "B")):
            if key.endswith(f".processor.{old}{part}"):
                return key[: -len(f".processor.{old}{part}")] + "." + new, role
    return None


def from_diffusers(state: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict", *,
                   where: str = f"the {DIFFUSERS_METADATA_KEY} header") -> Lora:
    """diffusers/PEFT state dict (+ header) -> canonical. Reads alpha from ``lora_adapter_metadata`` (``where``: what
    errors call it; a PEFT adapter's comes from its ``adapter_config.json``)."""
    header = header or {}
    adapter_meta = header_json(header, DIFFUSERS_METADATA_KEY, source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = _split_diffusers_key(key)
        if split is None:
            raise LoraFormatError(f"{source}: key {key!r} is not a diffusers LoRA key (expected .lora_A/.lora_B.weight)")
        path, role = split
        component, _, module = path.partition(".")
        if component not in FILE_COMPONENTS:
            raise LoraFormatError(f"{source}: key {key!r} is for component {component!r}; supported: {FILE_COMPONENTS}")
        if component.startswith("text_encoder"):
            module = with_text_model(module)
        parts.setdefault(f"{component}.{module}", {})[role] = tensor
    lora: Lora = {}
    for name, ab in parts.items():
        if set(ab) - {"m", "bias"} != {"A", "B"}:
            raise LoraFormatError(f"{source}: {name} has only {sorted(ab)}; both lora_A and lora_B are needed")
        a, b = ab["A"], ab["B"]
        _check_pair(name, a, b, source)
        magnitude = ab.get("m")
        if magnitude is not None:  # PEFT normalises output rows: [out, 1(, 1, 1)]
            if magnitude.numel() != b.shape[0]:
                raise LoraFormatError(f"{source}: {name}.lora_magnitude_vector has shape {list(magnitude.shape)}; "
                                      f"the layer has {b.shape[0]} outputs (lora_B {list(b.shape)})")
            magnitude = magnitude.reshape(b.shape[0], *[1] * (a.dim() - 1))
        component = name.split(".", 1)[0]
        rank = a.shape[0]
        if f"{component}.lora_alpha" in adapter_meta:
            try:
                default_r = adapter_meta.get(f"{component}.r", rank)
                alpha = _pattern_value(adapter_meta.get(f"{component}.alpha_pattern") or {}, name.split(".", 1)[1], adapter_meta[f"{component}.lora_alpha"], where)
                r_meta = int(_pattern_value(adapter_meta.get(f"{component}.rank_pattern") or {}, name.split(".", 1)[1], default_r, where))
            except (AttributeError, TypeError, ValueError, OverflowError):  # no number, a pattern table that is no dict
                raise LoraFormatError(f"{source}: {where}'s {component} r / lora_alpha / rank_pattern / alpha_pattern "
                                      "are not numbers and tables of numbers") from None
            if r_meta != rank:
                raise LoraFormatError(f"{source}: {name} has rank {rank} in its tensors but {r_meta} in {where}")
        else:
            alpha = float(rank)
        lora[name] = LoraWeights(a, b, float(alpha), magnitude)
        bias = ab.get("bias")
        if bias is not None and (bias.dim() != 1 or bias.numel() != b.shape[0]):
            raise LoraFormatError(f"{source}: {name}.lora_B.bias has shape {list(bias.shape)}; the layer has "
                                  f"{b.shape[0]} outputs (lora_B {list(b.shape)})")
        if bias is not None and bias.any():  # (a zero one, PEFT's on a layer without a bias, changes nothing)
            # scaled as lora_B's output is: PEFT adds w * alpha / r * bias, merged into the layer's bias
            if magnitude is not None:
                raise LoraFormatError(f"{source}: {name} has both a DoRA magnitude and lora_B.bias; DoRA with "
                                      "lora_bias is not supported")
            lora[f"{name}.bias"] = ParamDelta(bias.float() * (float(alpha) / rank))
    return lora


# Key fragments of LoRAs for other model families (what users most often try on an SD pipeline), matched on key names
# with ``_`` and ``.`` alike; SD 1.x / 2.x / SDXL keys hold none of them.
FOREIGN_MODELS = (
    (re.compile(r"(^|\.)(double\.blocks|single\.blocks|single\.transformer\.blocks)\.\d"), "FLUX.1"),
    (re.compile(r"(^|\.)joint\.blocks\.\d"), "SD3 / SD3.5"),
    (re.compile(r"(^|\.)transformer\.transformer\.blocks\.\d"), "diffusion-transformer (SD3, FLUX, PixArt...)"),
    (re.compile(r"(^|\.)blocks\.\d+\.(self|cross)\.attn\."), "video diffusion-transformer (Wan...)"),
)
SUPPORTED_MODELS = "lora_diffusion loads LoRAs for Stable Diffusion 1.x / 2.x and SDXL"


def foreign_model(keys) -> tuple[str, str] | None:
    """``(model family, an example key)`` where LoRA ``keys`` (a file's or canonical ones) name another model family's
    layers (FLUX, SD3, other diffusion transformers), else ``None``."""
    for key in keys:
        flat = key.replace("_", ".")
        for pattern, family in FOREIGN_MODELS:
            if pattern.search(flat):
                return family, key
    return None


def guess_architecture(lora: Lora) -> str:
    """A short description of the model a LoRA was made for, from its key names and shapes."""
    foreign = foreign_model(lora)
    if foreign is not None:
        return f"{foreign[0]}; {SUPPORTED_MODELS}"
    te_dims = {w.A.shape[1] for k, w in lora.items() if k.startswith("text_encoder.") and "self_attn" in k and w.oft is None}
    cross = {w.A.shape[1] for k, w in lora.items() if k.startswith("unet.") and "attn2.to_k" in k and w.oft is None}
    if any(k.startswith("text_encoder_2.") for k in lora) or 2048 in cross:
        return "SDXL (two text encoders, 2048-d cross-attention)"
    hints = []
    if 1024 in te_dims or 1024 in cross:
        hints.append("SD 2.x (OpenCLIP-H, 1024-d text features)")
    if 768 in te_dims or 768 in cross:
        hints.append("SD 1.x (CLIP-L, 768-d text features)")
    if not hints:
        dims = sorted(te_dims | cross)
        hints.append(f"a model with {dims}-d text features" if dims else "an unknown model")
    return " or ".join(hints)


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, source: str) -> None:
    if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1]:
        raise LoraFormatError(
            f"{source}: {name} has mismatched factors: down {tuple(a.shape)} and up {tuple(b.shape)} "
            "(expected down [r, in(, k, k)] and up [out, r(, 1, 1)])"
        )


# ---------------------------------------------------------------------------------------------- registry and files
Reader = Callable[..., Lora]  # (state, header, source, **context) -> canonical
Writer = Callable[[Lora, dict], tuple[dict[str, torch.Tensor], dict[str, str]]]  # (lora, our metadata) -> (state, header)

# name -> (detector, reader) / writer; tried in this order. kohya and cloneofsimo register at the end of this file.
READERS: dict[str, tuple[Callable[[dict[str, torch.Tensor], dict[str, str]], bool], Reader]] = {
    "diffusers": (lambda sd, header: all(_split_diffusers_key(k) is not None for k in sd), from_diffusers),
}
WRITERS: dict[str, Writer] = {"diffusers": to_diffusers}
# readers that map positions to module paths and accept the model's module listing as `modules=`
NEEDS_MODULES = {"cloneofsimo"}

# LyCORIS adapter types, recognised by their key fragments, so that a file no reader takes is named by what it holds
# (LoHa, LoKr, DoRA, OFT / BOFT, GLoRA, (IA)^3, norm- and full-delta files load, formats_lycoris, where every key is
# named as the readers know them)
_LYCORIS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".a1.weight": "GLoRA", "oft_": "OFT",
            ".on_input": "(IA)^3", ".diff_b": "bias deltas (diff_b)"}


def lycoris_types(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """LyCORIS/other adapter types found in a state dict -> number of keys, e.g. ``{"LoHa": 12}``."""
    found: Counter = Counter()
    for key in state:
        for fragment, name in _LYCORIS.items():
            if fragment in key:
                found[name] += 1
                break
    return dict(found)


def detect_format(state: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> str:
    """Name of the format of a LoRA state dict (a key of ``READERS``); raises ``LoraFormatError`` if none fits."""
    header = header or {}
    for name, (detect, _) in READERS.items():
        if state and detect(state, header):
            return name
    if not state:
        raise LoraFormatError("no tensors: not a LoRA")
    # name the keys that spoil the closest format (the one most keys fit), not keys that are fine
    from .formats_cloneofsimo import EMBED_FLAG

    misfits = {
        name: [k for k in state if header.get(k) != EMBED_FLAG and not detect({k: state[k]}, header)] for name, (detect, _) in READERS.items()
    }
    closest = min(misfits, key=lambda name: len(misfits[name]))
    bad = misfits[closest]
    # (every LyCORIS type loads where its keys are named as the readers know them: say which the file holds)
    lycoris = ", ".join(f"{name} ({n} keys)" for name, n in sorted(lycoris_types(state).items()))
    lycoris = f"LyCORIS {lycoris} found, but " if lycoris else ""
    if len(bad) == len(state):
        raise LoraFormatError(f"{lycoris}unrecognised LoRA format: no key fits a known format; first keys: "
                              f"{', '.join(list(state)[:3])}")
    raise LoraFormatError(
        f"{lycoris}{len(bad)} of {len(state)} keys fit no LoRA format (the others are {closest}): "
        f"{', '.join(repr(k) for k in bad[:5])}{', ...' if len(bad) > 5 else ''}"
    )


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: pickled checkpoints ({path.suffix}) are refused and never unpickled, since unpickling can "
            "run arbitrary code; convert it to .safetensors with a tool you trust"
        )
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file starts with its header length (u64, little endian) and then "{"; that length's first
    # byte can be 0x80 or "P", so only a file that is not shaped like safetensors is taken for a pickle
    header_len = int.from_bytes(head[:8], "little")
    safetensors_like = len(head) == 9 and head[8:9] == b"{" and header_len + 8 <= path.stat().st_size
    if not safetensors_like and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise LoraFormatError(f"{path}: this is a pickled (torch.save) file, not safetensors; it was not unpickled")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file, refusing pickles with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({e})") from e
    return state, header


def lora_file(path: str | os.PathLike) -> Path:
    """``path``, or ``<path>/pytorch_lora_weights.safetensors`` for a folder (what diffusers saves)."""
    path = Path(path)
    return path / DEFAULT_FILE_NAME if path.is_dir() else path


def lora_files(path: str | os.PathLike) -> list[Path]:
    """The weights file(s) ``read_lora_file(path)`` reads: ``lora_file(path)``, or a PEFT adapter's (its folder's, or
    those of its ``unet`` / ``text_encoder`` sub-folders)."""
    peft = _peft_at(path)
    return list(peft) if peft else [lora_file(path)]


def _peft_at(path: str | os.PathLike) -> dict | None:
    """``formats_peft.peft_adapters(path)``, unless ``path`` is a folder holding a diffusers LoRA."""
    from .formats_peft import peft_adapters

    single = lora_file(path)
    return None if single != Path(path) and single.is_file() else peft_adapters(path)


def read_lora_file(path: str | os.PathLike, *, modules: dict | None = None) -> tuple[Lora, dict[str, str]]:
    """Read any supported LoRA file: ``(canonical lora, header metadata)``; the header gains ``_format``. Deltas to
    parameters outside the LoRA layers (biases, norms, embedding tables) are left out; the header's ``_param_deltas``
    counts them, and ``read_lora_file_with_params`` reads them too. See ``read_lora_file_with_params``."""
    lora, params, header = read_lora_file_with_params(path, modules=modules)
    return lora, ({**header, "_param_deltas": str(len(params))} if params else header)


def read_lora_file_with_params(path: str | os.PathLike, *, modules: dict | None = None) -> tuple[Lora, dict, dict[str, str]]:
    """Read any supported LoRA file: ``(canonical lora, parameter deltas, header metadata)``; the header gains
    ``_format``. Parameter deltas (``params.ParamDelta``, ``{"<component>.<module path>.<bias | weight>": delta}``)
    are what a file changes outside the LoRA layers: ``.diff_b`` biases, 1-D ``.diff`` norm scales, an embedding
    table's LoRA factors (ComfyUI's extracted LoRAs, A1111's full networks).

    A folder is read as ``<folder>/pytorch_lora_weights.safetensors``. Textual-inversion embeddings bundled in the
    file (``bundle_emb.*``, A1111 / OneTrainer) are not part of the LoRA: the header's ``_bundled_embeddings`` lists
    their names (JSON) and ``bundled_embeddings`` reads them. ``modules``: component ->
    ``[(module path, class name), ...]`` of the target model, for positional formats (cloneofsimo); without it
    they assume the SD 1.x layout.
    """
    from .formats_peft import read_peft_adapters

    peft = _peft_at(path)
    if peft is not None:  # PEFT's save_pretrained output (a folder, its sub-folders or its weights file)
        read, header = read_peft_adapters(peft)
        return _split_read(read, header, path)
    if Path(path).is_dir() and not lora_file(path).is_file():
        raise FileNotFoundError(f"{path}: a folder without {DEFAULT_FILE_NAME} (a diffusers LoRA) or "
                                "adapter_config.json (a PEFT adapter)")
    path = lora_file(path)
    state, header = read_safetensors(path)
    if not state:
        raise LoraFormatError(f"{path}: the file holds no tensors")
    bundled = bundled_embeddings(state, str(path), warn=False)
    if any(k.startswith(BUNDLE_PREFIX) for k in state):
        state = {k: v for k, v in state.items() if not k.startswith(BUNDLE_PREFIX)}
        if not state:
            raise LoraFormatError(f"{path}: the file holds only embeddings ({', '.join(bundled)}), no LoRA layers: "
                                  "load it as a textual inversion (pipe.load_textual_inversion)")
    if bundled:
        header = {**header, "_bundled_embeddings": json.dumps(sorted(bundled))}
    try:
        our_metadata(header, str(path))  # (checked here, so that callers may read it without a file name at hand)
        fmt = detect_format(state, header)
        context = {"modules": modules} if modules is not None and fmt in NEEDS_MODULES else {}
        read = READERS[fmt][1](state, header, str(path), **context)
    except LoraFormatError as e:
        from .formats_peft import PEFT_CONFIG, PREFIX

        if all(k.startswith(PREFIX) for k in state):
            raise LoraFormatError(f"{path}: a PEFT adapter's weights (keys under {PREFIX}): read it with its "
                                  f"{PEFT_CONFIG} beside it, as save_pretrained leaves them (it holds alpha)") from None
        foreign = foreign_model(state)
        if foreign is not None:  # (the readers' own messages would be about key names)
            raise LoraFormatError(f"{path}: a {foreign[0]} LoRA (e.g. key {foreign[1]!r}); {SUPPORTED_MODELS}") from None
        msg = str(e)
        raise LoraFormatError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    # (a text encoder's text_projection is checked where it is applied: ComfyUI extracts its CLIP-L's, which SD's
    # pipelines lack and ComfyUI leaves uninitialised, so those factors may hold NaN; see pipeline._skipped_projection)
    check_finite({k: t for k, t in state.items() if PROJECTION not in k}, str(path))
    return _split_read(read, {**header, "_format": fmt}, path)


def _split_read(read: dict, header: dict[str, str], path) -> tuple[Lora, dict, dict[str, str]]:
    """A reader's output as ``(lora, parameter deltas, header)``, its alphas checked."""
    bad_alpha = next((k for k, w in read.items() if not math.isfinite(w.alpha)), None)
    if bad_alpha is not None:
        raise LoraFormatError(f"{path}: {bad_alpha} has alpha {read[bad_alpha].alpha}; factors and alphas must be finite")
    return ({k: w for k, w in read.items() if not isinstance(w, ParamDelta)},
            {k: w for k, w in read.items() if isinstance(w, ParamDelta)}, header)


# Textual-inversion embeddings bundled in a LoRA file, as A1111 / ComfyUI read them and OneTrainer writes them:
# ``bundle_emb.<name>.string_to_param.*`` / ``.emb_params`` / ``.clip_l`` alone ([n, width], SD 1.x / 2.x) or
# ``.clip_l`` and ``.clip_g`` (SDXL); ``<name>`` is the token a prompt uses. OneTrainer's output vectors
# (``.clip_l_out``, ``.clip_g_out``: added to the text encoder's output, which no diffusers pipeline does) are left
# out with a warning, as ComfyUI leaves them out.
BUNDLE_PREFIX = "bundle_emb."
_BUNDLE_PARTS = {"string_to_param.*": "*", "emb_params": "*", "clip_l": "clip_l", "clip_g": "clip_g", "clip_l_out": None, "clip_g_out": None}


def bundled_embeddings(state: dict[str, torch.Tensor], source: str = "state dict", warn: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: {"*" | "clip_l" | "clip_g": vectors [n, width]}}`` of the ``bundle_emb.*`` keys of a LoRA state dict
    (``{}`` without any); a key of another shape is refused, naming it; output vectors are left out (``warn``: saying so)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, part = key.removeprefix(BUNDLE_PREFIX).partition(".")
        if not name or part not in _BUNDLE_PARTS or tensor.dim() not in (1, 2):
            raise LoraFormatError(f"{source}: {key!r} {list(tensor.shape)} is not a bundled embedding (bundle_emb.<name>."
                                  f"{{{', '.join(_BUNDLE_PARTS)}}}, vectors [n, width])")
        if _BUNDLE_PARTS[part] is None:
            if warn:
                logger.warning("%s: %s (an output vector, OneTrainer's) is left out: diffusers pipelines have no place for it", source, key)
            continue
        vectors = out.setdefault(name, {})
        if _BUNDLE_PARTS[part] in vectors:
            raise LoraFormatError(f"{source}: the bundled embedding {name!r} has both string_to_param.* and emb_params")
        vectors[_BUNDLE_PARTS[part]] = tensor.reshape(-1, tensor.shape[-1])
    for name, vectors in out.items():
        if set(vectors) == {"clip_l"}:  # OneTrainer's SD 1.x / 2.x bundle: the (one) text encoder's
            vectors["*"] = vectors.pop("clip_l")
        if set(vectors) not in ({"*"}, {"clip_l", "clip_g"}):
            raise LoraFormatError(f"{source}: the bundled embedding {name!r} has {sorted(vectors)}; an SD 1.x / 2.x one has "
                                  "string_to_param.*, emb_params or clip_l, an SDXL one clip_l and clip_g")
    return out


def _bundle_keys(embeddings: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, parts in embeddings.items():
        if not name or "." in name:
            raise LoraFormatError(f"{source}: an embedding to bundle needs a name without dots, not {name!r}")
        for part, vectors in parts.items():
            suffix = "string_to_param.*" if part == "*" else part
            out[f"{BUNDLE_PREFIX}{name}.{suffix}"] = vectors.detach().reshape(-1, vectors.shape[-1]).contiguous()
    return out


def read_embedding_file(path: str | os.PathLike, trigger_words: object = None) -> dict[str, dict[str, torch.Tensor]]:
    """A learned-token file that our pivotal tuning writes beside a LoRA (its ``embedding_file``), in the form of
    ``bundled_embeddings``: diffusers' textual-inversion form ``{token: vector}`` (SD 1.x / 2.x), or SDXL's
    ``{"clip_l": [1, w1], "clip_g": [1, w2]}`` with the token in its metadata, else the LoRA's first trigger word."""
    tensors, header = read_safetensors(path)
    if set(tensors) != {"clip_l", "clip_g"}:
        return {token: {"*": vector} for token, vector in tensors.items()}
    words = trigger_words if isinstance(trigger_words, list) else []
    token = header.get("token") or (str(words[0]) if words else "")
    if not token:
        raise LoraFormatError(f"{path}: an SDXL embedding without its token (no 'token' in its metadata, no trigger word in the LoRA's)")
    return {token: {key: tensors[key].reshape(-1, tensors[key].shape[-1]) for key in ("clip_l", "clip_g")}}


def read_textual_inversion(path: str | os.PathLike, token: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A textual-inversion file as A1111 reads one, in the form of ``bundled_embeddings``, under ``token`` (default:
    the file's name, as A1111 names it): SDXL's ``clip_l`` + ``clip_g``, or one tensor of any name (A1111's
    ``emb_params``, diffusers' ``{token: vectors}``), ``[n, width]`` or ``[width]``."""
    path = Path(path)
    tensors, _ = read_safetensors(path)
    token = token or path.stem
    if {"clip_l", "clip_g"} <= set(tensors):
        return {token: {key: tensors[key].reshape(-1, tensors[key].shape[-1]) for key in ("clip_l", "clip_g")}}
    if len(tensors) != 1:
        raise LoraFormatError(f"{path}: {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}...); a textual-inversion "
                              "file holds one (or SDXL's clip_l and clip_g)")
    (vectors,) = tensors.values()
    if vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise LoraFormatError(f"{path}: a {vectors.dtype} tensor of shape {list(vectors.shape)}; an embedding is "
                              "[vectors, width] floats")
    return {token: {"*": vectors.reshape(-1, vectors.shape[-1])}}


def read_bundled_embeddings(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The embeddings bundled in a LoRA file (``bundled_embeddings``), reading only their tensors."""
    path = lora_file(path)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(BUNDLE_PREFIX)}
    return bundled_embeddings(state, str(path))


_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The first key whose floating tensor holds NaN or Inf, or ``None``. One multi-tensor norm for them all;
    tensor by tensor only when that is not finite (an fp16 norm can overflow with finite values)."""
    floats = [(k, t) for k, t in state.items() if t.is_floating_point()]
    fast = [t for _, t in floats if t.dtype in _NORM_DTYPES]
    if len(fast) == len(floats) and (not fast or bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(fast)])).all())):
        return None
    return next((key for key, t in floats if not bool(torch.isfinite(t if t.dtype in _NORM_DTYPES else t.float()).all())), None)


PROJECTION = "text_projection"  # a CLIP text encoder's output projection (CLIPTextModelWithProjection's Linear)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf in any floating tensor, naming the first bad key (``first_non_finite``)."""
    key = first_non_finite(state)
    if key is not None:
        raise LoraFormatError(f"{source}: {key} holds NaN or Inf values; factors and alphas must be finite")


def _umask() -> int:
    """The process umask, read without changing it where the OS shows it (``os.umask`` sets it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, all it holds) the mode a plain ``open(path, "w")`` / ``mkdir`` gives,
    ``0o666`` / ``0o777`` less the umask: ``mkstemp``, ``mkdtemp`` and safetensors make them ``0o600`` / ``0o700``,
    which a server running as another user (A1111, ComfyUI, a shared models folder) cannot read."""
    path, mask = Path(path), _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for item in path.rglob("*"):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp:`` write into ``tmp``, a hidden folder beside ``out``; on success it gets the
    umask's modes and replaces ``out`` (an older ``out`` is removed only then), on error it is removed and ``out``
    stays as it was (a kill leaves a hidden ``.<name>.*`` folder, never a half-written ``out``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        make_public(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "old")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` through a temp file and rename, so a kill mid-save keeps the old file. The file
    gets the mode a plain ``open(path, "w")`` gives (``0o666`` less the umask), not ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        make_public(tmp)  # safetensors writes 0o600 whatever the file's mode was
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_lora_file(
    path: str | os.PathLike,
    lora: Lora,
    *,
    metadata: dict | None = None,
    format: str = "diffusers",
    dtype: torch.dtype = torch.float16,
    header: dict[str, str] | None = None,
    embeddings: dict[str, dict[str, torch.Tensor]] | None = None,
    params: dict | None = None,
) -> None:
    """Write ``lora`` as ``format`` (``diffusers`` or ``kohya``) with tensors in ``dtype``.

    ``embeddings`` (kohya only): textual-inversion embeddings to bundle, ``{name: {"*" | "clip_l" | "clip_g":
    vectors}}`` as ``bundled_embeddings`` reads them, written as ``bundle_emb.<name>.string_to_param.*`` (SD 1.x / 2.x)
    or ``.clip_l`` / ``.clip_g`` (SDXL), which A1111 loads with the LoRA, the name being the prompt's token.
    ``params`` (kohya only): parameter deltas (``read_lora_file_with_params``), as ComfyUI writes them (``.diff_b``,
    ``.diff``, an embedding table's factors).

    ``metadata`` goes to our own header entry (and, for kohya, to ``ss_*``/``modelspec.*`` keys). ``header``:
    other header entries written as they are (a source file's ``user_metadata``: kohya's ``ss_tag_frequency``,
    ``modelspec.*``...), over the writer's own, except the keys the format computes from the tensors.
    """
    if Path(path).suffix != ".safetensors":  # (``-o out/`` would write a file named ``out``)
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if format not in WRITERS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(WRITERS)}")
    if not lora and not params:
        raise ValueError("nothing to save: the LoRA is empty")
    cast = {k: w._replace(A=w.A.detach().to(dtype), B=w.B.detach().to(dtype),
                          magnitude=None if w.magnitude is None else w.magnitude.detach().to(dtype)) for k, w in lora.items()}
    ours = {"format_version": FORMAT_VERSION, **(metadata or {})}
    state, written = WRITERS[format](cast, ours) if cast else ({}, {"format": "pt"})
    if params:
        if format != "kohya":
            raise LoraFormatError(f"{path}: a {format} LoRA file has no place for deltas to biases, norms or embedding "
                                  f"tables ({len(params)}, e.g. {next(iter(params))}; PEFT's lora_B.bias is read, not "
                                  "written); kohya files hold them")
        from .formats_kohya import kohya_param_keys

        state.update(kohya_param_keys({k: d._replace(**{f: getattr(d, f).detach().to(dtype) for f in ("delta", "A", "B")
                                                          if getattr(d, f) is not None}) for k, d in params.items()}, cast, ours))
    if embeddings:
        if format != "kohya":
            raise LoraFormatError(f"{path}: a {format} LoRA file has no place for embeddings ({', '.join(embeddings)}); "
                                  "kohya files bundle them")
        state.update(_bundle_keys(embeddings, str(path)))
    bad = first_non_finite(state)  # (a merge at a large weight can overflow float16: a file read would refuse)
    if bad is not None:
        raise ValueError(f"{path}: {bad} is not finite in {dtype} (NaN, Inf or too large): nothing was written; save "
                         "as float32 or bfloat16, or lower the weights")
    written.update({k: str(v) for k, v in (header or {}).items() if k not in DERIVED_HEADER_KEYS})
    written[METADATA_KEY] = json.dumps(ours, sort_keys=True, default=str)
    if format == "kohya":  # kohya's hash of the tensors, which A1111 takes as the LoRA's ("Lora hashes")
        written["sshs_model_hash"] = tensors_hash(state)
    atomic_save(state, path, written)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of the data a safetensors file of ``tensors`` holds after its header: kohya's ``sshs_model_hash``,
    A1111's LoRA hash (``lora_diffusion.generate.lora_hash`` of the file), whatever the header says."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return hashlib.sha256(memoryview(blob)[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


# header keys a writer computes from the tensors: never copied from another file's header
DERIVED_HEADER_KEYS = frozenset(
    {"format", "_format", "_bundled_embeddings", "_param_deltas", DIFFUSERS_METADATA_KEY, METADATA_KEY, "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
     "sshs_model_hash", "sshs_legacy_hash"}
)


def user_metadata(header: dict[str, str]) -> dict[str, str]:
    """The header entries a user or trainer wrote (kohya's ``ss_*``, ``modelspec.*``, anything else), without the
    format's own bookkeeping (``DERIVED_HEADER_KEYS``, cloneofsimo's target lists, ranks and token flags)."""
    from .formats_cloneofsimo import is_format_key

    cloneofsimo = header.get("_format") == "cloneofsimo"
    return {k: v for k, v in header.items() if k not in DERIVED_HEADER_KEYS and not (cloneofsimo and is_format_key(k, v))}


def our_metadata(header: dict[str, str], source: str = "the file") -> dict:
    """Our own metadata (format version, base model, trigger words, ...) from a file header."""
    return header_json(header, METADATA_KEY, source)


def header_json(header: dict[str, str], key: str, source: str) -> dict:
    """The JSON object a header holds under ``key`` (``{}`` if none); ``LoraFormatError`` naming the file and the
    key if it is not valid JSON or not an object."""
    raw = header.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise LoraFormatError(f"{source}: the header's {key!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoraFormatError(f"{source}: the header's {key!r} holds a JSON {type(value).__name__}, not an object")
    return value


# ---------------------------------------------------------------------------------------------- other formats
from .formats_cloneofsimo import from_cloneofsimo, is_cloneofsimo  # noqa: E402  (they use the names above)
from .formats_kohya import from_kohya, is_kohya, to_kohya  # noqa: E402
from .formats_lycoris import from_comfyui, from_lycoris, is_comfyui, is_lycoris  # noqa: E402

READERS["kohya"] = (is_kohya, from_kohya)
READERS["cloneofsimo"] = (is_cloneofsimo, from_cloneofsimo)
READERS["lycoris"] = (is_lycoris, from_lycoris)
READERS["comfyui"] = (is_comfyui, from_comfyui)
WRITERS["kohya"] = to_kohya

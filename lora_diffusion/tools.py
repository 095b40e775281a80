"""File tools: bake adapters into a model folder, inspect and convert LoRA files, and their CLI commands.

``lora-diffusion merge a.safetensors:0.7 b.safetensors:0.3 -o out.safetensors [--mode svd --rank 16] [--format kohya]``
``lora-diffusion resize in.safetensors -o out.safetensors --rank 16 [--fro 0.95]``
``lora-diffusion convert IN OUT --to kohya|diffusers``
``lora-diffusion bake BASE a.safetensors:0.7 -o DIR [--single-file model.safetensors]``
``lora-diffusion inspect FILE [--json]``
``lora-diffusion extract BASE TUNED -o out.safetensors [--rank 32] [--targets full]``

Example:
    >>> bake("models/sd15", {"style.safetensors": 0.8}, "models/sd15-style")
    >>> inspect_lora("style.safetensors")["architecture"]
    'SD 1.x (CLIP-L, 768-d text features)'
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from .blend import merge_loras
from .formats import (
    WRITERS,
    LoraFormatError,
    atomic_folder,
    atomic_save,
    guess_architecture,
    lora_file,
    lora_files,
    our_metadata,
    read_bundled_embeddings,
    read_embedding_file,
    read_lora_file,
    read_lora_file_with_params,
    user_metadata,
    with_text_model,
    write_lora_file,
)
from .formats_cloneofsimo import learned_tokens
from .formats_kohya import ldm_module_path, ldm_unet_prefixes, rename_prefix
from .inject import parse_targets, unwrap

logger = logging.getLogger(__name__)

__all__ = ["bake", "to_ldm_checkpoint", "inspect_lora", "convert_lora", "register"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The keyword that gives diffusers' ``from_pretrained`` a dtype: ``dtype=`` where the installed diffusers
    takes it (``torch_dtype=`` warns there as deprecated), ``torch_dtype=`` in older ones; ``{}`` for ``None``."""
    if dtype is None:
        return {}
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}


# ---------------------------------------------------------------------------------------------- python API
def bake(
    base,
    loras: dict[str | os.PathLike, float],
    out_dir: str | os.PathLike,
    *,
    text_encoder: dict[str | os.PathLike, float] | None = None,
    blocks: dict[str | os.PathLike, object] | None = None,
    dtype: torch.dtype | None = None,
    single_file: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a full diffusers model folder with the given LoRA files fused in at these weights.

    ``base`` is a diffusers model folder, a hub id, a single-file checkpoint (``.safetensors`` in the original layout,
    as A1111 / Civitai share them: SD 1.x/2.x or SDXL; ``base_config``, a diffusers folder or hub id of the same
    architecture, gives its configs and tokenizers, else diffusers fetches them from the Hub) or a loaded pipeline
    (left as it was). ``text_encoder`` optionally gives
    other weights for the text encoder, per file; ``blocks`` per-block weights, per file (as ``set_adapters(blocks=...)``
    takes them: an LBW vector or a diffusers block dict). The result loads with ``from_pretrained`` and no LoRA code.
    ``single_file`` also writes an original-layout (LDM; SGM for SDXL) ``.safetensors`` checkpoint for A1111 / ComfyUI
    (``to_ldm_checkpoint``).
    Outputs are refused if they are (or, for the folder, hold or lie inside) an input or the base folder, and if
    they exist unless ``overwrite``; the folder is written beside ``out_dir`` and renamed into place.

    Example:
        >>> bake("models/sd15", {"style.safetensors": 0.8, "subject.safetensors": 1.0}, "models/sd15-blend")
    """
    from .pipeline import delete_adapter, enable_all, fuse, list_adapters, load_lora, restore, set_adapters, snapshot, unfuse

    if isinstance(base, (str, os.PathLike)):
        _check_base(base)
    if base_config is not None and not (isinstance(base, (str, os.PathLike)) and Path(base).is_file()):
        raise ValueError(f"--base-config {base_config}: only for a single-file base checkpoint (a folder or hub id brings its own configs)")
    inputs = [("the input", p) for p in loras] + ([("the base model", base)] if isinstance(base, (str, os.PathLike)) else [])
    check_output(out_dir, inputs, overwrite=overwrite, folder=True)
    if single_file is not None:
        check_output(single_file, [*inputs, ("the output folder", out_dir)], overwrite=overwrite)
    pipe = load_model(base, base_config, dtype) if isinstance(base, (str, os.PathLike)) else base
    saved = snapshot(pipe)  # the caller's pipeline comes back as it was: adapters, weights, on/off, fused
    from .pipeline import SDXL_EMBEDDING_KEYS

    encoders = [(tok, enc) for _, tok, enc in SDXL_EMBEDDING_KEYS if getattr(pipe, tok, None) is not None]
    vocabs = {tok: set(getattr(pipe, tok).get_vocab()) for tok, _ in encoders}  # (a LoRA's learned token is baked in)
    taken = {n for found in list_adapters(pipe).values() for n in found}
    names: dict = {}
    try:
        unfuse(pipe)
        enable_all(pipe)
        for i, path in enumerate(loras):
            names[path] = load_lora(pipe, path, adapter=_free_name(f"_bake{i}", taken))
        te = {names[p]: float(w) for p, w in (text_encoder or {}).items()}
        set_adapters(pipe, {names[p]: float(w) for p, w in loras.items()}, text_encoder=te or None,
                     blocks={names[p]: spec for p, spec in blocks.items()} if blocks else None)
        fuse(pipe)  # wrappers are swapped out while fused: the modules saved are the plain ones, fused weights
        with atomic_folder(out_dir) as tmp:
            pipe.save_pretrained(tmp)
        if single_file is not None:
            atomic_save(to_ldm_checkpoint(pipe), single_file, {"format": "pt"})
    finally:
        unfuse(pipe)
        for name in names.values():
            delete_adapter(pipe, name)
        _drop_empty_wrappers(pipe)
        restore(saved)
        for tok, enc in encoders:  # the caller's tokenizers as they were (SDXL: both)
            added = [t for t in getattr(pipe, tok).get_vocab() if t not in vocabs[tok]]
            if added:
                pipe.unload_textual_inversion(added, tokenizer=getattr(pipe, tok), text_encoder=getattr(pipe, enc))
    logger.info("baked %d LoRA file(s) into %s", len(loras), out_dir)
    return Path(out_dir)


def load_model(base: str | os.PathLike, base_config: str | os.PathLike | None = None, dtype: torch.dtype | None = None):
    """The pipeline of a diffusers model folder, a hub id or a single-file checkpoint (``base_config``: its configs
    and tokenizers, see ``bake``), checked by ``_check_base`` first."""
    from .pipeline import load_single_file

    _check_base(base)
    if Path(base).is_file():
        try:
            return load_single_file(base, config=base_config, **dtype_kwargs(dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{base}: cannot load it as a single-file Stable Diffusion checkpoint ({e})") from e
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(base, **dtype_kwargs(dtype))
    except OSError as e:
        if Path(base).exists():
            raise
        raise FileNotFoundError(f"{base}: no such model folder, nor a hub model that could be loaded (--debug shows why)") from e


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... if it is taken (the new name is added to ``taken``)."""
    n, candidate = 0, name
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _check_base(base: str | os.PathLike) -> None:
    """A base model must be a diffusers folder (with ``model_index.json``), a ``.safetensors`` checkpoint or look
    like a hub id (``org/name``)."""
    path = Path(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{base}: not a diffusers model folder (it has no model_index.json)")
    elif path.exists():
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{base}: a file, but not a .safetensors checkpoint nor a diffusers model folder")
    elif not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(base)):
        raise FileNotFoundError(f"{base}: no such model folder")


def check_output(
    out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], *, overwrite: bool, folder: bool = False
) -> None:
    """Refuse to write ``out`` over one of ``inputs`` (``(label, path)`` pairs), or, for a ``folder``, into or
    around one; refuse an existing ``out`` unless ``overwrite``. ``ValueError`` / ``FileExistsError`` name both.

    Example:
        >>> check_output("a.safetensors", [("the input", "a.safetensors")], overwrite=True)
        ValueError: a.safetensors: refusing to write over the input a.safetensors
    """
    target = Path(out).resolve()
    for label, src in inputs:
        source = Path(src).resolve()
        if target == source or (target.exists() and source.exists() and os.path.samefile(target, source)):
            raise ValueError(f"{out}: refusing to write over {label} {src}")
        if folder and source.is_relative_to(target):
            raise ValueError(f"{out}: refusing to write a folder that holds {label} {src}")
        if folder and target.is_relative_to(source):
            raise ValueError(f"{out}: refusing to write a folder inside {label} {src}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if target.is_dir() and not folder:
        raise IsADirectoryError(f"{out} is a folder; name a file")
    if target.exists() and folder and (not target.is_dir() or (any(target.iterdir()) and not (target / "model_index.json").is_file())):
        raise FileExistsError(f"{out} exists and is not a diffusers model folder; refusing to replace it")


_LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# An HF CLIP text encoder's modules in open_clip's names (OpenCLIP in original checkpoints: SD 2.x's text encoder,
# SDXL's second; q/k/v are packed into ``attn.in_proj_*``)
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}


def _open_clip_state(encoder, component: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights in open_clip's layout, as original checkpoints hold OpenCLIP (SDXL's second
    encoder, SD 2.x's): q/k/v packed into ``in_proj``, ``text_projection`` (where there is one) transposed. Any
    weight it has no name for is refused."""
    state = {k if k == "text_projection.weight" else with_text_model(k): t for k, t in encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            i, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    packed = [state[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                    out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(packed)
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{i}.{_OPEN_CLIP_LAYER[module]}.{leaf}"] = t
            else:
                raise ValueError(f"{component}: no open_clip name for {key}")
        else:
            raise ValueError(f"{component}: no open_clip name for {key}")
    return out


def to_ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one original-layout state dict, as A1111 and ComfyUI load
    it: LDM for SD 1.x (CLIP-L under ``cond_stage_model.transformer.``) and SD 2.x (OpenCLIP, told by its ``gelu``,
    in open_clip's layout under ``cond_stage_model.model.``), SGM for SDXL (the UNet's blocks by SGM names, CLIP-L
    under ``conditioner.embedders.0.transformer.``, OpenCLIP-G in open_clip's layout under
    ``conditioner.embedders.1.model.``).

    Example:
        >>> safetensors.torch.save_file(to_ldm_checkpoint(pipe), "model.safetensors")
    """
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    out: dict[str, torch.Tensor] = {}
    unet, text_encoder = unwrap(pipe.unet), unwrap(pipe.text_encoder)
    lpb = unet.config.layers_per_block
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    prefixes = ldm_unet_prefixes(lpb, len(unet.down_blocks), [hasattr(block, "attentions") for block in unet.up_blocks])
    for key, t in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")  # weight / bias
        out[f"model.diffusion_model.{ldm_module_path(module, prefixes)}.{leaf}"] = t
    vae_names = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                 "encoder.mid_block.resnets.0.": "encoder.mid.block_1.", "encoder.mid_block.resnets.1.": "encoder.mid.block_2.",
                 "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.resnets.0.": "decoder.mid.block_1.",
                 "decoder.mid_block.resnets.1.": "decoder.mid.block_2.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}  # fmt: skip
    n_up = len(pipe.vae.decoder.up_blocks)
    for i, block in enumerate(pipe.vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            vae_names[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        vae_names[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
    for i, block in enumerate(pipe.vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            vae_names[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n_up - 1 - i}.block.{j}."
        vae_names[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n_up - 1 - i}.upsample."
    for key, t in pipe.vae.state_dict().items():
        new = rename_prefix(key, vae_names).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in new:
            head, _, leaf = new.rpartition(".")
            block, _, layer = head.partition(".attn_1.")
            new = f"{block}.attn_1.{_LDM_VAE_ATTN.get(layer, layer)}.{leaf}"
            if leaf == "weight" and t.dim() == 2:
                t = t[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out["first_stage_model." + new] = t
    if not sdxl and text_encoder.config.hidden_act == "gelu":  # SD 2.x: OpenCLIP-H (CLIP-L runs quick_gelu)
        for key, t in _open_clip_state(text_encoder, "text_encoder").items():
            out["cond_stage_model.model." + key] = t
        return out
    clip_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, t in text_encoder.state_dict().items():
        out[clip_prefix + with_text_model(key)] = t
    if sdxl:
        for key, t in _open_clip_state(unwrap(pipe.text_encoder_2), "text_encoder_2").items():
            out["conditioner.embedders.1.model." + key] = t
    return out


def _drop_empty_wrappers(pipe) -> None:
    """Put base layers back where a LoRA wrapper holds no adapter any more."""
    from .inject import lora_layers, unwrap_layer
    from .pipeline import _components

    for _, model in _components(pipe):
        for path, layer in list(lora_layers(model)):
            if not layer.specs:
                unwrap_layer(model, path)


def _target_pattern(key: str) -> str:
    """The module path below its last numbered container (``transformer_blocks.0``, ``layers.3``, ``resnets.1``),
    as target lists name it: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
    ``unet attn1.to_out.0``, ``...ff.net.0.proj`` -> ``unet ff.net.0.proj``; a lone name keeps its container's
    (``unet attentions.proj_in``, ``unet resnets.conv1``)."""
    component, _, path = key.partition(".")
    parts = path.split(".")
    cut = max((i + 2 for i in range(len(parts) - 1) if parts[i].endswith("s") and parts[i + 1].isdigit()), default=0)
    tail = parts[cut:] if len(parts) - cut > 1 or cut < 2 else [parts[cut - 2], *parts[cut:]]
    return f"{component} {'.'.join(tail)}"


def inspect_lora(path: str | os.PathLike) -> dict:
    """What a LoRA file holds: format, architecture guess, ranks, alphas, targets, size, trigger words, metadata.

    Example:
        >>> info = inspect_lora("style.safetensors"); info["format"], info["ranks"]
        ('kohya', {4: 192})
    """
    lora, header = read_lora_file(path)
    files = lora_files(path)  # a folder's pytorch_lora_weights.safetensors, a PEFT adapter's file(s)
    path = files[0]
    fmt = header.pop("_format")
    bundled = json.loads(header.pop("_bundled_embeddings", "[]"))
    ours = our_metadata(header)
    words: list[str] = list(ours.get("trigger_words") or [])
    if header.get("modelspec.trigger_phrase"):
        words += [w.strip() for w in header["modelspec.trigger_phrase"].split(",") if w.strip()]
    if header.get("ss_tag_frequency"):
        try:
            freq: Counter = Counter()
            for tags in json.loads(header["ss_tag_frequency"]).values():
                freq.update(tags)
            words += [t for t, _ in freq.most_common(5)]
        except (ValueError, AttributeError):
            pass
    params = sum(w.A.numel() + w.B.numel() + (w.oft.numel() if w.oft is not None else 0) for w in lora.values())
    dtypes = Counter(str(w.A.dtype).removeprefix("torch.") for w in lora.values())
    factored = [w for w in lora.values() if w.oft is None]  # (an OFT / GLoRA / (IA)^3 module: no LoRA rank or alpha)
    return {
        "file": str(path),
        "format": fmt,
        "architecture": guess_architecture(lora),
        "layers": dict(Counter(k.split(".", 1)[0] for k in lora)),
        "ranks": dict(sorted(Counter(w.rank for w in factored).items())),
        "alphas": dict(sorted(Counter(float(w.alpha) for w in factored).items())),
        "targets": dict(sorted(Counter(_target_pattern(k) for k in lora).items())),
        "conv_layers": sum(1 for w in lora.values() if w.A.dim() == 4 and w.A.shape[2:] != (1, 1)),
        "params": params,
        "dtype": dtypes.most_common(1)[0][0],
        "size_bytes": sum(f.stat().st_size for f in files),
        "trigger_words": list(dict.fromkeys(words)),
        "embeddings": bundled + learned_tokens(header),  # bundled (A1111 / OneTrainer) or cloneofsimo's
        "param_deltas": int(header.pop("_param_deltas", "0")),  # biases, norms, embedding tables (params.py)
        "module_kinds": _module_kinds(path) if fmt in ("lycoris", "comfyui", "kohya") else
                        dict(sorted(Counter("LoRA" if w.magnitude is None else "LoRA+DoRA" for w in lora.values()).items())),
        "metadata": {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in sorted(header.items())},
    }


def _module_kinds(path: Path) -> dict[str, int]:
    """A kohya / LyCORIS / ComfyUI file's modules by kind (``{"LoHa": 182, "LoRA": 64}``), from its key names alone."""
    from safetensors import safe_open

    from .formats_lycoris import module_kinds

    with safe_open(str(path), framework="pt") as f:
        return module_kinds(list(f.keys()))


def convert_lora(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str = "kohya",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    drop_embeddings: bool = False,
) -> Path:
    """Rewrite a LoRA file in another format (``kohya`` or ``diffusers``), keeping tensors (and their dtype
    unless ``dtype`` is given), alphas, our metadata and the source header's user metadata (kohya's ``ss_*``,
    ``modelspec.*``...). ``dst`` may not be ``src``, nor exist unless ``overwrite``.

    Learned token embeddings travel with a kohya file, bundled as A1111 loads them (``bundle_emb.<token>.*``): those
    bundled in the source, cloneofsimo's ``<s1>``, and the ``embedding_file`` of our pivotal tuning beside it. A
    diffusers file has no place for bundled or cloneofsimo ones: refused unless ``drop_embeddings`` (our pivotal
    tuning's file stays named in the metadata, as it was).

    Example:
        >>> convert_lora("pytorch_lora_weights.safetensors", "style_kohya.safetensors", to="kohya")
    """
    if to not in WRITERS:
        raise ValueError(f"unknown format {to!r}; choose from {sorted(WRITERS)}")
    check_output(dst, [("the input", src)], overwrite=overwrite)
    lora, params, header = read_lora_file_with_params(src)
    meta = {**our_metadata(header), "name": Path(dst).stem, "converted_from": header["_format"]}  # (name: the alias)
    embeddings = _embeddings(lora_file(src), header, meta, pivotal=to == "kohya")
    if to != "kohya" and embeddings and not drop_embeddings:
        raise LoraFormatError(
            f"{src}: the learned token embedding(s) {', '.join(embeddings)} have no place in a {to} LoRA file; "
            "convert --to kohya bundles them (A1111 loads them with the LoRA), or pass --drop-embeddings "
            "(drop_embeddings=True) to convert the LoRA layers without them"
        )
    tokens = list(embeddings) if drop_embeddings else []  # dropped
    bundle = embeddings if embeddings and not tokens else None
    if bundle:
        meta.pop("embedding_file", None)  # bundled now
    if header.get("modelspec.trigger_phrase") and not meta.get("trigger_words"):
        meta["trigger_words"] = [w.strip() for w in header["modelspec.trigger_phrase"].split(",")]
    dtype = dtype or (next(iter(lora.values())).A.dtype if lora else next(t.dtype for d in params.values() for t in d[:3] if t is not None))
    write_lora_file(dst, lora, metadata=meta, format=to, dtype=dtype, header=user_metadata(header),
                    embeddings=bundle, params=params)
    if tokens:
        logger.warning("%s: dropped the learned token embedding(s) %s", src, ", ".join(tokens))
    return Path(dst)


def _embeddings(src: Path, header: dict[str, str], meta: dict, pivotal: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The learned token embeddings of a LoRA file (``{token: {"*" | "clip_l" | "clip_g": vectors}}``): bundled
    (``bundle_emb.*``), cloneofsimo's, and, with ``pivotal``, our pivotal tuning's ``embedding_file`` beside it."""
    from safetensors import safe_open

    out = read_bundled_embeddings(src) if "_bundled_embeddings" in header else {}
    tokens = learned_tokens(header)
    if tokens:
        with safe_open(str(src), framework="pt") as f:
            vectors = {token: f.get_tensor(token) for token in tokens}
        out.update({token: {"*": v.reshape(-1, v.shape[-1])} for token, v in vectors.items()})
    name = meta.get("embedding_file")
    if pivotal and name and Path(str(name)).name == str(name) and (src.parent / str(name)).is_file():
        out.update(read_embedding_file(src.parent / str(name), meta.get("trigger_words")))
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _weighted(spec: str) -> tuple[str, float] | tuple[str, float, tuple[float, ...]]:
    """``path.safetensors:0.7`` -> ``("path.safetensors", 0.7)``; no ``:weight`` means 1.0 (and so does an
    existing file whose name has a colon). ``path:0.7:OUTD`` or ``path:0.7:1,0,...`` adds a LoRA Block Weight preset
    or vector (``blend.LBW_PRESETS``; 17 values for SD1, 12 for SDXL): ``(path, 0.7, vector)``."""
    from .blend import LBW_PRESETS, lbw_blocks

    head, colon, last = spec.rpartition(":")
    if colon and head and not os.path.exists(spec) and (last in LBW_PRESETS or "," in last):
        try:
            blocks = lbw_blocks(last)
        except ValueError as e:
            raise ValueError(f"{spec}: {e} (FILE[:WEIGHT[:BLOCKS]], e.g. style.safetensors:0.7:OUTD)") from None
        return (*_weighted(head), blocks)
    path, colon, weight = spec.rpartition(":")
    if not colon or os.path.exists(spec) or not path:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{spec}: {weight!r} after the last ':' is not a weight (FILE[:WEIGHT], e.g. style.safetensors:0.7)")
    return path, value


def _cmd_merge(args: argparse.Namespace) -> int:
    if args.rank is not None and args.mode != "svd":
        raise ValueError(f"--rank {args.rank} needs --mode svd (a concat merge is exact: its ranks add up)")
    dynamic = {"fro": args.fro, "sv_ratio": args.sv_ratio, "sv_cumulative": args.sv_cumulative, "conv_rank": args.conv_rank}
    for key, value in dynamic.items():
        if value is not None and args.mode != "svd":
            raise ValueError(f"--{key.replace('_', '-')} {value} needs --mode svd")
    inputs = [_weighted(s) for s in args.inputs]
    check_output(args.output, [("the input", p) for p, *_ in inputs], overwrite=args.overwrite)
    report = merge_loras(inputs, args.output, mode=args.mode, rank=args.rank, format=args.format, dtype=_DTYPES[args.dtype],
                         **dynamic)
    print(f"wrote {args.output}: {len(report.lora)} layers, ranks {report.ranks}, mode {report.mode}")
    if report.mode == "svd":
        _print_errors(report)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract_lora

    report = extract_lora(args.base, args.tuned, args.output, rank=args.rank, targets=parse_targets(args.targets),
                          text_encoder=not args.no_text_encoder, base_config=args.base_config, format=args.format,
                          dtype=_DTYPES[args.dtype], overwrite=args.overwrite)
    components = sorted({k.split(".", 1)[0] for k in report.lora})
    print(f"wrote {args.output}: {len(report.lora)} layers ({', '.join(components)}), rank {args.rank}")
    _print_errors(report)
    return 0


def _print_errors(report) -> None:
    """An SVD merge's or an extraction's relative errors: the five worst layers and overall."""
    for key, err in sorted(report.errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {err:.4%}  {key}")
    print(f"relative Frobenius error: {report.error:.4%} overall, {max(report.errors.values()):.4%} worst layer")


def _cmd_convert(args: argparse.Namespace) -> int:
    dtype = _DTYPES[args.dtype] if args.dtype else None
    out = convert_lora(args.input, args.output, to=args.to, dtype=dtype, overwrite=args.overwrite, drop_embeddings=args.drop_embeddings)
    print(f"wrote {out} ({args.to})")
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    dtype = _DTYPES[args.dtype] if args.dtype else None
    inputs = [_weighted(s) for s in args.loras]
    blocks = {path: list(rest[0]) for path, _, *rest in inputs if rest}
    out = bake(args.base, {path: w for path, w, *_ in inputs}, args.output, blocks=blocks or None, dtype=dtype,
               single_file=args.single_file, base_config=args.base_config, overwrite=args.overwrite)
    print(f"wrote {out}" + (f" and {args.single_file}" if args.single_file else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("file", "format", "module_kinds", "architecture", "layers", "ranks", "alphas", "conv_layers", "params", "dtype", "size_bytes", "trigger_words", "embeddings", "param_deltas"):
        print(f"{key:14} {info[key]}")
    print("targets")
    for pattern, n in info["targets"].items():
        print(f"  {n:4d}  {pattern}")
    if info["metadata"]:
        print("metadata")
        for k, v in info["metadata"].items():
            print(f"  {k}: {v}")
    return 0


def _svd_outputs(p: argparse.ArgumentParser) -> None:
    """``--fro`` / ``--sv-cumulative`` / ``--sv-ratio``, ``--conv-rank``, ``--format``, ``--dtype`` and ``--overwrite``:
    what ``merge`` and ``resize`` share."""
    dynamic = p.add_mutually_exclusive_group()
    dynamic.add_argument("--fro", type=float, default=None, metavar="SHARE", help="svd: a rank per layer, the fewest singular "
                         "values keeping this share of its change's Frobenius norm (e.g. 0.95), at most --rank")
    dynamic.add_argument("--sv-cumulative", type=float, default=None, metavar="SHARE", help="svd: a rank per layer, the "
                         "fewest singular values whose sum reaches this share of their total, at most --rank")
    dynamic.add_argument("--sv-ratio", type=float, default=None, metavar="RATIO", help="svd: a rank per layer, the singular "
                         "values above the largest divided by RATIO (e.g. 10), at most --rank")
    p.add_argument("--conv-rank", type=int, default=None, help="svd: the rank of the 3x3 convolutions' layers (LoCon; default --rank)")
    p.add_argument("--format", choices=sorted(WRITERS), default="diffusers")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def register(subparsers) -> None:
    """Add ``merge``, ``resize``, ``convert``, ``bake``, ``extract`` and ``inspect`` to the ``lora-diffusion`` command
    line."""
    p = subparsers.add_parser("merge", help="merge LoRA files with weights into one (exact concat or SVD)")
    p.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT[:BLOCKS]]",
                   help="BLOCKS: a LoRA Block Weight preset (OUTD, IND, ...) or vector (1,0,0,...: 17 values for SD1, 12 for SDXL)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=["concat", "svd"], default="concat", help="concat: exact, ranks add up; svd: compress to --rank")
    p.add_argument("--rank", type=int, default=None)
    _svd_outputs(p)
    p.set_defaults(func=_cmd_merge)

    p = subparsers.add_parser("resize", help="cut a LoRA file to a lower rank by SVD (merge --mode svd of one file)")
    p.add_argument("inputs", nargs=1, metavar="FILE")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rank", type=int, required=True)
    _svd_outputs(p)
    p.set_defaults(func=_cmd_merge, mode="svd")

    p = subparsers.add_parser("convert", help="convert a LoRA file between kohya/A1111 and diffusers formats")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=sorted(WRITERS), required=True)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: keep the input's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--drop-embeddings", action="store_true", help="convert a file with learned token embeddings without them")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("bake", help="write a diffusers model folder with LoRA files fused in")
    p.add_argument("base", help="a diffusers model folder, a hub id or a single-file .safetensors checkpoint")
    p.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT[:BLOCKS]]", help="BLOCKS: a LoRA Block Weight preset (OUTD, ...) or vector, as for merge")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--single-file", default=None, metavar="CKPT.safetensors", help="also write an original-layout checkpoint (A1111/ComfyUI)")
    p.add_argument("--base-config", default=None, metavar="DIR", help="for a single-file BASE: a diffusers folder or hub id of the "
                   "same architecture to take its configs and tokenizers from (default: fetched from the Hub)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder / file")
    p.set_defaults(func=_cmd_bake)

    p = subparsers.add_parser("extract", help="extract a LoRA from a fine-tuned model: its change from the base, cut to a rank by SVD")
    p.add_argument("base", help="the original model: a diffusers folder, a hub id or a single-file .safetensors checkpoint")
    p.add_argument("tuned", help="the fine-tuned model, of the same architecture")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", default="attn", help="layers: a preset (attn, cross, attn-mlp, full), a regex, or comma-separated suffixes")
    p.add_argument("--no-text-encoder", action="store_true", help="the UNet only")
    p.add_argument("--format", choices=sorted(WRITERS), default="diffusers")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    p.add_argument("--base-config", default=None, metavar="DIR", help="for single-file checkpoints: a diffusers folder or hub "
                   "id of the same architecture to take their configs and tokenizers from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_extract)

    p = subparsers.add_parser("inspect", help="show a LoRA file's format, architecture, ranks, targets, metadata")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

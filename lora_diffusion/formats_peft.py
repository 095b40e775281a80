"""PEFT adapters as PEFT saves them (``PeftModel.save_pretrained``): read, as the LoRA they are.

A folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``...)
and ``adapter_model.safetensors``, whose keys name the wrapped model's modules under ``base_model.model.``
(``base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``) without saying
which model that was. PEFT's own DreamBooth example saves the UNet's adapter in ``<output>/unet`` and the text
encoder's in ``<output>/text_encoder``: a folder of such sub-folders is read as one LoRA. The component is the
sub-folder's name where it is one (``unet``, ``text_encoder``, ``text_encoder_2``), else told by the module paths
(a UNet's ``down_blocks`` / ``mid_block`` / ``up_blocks``..., a CLIP text model's ``text_model`` / ``encoder``).
Alpha comes from the config, as PEFT applies it: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module
through the patterns. There is nothing to write: ``convert`` makes diffusers or kohya files of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "peft_adapters", "read_peft_adapters"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
               "add_embedding", "encoder_hid_proj")
_TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm", "text_projection")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def peft_adapters(path: str | Path) -> dict[Path, str | None] | None:
    """``{adapter_model.safetensors: component or None}`` of the PEFT adapter(s) at ``path`` (a folder with
    ``adapter_config.json``, such a file, or a folder of ``unet`` / ``text_encoder`` / ``text_encoder_2`` sub-folders
    of them); ``None`` where ``path`` is none of these. The component is the folder's name where it is one."""
    path = Path(path)
    if path.is_file():
        return {path: _component_of(path.parent)} if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file() else None
    if (path / PEFT_CONFIG).is_file():
        return {path / PEFT_WEIGHTS: _component_of(path)}
    found = {path / c / PEFT_WEIGHTS: c for c in _COMPONENTS if (path / c / PEFT_CONFIG).is_file()}
    return found or None


def _component_of(folder: Path) -> str | None:
    return folder.name if folder.name in _COMPONENTS else None


def _component_from_paths(paths: list[str], source: str) -> str:
    roots = {p.split(".", 1)[0] for p in paths}
    if roots <= set(_UNET_ROOTS):
        return "unet"
    if roots <= set(_TEXT_ROOTS):
        return "text_encoder"
    raise ValueError(f"{source}: cannot tell which model these PEFT keys are for (modules under {sorted(roots)}); "
                     "put the adapter in a folder named unet, text_encoder or text_encoder_2")


def read_peft_adapters(adapters: dict[Path, str | None]):
    """The adapters ``peft_adapters`` found, as one canonical LoRA: ``(lora and parameter deltas, header)``, the
    header the (first) weights file's with ``_format`` ``peft``. Raises ``LoraFormatError`` naming the file and key
    for what is not a PEFT LoRA (another PEFT type, ``modules_to_save``, a missing config or weights file)."""
    from .formats import PROJECTION, DIFFUSERS_METADATA_KEY, LoraFormatError, LoraWeights, check_finite, from_diffusers, read_safetensors

    out: dict = {}
    header: dict[str, str] = {}
    for weights, component in adapters.items():
        config_path = weights.parent / PEFT_CONFIG
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no such file beside {config_path}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise LoraFormatError(f"{config_path}: not a PEFT adapter config ({e})") from None
        source = str(weights)
        kind = config.get("peft_type", "LORA")
        if kind != "LORA":
            raise LoraFormatError(f"{config_path}: a PEFT {kind} adapter; only PEFT LoRA adapters (peft_type LORA) are read")
        state, file_header = read_safetensors(weights)
        header = header or file_header
        stripped = {}
        for key, tensor in state.items():
            if not key.startswith(PREFIX) or ".modules_to_save." in key:
                raise LoraFormatError(f"{source}: key {key!r} is not a PEFT LoRA key ({PREFIX}<module>.lora_A.weight; "
                                      "full copies of modules, modules_to_save, are not read)")
            stripped[key[len(PREFIX):]] = tensor
        if not stripped:
            raise LoraFormatError(f"{source}: the file holds no tensors")
        check_finite({k: t for k, t in stripped.items() if PROJECTION not in k}, source)
        try:
            component = component or _component_from_paths(list(stripped), source)
        except ValueError as e:
            raise LoraFormatError(str(e)) from None
        meta = {f"{component}.r": config.get("r", 8), f"{component}.lora_alpha": config.get("lora_alpha", 8),
                f"{component}.rank_pattern": config.get("rank_pattern") or {},
                f"{component}.alpha_pattern": config.get("alpha_pattern") or {}}
        read = from_diffusers({f"{component}.{k}": t for k, t in stripped.items()},
                              {DIFFUSERS_METADATA_KEY: json.dumps(meta)}, source, where=str(config_path))
        if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r): alpha * sqrt(r) / r
            bias = next((k for k, w in read.items() if not isinstance(w, LoraWeights)), None)
            if bias is not None:
                raise LoraFormatError(f"{source}: {bias}: lora_B.bias with use_rslora is not supported")
            read = {k: w._replace(alpha=w.alpha * math.sqrt(w.rank)) for k, w in read.items()}
        clash = sorted(set(read) & set(out))
        if clash:
            raise LoraFormatError(f"{source}: {clash[0]} is in two of the adapters read together")
        out.update(read)
    return out, {**header, "_format": "peft"}


"""kohya-ss / AUTOMATIC1111 / ComfyUI LoRA files as pure functions over plain dicts of tensors.

A kohya key is a prefix plus the module path with every ``.`` replaced by ``_``, then ``.lora_down.weight``,
``.lora_up.weight`` or ``.alpha`` (a 0-dim tensor):
``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha``. Prefixes: ``lora_unet_``, ``lora_te_`` (SD1/2),
``lora_te1_`` / ``lora_te2_`` (SDXL: a file with a second text encoder names the first ``lora_te1_``). Files made
from the original LDM checkpoints name UNet modules the LDM way
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``middle_block``, ``output_blocks``,
``in_layers_2``...); they are mapped to diffusers module paths (two layers per block: SD1, SD2 and SDXL). SDXL
files are written that way too, as kohya's SDXL trainer writes them (SGM block names); SD1/SD2 ones with the
diffusers names kohya's SD1 trainer uses.

Turning ``_`` back into ``.`` uses a rule set: the path is split at every ``_`` and the pieces that form one
module name (``down_blocks``, ``to_q``, ``time_emb_proj``, ...) are joined again.

Example:
    >>> state, header = to_kohya(lora, {"name": "style", "trigger_words": ["sks"]})
    >>> from_kohya(state, header) == lora   # tensors and alpha round-trip
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections import Counter

import torch

__all__ = ["to_kohya", "from_kohya", "is_kohya", "kohya_name", "canonical_key", "module_path_from_kohya", "KOHYA_PREFIXES"]

# kohya prefix <-> canonical component
# (``oft_unet_``: kohya's networks.oft names its UNet modules so)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "oft_unet_": "unet"}
_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}

# Module names that contain "_" (diffusers UNet, CLIP text encoder, and the LDM UNet). Longest first.
_COMPOUNDS = sorted(
    {
        # diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "norm_out",
        # CLIP text encoder
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
        "text_projection", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
        # LDM / original SD UNet
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
    },
    key=lambda s: -s.count("_"),
)
_COMPOUND_PARTS = [tuple(c.split("_")) for c in _COMPOUNDS]

# diffusers ResnetBlock2D sub-layers <-> LDM ResBlock
DIFFUSERS_TO_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_LDM_RESNET = {ldm: diffusers for diffusers, ldm in DIFFUSERS_TO_LDM_RESNET.items()}
_LDM_RESNET_HEADS = ("in_layers", "out_layers", "emb_layers", "skip_connection")
_LAYERS_PER_BLOCK = 2  # SD1 / SD2 / SDXL


def _dots(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (the rule set)."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for compound in _COMPOUND_PARTS:
            if tuple(parts[i : i + len(compound)]) == compound:
                out.append("_".join(compound))
                i += len(compound)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def ldm_to_diffusers(path: str) -> str:
    """Map an LDM (SD1/SD2) or SGM (SDXL) UNet module path to the diffusers one; other paths are returned unchanged."""
    fixed = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # fmt: skip
    if path in fixed:
        return fixed[path]
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)", path)
    if not m:
        return path
    kind, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":
        # middle_block.{0,1,2}.rest: ResBlock, SpatialTransformer, ResBlock (the inner index is absent)
        rest = f"{j}.{rest}" if j is not None else rest
        block = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(i)
        if block is None:
            return path
        return f"mid_block.{block}.{_LDM_RESNET.get(rest, rest)}"
    n = _LAYERS_PER_BLOCK + 1
    if kind == "input_blocks":
        b, layer = (i - 1) // n, (i - 1) % n
        prefix = f"down_blocks.{b}"
        if rest == "op":
            return f"{prefix}.downsamplers.0.conv"
    else:
        b, layer = i // n, i % n
        prefix = f"up_blocks.{b}"
        if rest == "conv":
            return f"{prefix}.upsamplers.0.conv"
    if rest.startswith(_LDM_RESNET_HEADS):
        return f"{prefix}.resnets.{layer}.{_LDM_RESNET.get(rest, rest)}"
    return f"{prefix}.attentions.{layer}.{rest}"


def ldm_unet_prefixes(layers_per_block: int, down_blocks: int, up_attention: list[bool]) -> dict[str, str]:
    """diffusers UNet module prefix -> LDM (SD1/SD2) or SGM (SDXL) prefix, e.g. ``down_blocks.1.attentions.0.`` ->
    ``input_blocks.4.1.``; ``up_attention``: whether each up block has attention (its upsampler is then the
    third module of the LDM block, else the second)."""
    n = layers_per_block + 1
    names = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.", "conv_in.": "input_blocks.0.0.",
             "conv_norm_out.": "out.0.", "conv_out.": "out.2.", "mid_block.resnets.0.": "middle_block.0.",
             "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}  # fmt: skip
    for i in range(down_blocks):
        for j in range(layers_per_block):
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n * i + j + 1}.0."
            names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n * i + j + 1}.1."
        names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n * (i + 1)}.0.op."
    for i, attention in enumerate(up_attention):
        for j in range(n):
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n * i + j}.0."
            names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n * i + j}.1."
        names[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{n * i + layers_per_block}.{2 if attention else 1}."
    return names


def rename_prefix(key: str, prefixes: dict[str, str]) -> str:
    """``key`` with its longest matching prefix in ``prefixes`` replaced (unchanged if none matches)."""
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src):
            return prefixes[src] + key[len(src) :]
    return key


def ldm_module_path(path: str, prefixes: dict[str, str]) -> str:
    """A diffusers UNet module path in LDM naming under ``ldm_unet_prefixes``: the block renamed, a ResNet's
    sub-layer too (``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``)."""
    new = rename_prefix(path + ".", prefixes)[:-1]
    if ".resnets." in path or path.startswith("mid_block.resnets."):
        block, _, layer = new.rpartition(".")
        new = f"{block}.{DIFFUSERS_TO_LDM_RESNET.get(layer, layer)}"
    return new


# SDXL's UNet: three levels, two layers per block, attention in the lower two up blocks (those with upsamplers)
_SDXL_PREFIXES = ldm_unet_prefixes(_LAYERS_PER_BLOCK, 3, [True, True, False])


def module_path_from_kohya(name: str) -> tuple[str, str]:
    """``lora_unet_down_blocks_0_..._to_q`` -> ``("unet", "down_blocks.0....to_q")`` (LDM names mapped)."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            path = _dots(name[len(prefix) :])
            if component == "unet":
                path = ldm_to_diffusers(path)
            return component, path
    raise ValueError(f"{name!r} has no kohya prefix ({', '.join(KOHYA_PREFIXES)})")


def canonical_key(name: str) -> str:
    """kohya module name -> canonical key: ``lora_te_text_model_..._q_proj`` -> ``text_encoder.text_model....q_proj``
    (text-encoder paths always with ``text_model.``)."""
    from .formats import with_text_model

    component, path = module_path_from_kohya(name)
    return f"{component}.{with_text_model(path) if component.startswith('text_encoder') else path}"


def kohya_name(key: str, sdxl: bool = False) -> str:
    """Canonical ``"unet.down_blocks.0....to_q"`` -> kohya module name ``lora_unet_down_blocks_0_..._to_q``.
    ``sdxl``: an SDXL LoRA, named as kohya's SDXL trainer names it: the UNet's modules by their SGM blocks
    (``lora_unet_input_blocks_4_1_...``, as A1111 and ComfyUI also read them) and the first text encoder
    ``lora_te1_``."""
    component, _, path = key.partition(".")
    if component not in _WRITE_PREFIX:
        raise ValueError(f"{key!r}: component {component!r} has no kohya prefix")
    prefix = "lora_te1_" if sdxl and component == "text_encoder" else _WRITE_PREFIX[component]
    if sdxl and component == "unet":
        path = ldm_module_path(path, _SDXL_PREFIXES)
    return prefix + path.replace(".", "_")


def is_kohya(state: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> bool:
    """Every key is a kohya LoRA key (``lora_unet_``/``lora_te*_`` + ``.lora_down/.lora_up/.alpha``)."""
    return bool(state) and all(k.startswith(tuple(KOHYA_PREFIXES)) and k.endswith(tuple(_SUFFIXES)) for k in state)


def from_kohya(state: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "state dict"):
    """kohya/A1111/ComfyUI state dict -> canonical ``{"<component>.<path>": LoraWeights}``; missing alpha = rank.
    (The per-module reader that LyCORIS files share: ``formats_lycoris.read_modules``.)"""
    from .formats_lycoris import read_modules

    return read_modules(state, source, canonical_key, "kohya")


# our metadata's ``architecture`` (``save_lora`` sets it from the UNet) -> (``ss_base_model_version``,
# ``modelspec.architecture`` prefix)
ARCHITECTURE_SPECS = {"sd1": ("sd_v1", "stable-diffusion-v1"), "sd2": ("sd_v2", "stable-diffusion-v2-512"),
                      "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")}


def _architecture_spec(lora, metadata: dict | None = None) -> tuple[str, str]:
    """(``ss_base_model_version``, ``modelspec.architecture`` prefix): from our metadata's ``architecture`` where
    it is given (``save_lora`` knows the UNet: an SDXL LoRA without a text encoder or a cross-attention key would
    look like SD 1.x), else from the text-feature width."""
    from .formats import guess_architecture

    known = (metadata or {}).get("architecture")
    if isinstance(known, str) and known in ARCHITECTURE_SPECS:  # (a file's metadata may hold anything)
        return ARCHITECTURE_SPECS[known]
    guess = guess_architecture(lora)
    return ARCHITECTURE_SPECS["sdxl" if guess.startswith("SDXL") else "sd2" if guess.startswith("SD 2") else "sd1"]


def to_kohya(lora, metadata: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical -> (kohya state dict, header with ``ss_*`` and ``modelspec.*`` keys) that A1111 and ComfyUI load.

    ``.alpha`` is a 0-dim fp32 tensor (exact for any alpha); a DoRA module's magnitude is its ``.dora_scale``. ``metadata`` (our own: ``name``/``adapter``,
    ``trigger_words``, ``base_model``; a training run's ``comment`` and ``card``: kohya's ``--training_comment`` and
    ``--metadata_*``) fills ``ss_output_name``, ``modelspec.title``, ``modelspec.trigger_phrase``, the card's
    ``modelspec.*`` keys and ``ss_training_comment``.
    """
    from .formats import check_components

    check_components(lora, "kohya")
    metadata = metadata or {}
    version, arch = _architecture_spec(lora, metadata)
    sdxl = version == "sdxl_base_v1-0" or any(k.startswith("text_encoder_2.") for k in lora)
    state: dict[str, torch.Tensor] = {}
    for key, w in lora.items():
        name = kohya_name(key if not key.startswith("text_encoder") else _text_key(key), sdxl)
        state[f"{name}.lora_down.weight"] = w.A
        state[f"{name}.lora_up.weight"] = w.B
        state[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
        if w.magnitude is not None:  # DoRA, as LyCORIS writes it: [out, 1, ...] or [1, in, ...]
            state[f"{name}.dora_scale"] = w.magnitude
    linear = [w for w in lora.values() if w.A.dim() == 2 or w.A.shape[2:] == (1, 1)]
    conv = [w for w in lora.values() if w.A.dim() == 4 and w.A.shape[2:] != (1, 1)]
    ref = linear or conv
    title = str(metadata.get("name") or metadata.get("adapter") or "lora")
    header = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common([w.rank for w in ref])),
        "ss_network_alpha": str(_most_common([float(w.alpha) for w in ref])),
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args = {}
    if conv:
        args.update(conv_dim=str(_most_common([w.rank for w in conv])), conv_alpha=str(_most_common([float(w.alpha) for w in conv])))
    if any(w.magnitude is not None for w in lora.values()):
        header["ss_network_module"] = "lycoris.kohya"
        args.update(algo="lora", dora_wd="True")
    settings = metadata.get("training")
    if isinstance(settings, dict):  # (kohya writes its rank and module dropouts among the network's arguments)
        args.update({k: str(settings[k]) for k in ("rank_dropout", "module_dropout") if settings.get(k)})
    if args:
        header["ss_network_args"] = json.dumps(args)
    header.update(_training_keys(metadata))
    if metadata.get("trigger_words"):
        words = metadata["trigger_words"]
        header["modelspec.trigger_phrase"] = ", ".join(words) if isinstance(words, (list, tuple)) else str(words)
    if metadata.get("base_model"):
        header["ss_sd_model_name"] = str(metadata["base_model"])
    card = metadata.get("card") if isinstance(metadata.get("card"), dict) else {}  # (kohya's --metadata_* flags)
    header.update({f"modelspec.{k}": str(v) for k, v in card.items() if k in ("title", "author", "description", "license", "tags") and v})
    if metadata.get("comment"):
        header["ss_training_comment"] = str(metadata["comment"])
    return state, header


# kohya's ``ss_*`` training keys (what A1111's card and Civitai show of a LoRA's training) <- our training settings
_SS_SETTINGS = {"ss_learning_rate": "learning_rate", "ss_unet_lr": "learning_rate", "ss_text_encoder_lr": "text_encoder_lr",
                "ss_lr_scheduler": "lr_scheduler", "ss_lr_warmup_steps": "lr_warmup_steps", "ss_max_train_steps": "max_train_steps",
                "ss_gradient_checkpointing": "gradient_checkpointing", "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
                "ss_mixed_precision": "mixed_precision", "ss_seed": "seed", "ss_clip_skip": "clip_skip", "ss_noise_offset": "noise_offset",
                "ss_min_snr_gamma": "snr_gamma", "ss_max_grad_norm": "max_grad_norm", "ss_prior_loss_weight": "prior_loss_weight",
                "ss_cache_latents": "cache_latents", "ss_batch_size_per_device": "train_batch_size", "ss_network_dropout": "network_dropout",
                "ss_enable_bucket": "enable_bucket", "ss_flip_aug": "random_flip", "ss_color_aug": "color_aug", "ss_caption_extension": "caption_extension",
                "ss_shuffle_caption": "shuffle_caption", "ss_keep_tokens": "keep_tokens", "ss_caption_dropout_rate": "caption_dropout_rate",
                "ss_caption_tag_dropout_rate": "caption_tag_dropout_rate",
                "ss_caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
                "ss_multires_noise_iterations": "multires_noise_iterations", "ss_multires_noise_discount": "multires_noise_discount",
                "ss_ip_noise_gamma": "ip_noise_gamma", "ss_loss_type": "loss_type", "ss_huber_schedule": "huber_schedule",
                "ss_huber_c": "huber_c", "ss_huber_scale": "huber_scale", "ss_validation_split": "validation_split",
                "ss_validate_every_n_steps": "validate_every_n_steps", "ss_scale_weight_norms": "scale_weight_norms",
                "ss_debiased_estimation": "debiased_estimation_loss", "ss_zero_terminal_snr": "zero_terminal_snr",
                "ss_scale_v_pred_loss_like_noise_pred": "scale_v_pred_loss_like_noise_pred",
                "ss_max_token_length": "max_token_length", "ss_fp8_base": "fp8_base", "ss_fp8_base_unet": "fp8_base_unet"}  # fmt: skip


def _training_keys(metadata: dict) -> dict[str, str]:
    """kohya's ``ss_*`` keys of a LoRA our training wrote (its ``training`` settings and ``dataset`` summary in our
    metadata), as strings the way kohya writes them (``ss_resolution`` ``"(512, 512)"``, JSON tables)."""
    settings, dataset = metadata.get("training"), metadata.get("dataset")
    out: dict[str, str] = {}
    if isinstance(settings, dict):
        out.update({key: str(settings[name]) for key, name in _SS_SETTINGS.items() if name in settings})
        if "resolution" in settings:  # (width, height; a height of 0 is the square)
            width = settings["resolution"]
            out["ss_resolution"] = str((width, settings.get("resolution_height") or width))
        kind = "adamw8bit" if settings.get("use_8bit_adam") else settings.get("optimizer", "adamw")
        out["ss_optimizer"] = {"adamw8bit": "bitsandbytes.optim.AdamW8bit", "prodigy": "prodigyopt.prodigy.Prodigy"}.get(
            kind, "torch.optim.adamw.AdamW")
        if settings.get("optimizer_args"):  # (kohya's: "name(key=value,...)", the values as Python reads them)
            pairs = [item.partition("=") for item in str(settings["optimizer_args"]).split()]
            out["ss_optimizer"] += "(" + ",".join(f"{k}={ast.literal_eval(v)}" for k, _, v in pairs) + ")"
    if "steps" in metadata:
        out["ss_steps"] = str(metadata["steps"])
    if isinstance(dataset, dict):
        if "num_train_images" in dataset:
            out["ss_num_train_images"] = str(dataset["num_train_images"])
        for key, name in (("ss_dataset_dirs", "dirs"), ("ss_tag_frequency", "tag_frequency")):
            if isinstance(dataset.get(name), dict):
                out[key] = json.dumps(dataset[name])
    return out


def kohya_param_keys(params: dict, lora, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """Parameter deltas (``params.ParamDelta``) under kohya names, as ComfyUI writes and reads them: a bias's
    ``.diff_b``, a norm scale's (or a table's) ``.diff``, an embedding table's ``.lora_down`` / ``.lora_up`` /
    ``.alpha``; SDXL named as ``to_kohya`` names ``lora`` (with our ``metadata``)."""
    sdxl = _architecture_spec(lora, metadata)[0] == "sdxl_base_v1-0" if lora or metadata else False
    sdxl = sdxl or any(k.startswith("text_encoder_2.") for k in [*lora, *params])
    out: dict[str, torch.Tensor] = {}
    for key, d in params.items():
        module, _, which = key.rpartition(".")
        name = kohya_name(module if not module.startswith("text_encoder") else _text_key(module), sdxl)
        if d.delta is not None:
            out[f"{name}.{'diff_b' if which == 'bias' else 'diff'}"] = d.delta
        else:
            out.update({f"{name}.lora_down.weight": d.A, f"{name}.lora_up.weight": d.B,
                        f"{name}.alpha": torch.tensor(float(d.alpha), dtype=torch.float32)})
    return out


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def _text_key(key: str) -> str:
    """Text-encoder keys in kohya files always carry ``text_model.``."""
    component, _, path = key.partition(".")
    return f"{component}.{path if path.startswith('text_model.') else 'text_model.' + path}"

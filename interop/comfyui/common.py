"""Helpers shared by the checks: make our LoRA on a pipeline, run ComfyUI's LoRA loading, capture its warnings."""
from __future__ import annotations

import logging
import os
import re
import tempfile

import torch

import builders as B

# (importing builders set ComfyUI up; the imports below bind `comfy`)
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from lora_diffusion import inject_lora  # noqa: E402
from lora_diffusion.inject import lora_layers  # noqa: E402

# every file and result goes to $OUT (run_all.sh sets it); never into the repo
OUT = os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "lora_diffusion_interop", "comfyui")
os.makedirs(OUT, exist_ok=True)


class Capture(logging.Handler):
    """Collects ComfyUI's logging warnings ("lora key not loaded: ...", "NOT LOADED ...", shape mismatches)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)

    def not_loaded(self):
        return [m.split(": ", 1)[1] for m in self.records if m.startswith("lora key not loaded: ")]

    def others(self):
        return [m for m in self.records if not m.startswith("lora key not loaded: ")]


def build(kind, seed=0):
    return B.sd15_pipeline(seed) if kind == "sd15" else B.sdxl_pipeline(seed)


def text_encoders(pipe):
    out = [("text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.append(("text_encoder_2", pipe.text_encoder_2))
    return out


def make_lora(pipe, unet_targets, te_targets, rank=4, alpha=2.0, seed=123, std=0.1):
    """Inject our LoRA and give every factor random non-zero values (B is zero at init)."""
    inject_lora(pipe.unet, rank=rank, alpha=alpha, targets=unet_targets)
    for _, te in text_encoders(pipe):
        inject_lora(te, rank=rank, alpha=alpha, targets=te_targets)
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for model in [pipe.unet] + [te for _, te in text_encoders(pipe)]:
            for _, layer in lora_layers(model):
                for p in (layer.lora_A["default"], layer.lora_B["default"]):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def comfy_load(kind, pipe_base, lora_sd, strength):
    """ComfyUI's LoraLoader path (nodes.LoraLoader.load_lora -> comfy.sd.load_lora_for_models) on ComfyUI models
    holding ``pipe_base``'s weights. Returns (new ModelPatcher, new CLIP, base patcher, base clip, captured logs)."""
    patcher, diffusers_keys = B.comfy_unet_patcher(kind, pipe_base.unet)
    clip = B.comfy_clip(kind, pipe_base)
    with Capture() as cap:
        new_model, new_clip = comfy.sd.load_lora_for_models(patcher, clip, lora_sd, strength, strength)
    return new_model, new_clip, diffusers_keys, cap


def comfy_patched_state(new_model, new_clip):
    """The weights ComfyUI computes, loaded as ComfyUI loads a model before sampling / encoding
    (comfy.model_management.load_models_gpu -> ModelPatcher.load -> patch_weight_to_device ->
    comfy.lora.calculate_weight), here on the CPU "device"; then everything is unloaded again."""
    import comfy.model_management as mm
    with Capture() as cap:
        mm.load_models_gpu([new_model], force_full_load=True)
        unet = {k: v.detach().clone() for k, v in new_model.model.diffusion_model.state_dict().items()}
        new_clip.load_model()  # what CLIP.encode_from_tokens calls
        clip = {k: v.detach().clone() for k, v in new_clip.cond_stage_model.state_dict().items()}
        mm.unload_all_models()
    return unet, clip, cap.records


def full_size_key_check(kind, lora_sd):
    """comfy.lora.load_lora against the key map of ComfyUI's FULL-size model (meta device): keys not loaded."""
    model = B.comfy_unet_meta(kind)
    clip = B.comfy_clip(kind, meta=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with Capture() as cap:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map)
    return patches, cap.not_loaded()


def te_prefix_map(kind):
    """ComfyUI clip state-dict prefix -> our text encoder attribute."""
    if kind == "sd15":
        return {"clip_l.transformer.": "text_encoder"}
    return {"clip_l.transformer.": "text_encoder", "clip_g.transformer.": "text_encoder_2"}


def ours_state(pipe):
    """Our fused weights, keyed as ComfyUI's CLIP keys for the text encoders and diffusers keys for the UNet."""
    unet = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    te = {}
    for prefix, attr in te_prefix_map("sd15" if getattr(pipe, "text_encoder_2", None) is None else "sdxl").items():
        for k, v in B.clip_state_with_text_model(getattr(pipe, attr)).items():
            te[prefix + k] = v.detach().clone()
    return unet, te


def compare(ours_unet, ours_te, base_unet, base_te, comfy_unet, comfy_te, diffusers_keys):
    """Per weight: ComfyUI's delta vs ours. Returns rows (name, kind, rel_err, |delta|max, changed_ours, changed_comfy)."""
    rows = []
    ldm_of = {d: l for d, l in diffusers_keys.items()}
    for dk, ov in ours_unet.items():
        lk = ldm_of.get(dk)
        if lk is None:
            raise KeyError(dk)
        cv, bv = comfy_unet[lk], base_unet[dk]
        rows.append(_row(f"unet.{dk}  [diffusion_model.{lk}]", ov, cv, bv))
    for k, ov in ours_te.items():
        rows.append(_row(k, ov, comfy_te[k], base_te[k]))
    return rows


def _row(name, ours, comfy_w, base):
    d_ours = (ours.double() - base.double())
    d_comfy = (comfy_w.double() - base.double())
    scale = d_ours.abs().max().item()
    err = (d_ours - d_comfy).abs().max().item()
    ulp = torch.finfo(torch.float32).eps * max(ours.abs().max().item(), 1e-30)  # fp32 spacing at the weight's largest value
    return dict(name=name, shape=tuple(base.shape), delta_max=scale, abs_err=err, err_in_ulps_of_weight=err / ulp,
                rel_err=(err / scale) if scale > 0 else (0.0 if err == 0 else float("inf")),
                changed_ours=bool(scale > 0), changed_comfy=bool(d_comfy.abs().max().item() > 0))


def summarize(rows):
    changed = [r for r in rows if r["changed_ours"] or r["changed_comfy"]]
    both = [r for r in changed if r["changed_ours"] and r["changed_comfy"]]
    only_ours = [r["name"] for r in changed if r["changed_ours"] and not r["changed_comfy"]]
    only_comfy = [r["name"] for r in changed if r["changed_comfy"] and not r["changed_ours"]]
    worst = max(both, key=lambda r: r["rel_err"]) if both else None
    max_ulps = max((r["err_in_ulps_of_weight"] for r in both), default=None)
    return dict(weights_changed_ours=sum(r["changed_ours"] for r in rows),
                weights_changed_comfy=sum(r["changed_comfy"] for r in rows),
                only_ours=only_ours, only_comfy=only_comfy,
                max_rel_err=worst["rel_err"] if worst else None, worst=worst["name"] if worst else None,
                worst_abs_err=worst["abs_err"] if worst else None, worst_delta_max=worst["delta_max"] if worst else None,
                max_err_in_ulps_of_weight=max_ulps)


def pick(rows, pattern):
    return next(r for r in rows if re.search(pattern, r["name"]))

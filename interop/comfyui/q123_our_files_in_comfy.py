"""Q1-Q3: our files (save_lora kohya + diffusers) read by ComfyUI's real code.

For SD1.5- and SDXL-structured pipelines and target sets "attn" (UNet attn1/attn2 q,k,v,out; CLIP attention) and
"full" (+ ff, proj_in/out, ResNet 3x3 convs (LoCon), time_emb_proj, down/upsamplers; CLIP attention + MLP):
  * write our kohya file and our diffusers file (fp32 tensors; also the fp16 default for the key check);
  * ComfyUI: comfy.sd.load_lora_for_models (what the LoraLoader node calls) on ComfyUI models holding the same
    base weights; every "lora key not loaded" warning is captured; also against the full-size SD1.5 / SDXL key map;
  * numerics: ComfyUI's ModelPatcher.patch_model (comfy.lora.calculate_weight per weight) vs our
    load_lora(weight=s) + fuse(pipe), for every weight of UNet and text encoder(s), s = 1.0 and 0.7; plus explicit
    comfy.lora.calculate_weight calls for a Linear, a 1x1 proj_in conv (SD1.5) and a 3x3 LoCon conv.
Usage: q123_our_files_in_comfy.py [sd15] [sdxl]. Writes $OUT/q123_<kinds>.json.

Pass (kohya files, fp32 and fp16): not_loaded == 0 (small and full-size key maps), only_ours == only_comfy == []
(the same weights change on both sides), max_rel_err == 0 at strength 1.0 (bit-identical) and
max_err_in_ulps_of_weight < 1 at 0.7. Diffusers files are a known finding, not a pass: ComfyUI skips the UNet
attention keys (diffusers' PEFT names; its map holds only the old ".processor." names) and reads no alpha.
"""
from __future__ import annotations

import json
import re
import sys

import torch

import common as C
from common import comfy

from lora_diffusion import fuse, load_lora, save_lora

RESULTS = {}


def ours_fused(kind, path, strength):
    pipe = C.build(kind)
    load_lora(pipe, path, weight=strength)
    fuse(pipe)
    return C.ours_state(pipe)


def explicit_calculate_weight(kind, lora_sd, base_pipe, strength, ours_unet):
    """comfy.lora.calculate_weight on a few named layers, from the file's tensors and the base weight."""
    patcher, dk = C.B.comfy_unet_patcher(kind, base_pipe.unet)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with C.Capture():
        patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    picks = {
        "linear attn2.to_k": r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight$",
        "proj_in": r"down_blocks\.1\.attentions\.0\.proj_in\.weight$",
        "3x3 LoCon resnet conv1": r"up_blocks\.1\.resnets\.0\.conv1\.weight$",
        "3x3 downsampler": r"down_blocks\.1\.downsamplers\.0\.conv\.weight$",
    }
    base_sd = base_pipe.unet.state_dict()
    out = {}
    for label, pat in picks.items():
        dkey = next((k for k in base_sd if re.search(pat, k)), None)
        if dkey is None:
            continue
        lkey = "diffusion_model." + dk[dkey]
        if lkey not in patches:
            out[label] = {"diffusers": dkey, "ldm": lkey, "in_file": False}
            continue
        base = base_sd[dkey].detach().clone().float()
        got = comfy.lora.calculate_weight([(strength, patches[lkey], 1.0, None, None)], base.clone(), lkey)
        d_ours = ours_unet[dkey].double() - base.double()
        d_comfy = got.double() - base.double()
        scale = d_ours.abs().max().item()
        out[label] = {"diffusers": dkey, "ldm": lkey, "shape": list(base.shape), "delta_max": scale,
                      "rel_err": (d_ours - d_comfy).abs().max().item() / scale}
    return out


def run(kind, targets):
    unet_t, te_t = targets
    tag = f"{kind}_{unet_t}"
    pipe = C.build(kind)
    n_layers = C.make_lora(pipe, unet_t, te_t, rank=4, alpha=2.0)
    files = {}
    te = dict(C.text_encoders(pipe))
    for fmt in ("kohya", "diffusers"):
        p = f"{C.OUT}/{tag}_{fmt}.safetensors"
        save_lora(p, unet=pipe.unet, text_encoder=te["text_encoder"], text_encoder_2=te.get("text_encoder_2"),
                  format=fmt, dtype=torch.float32)
        files[fmt] = p
    p16 = f"{C.OUT}/{tag}_kohya_fp16.safetensors"
    save_lora(p16, unet=pipe.unet, text_encoder=te["text_encoder"], text_encoder_2=te.get("text_encoder_2"), format="kohya")
    files["kohya_fp16"] = p16
    del pipe

    res = {"lora_layers": n_layers}
    for fmt, path in files.items():
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        entry = {"file": path, "tensors": len(lora_sd),
                 "sample_keys": sorted(lora_sd)[:2] + [k for k in sorted(lora_sd) if "te2" in k or "text_encoder_2" in k][:1]}
        # full-size ComfyUI key map (meta device)
        patches_full, not_loaded_full = C.full_size_key_check(kind, lora_sd)
        entry["fullsize_patched_weights"] = len(patches_full)
        entry["fullsize_not_loaded"] = len(not_loaded_full)
        entry["fullsize_not_loaded_sample"] = not_loaded_full[:6]
        for strength in ((1.0, 0.7) if fmt != "kohya_fp16" else (1.0,)):
            base = C.build(kind)
            base_unet, base_te = C.ours_state(base)
            new_model, new_clip, dkeys, cap = C.comfy_load(kind, base, lora_sd, strength)
            comfy_unet, comfy_te, patch_logs = C.comfy_patched_state(new_model, new_clip)
            ours_unet, ours_te = ours_fused(kind, path, strength)
            rows = C.compare(ours_unet, ours_te, base_unet, base_te, comfy_unet, comfy_te, dkeys)
            s = C.summarize(rows)
            s["not_loaded"] = len(cap.not_loaded())
            s["not_loaded_sample"] = cap.not_loaded()[:6]
            s["other_warnings"] = cap.others()[:6] + patch_logs[:6]
            if fmt == "kohya":
                s["explicit_calculate_weight"] = explicit_calculate_weight(kind, lora_sd, base, strength, ours_unet)
            entry[f"strength_{strength}"] = s
            print(f"[{tag} {fmt} s={strength}] changed ours={s['weights_changed_ours']} comfy={s['weights_changed_comfy']} "
                  f"not_loaded={s['not_loaded']} only_ours={len(s['only_ours'])} only_comfy={len(s['only_comfy'])} "
                  f"max_rel_err={s['max_rel_err']} max_ulps={s['max_err_in_ulps_of_weight']}", flush=True)
        res[fmt] = entry
    RESULTS[tag] = res


if __name__ == "__main__":
    kinds = sys.argv[1:] or ["sd15", "sdxl"]
    for kind in kinds:
        for targets in (("attn", "attn"), ("full", "full")):
            run(kind, targets)
    out = f"{C.OUT}/q123_{'_'.join(kinds)}.json"
    with open(out, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    print("wrote", out)

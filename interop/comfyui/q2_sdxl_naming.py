"""Q2 (naming): ComfyUI reads SDXL kohya UNet keys in both styles, SGM (`lora_unet_input_blocks_4_1_...`, what
ours and kohya's SDXL trainer write) and diffusers (`lora_unet_down_blocks_1_attentions_0_...`); our loader reads
both too. Takes q123's $OUT/sdxl_full_kohya.safetensors (run q123 sdxl first), writes the diffusers-named twin.
Writes $OUT/q2_naming.json.

Pass: not_loaded 0 for both namings (small and full-size key maps), comfy_same_target_weights,
comfy_same_factors_per_weight and ours_same_fused_weights all true.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import common as C
from common import comfy
from lora_diffusion import fuse, load_lora
from lora_diffusion.formats_kohya import module_path_from_kohya

SRC = f"{C.OUT}/sdxl_full_kohya.safetensors"
DST = f"{C.OUT}/sdxl_full_kohya_diffusers_names.safetensors"

sd = load_file(SRC)
renamed = {}
for k, v in sd.items():
    name, _, suffix = k.partition(".")
    if name.startswith("lora_unet_"):
        comp, path = module_path_from_kohya(name)  # SGM -> diffusers path (our mapping)
        name = "lora_unet_" + path.replace(".", "_")
    renamed[f"{name}.{suffix}"] = v
save_file(renamed, DST, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
n_unet = len({k.split(".")[0] for k in renamed if k.startswith("lora_unet_")})
print("diffusers-named sample:", sorted(k for k in renamed if k.startswith("lora_unet_down_blocks_1_attentions"))[:1])

out = {}
base = C.build("sdxl")
patcher, dkeys = C.B.comfy_unet_patcher("sdxl", base.unet)
clip = C.B.comfy_clip("sdxl", base)
key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
patches = {}
for label, path in (("sgm", SRC), ("diffusers", DST)):
    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    with C.Capture() as cap:
        patches[label] = comfy.lora.load_lora(lora_sd, key_map)
    _, nl_full = C.full_size_key_check("sdxl", lora_sd)
    out[label] = {"not_loaded_small": len(cap.not_loaded()), "not_loaded_fullsize": len(nl_full),
                  "patched_weights": len(patches[label])}
same_targets = set(patches["sgm"]) == set(patches["diffusers"])
same_tensors = all(torch.equal(patches["sgm"][k].weights[0], patches["diffusers"][k].weights[0]) and
                   torch.equal(patches["sgm"][k].weights[1], patches["diffusers"][k].weights[1]) for k in patches["sgm"])
out["comfy_same_target_weights"] = same_targets
out["comfy_same_factors_per_weight"] = same_tensors

# ours: both files fuse to the same weights
states = []
for path in (SRC, DST):
    pipe = C.build("sdxl")
    load_lora(pipe, path)
    fuse(pipe)
    states.append(C.ours_state(pipe))
out["ours_same_fused_weights"] = all(torch.equal(states[0][0][k], states[1][0][k]) for k in states[0][0]) and \
    all(torch.equal(states[0][1][k], states[1][1][k]) for k in states[0][1])
out["unet_modules"] = n_unet
print(json.dumps(out, indent=1))
json.dump(out, open(f"{C.OUT}/q2_naming.json", "w"), indent=1)

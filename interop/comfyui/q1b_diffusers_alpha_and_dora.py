"""Q1 follow-ups.
(a) our diffusers-format file with alpha == rank: which keys ComfyUI skips, and whether the keys it takes match
    (isolates the alpha effect seen in q123, where alpha = 2, rank = 4);
(b) the diffusers-style UNet names ComfyUI's key map holds for one attention weight (comfy/lora.py:196-201);
(c) bonus: our DoRA kohya file (.dora_scale) in ComfyUI (weight_decompose), strength 1.0 and 0.7.
Writes $OUT/q1b.json.

Expected (findings, not failures of ours): (a) max_rel_err == 0 on the weights ComfyUI takes, but not_loaded > 0
(every UNet attention key); (b) no "unet.<diffusers path>.to_q" form without ".processor." in the list;
(c) ComfyUI's DoRA weights differ from ours by O(1) of the delta (see q1c for which formula is whose).
"""
from __future__ import annotations

import json

import torch

import common as C
from common import comfy
from lora_diffusion import fuse, inject_lora, load_lora, save_lora
from lora_diffusion.inject import lora_layers

out = {}


def check(kind, path, strengths=(1.0, 0.7)):
    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    res = {}
    for s in strengths:
        base = C.build(kind)
        bu, bt = C.ours_state(base)
        nm, nc, dk, cap = C.comfy_load(kind, base, lora_sd, s)
        cu, ct, logs = C.comfy_patched_state(nm, nc)
        pipe = C.build(kind)
        load_lora(pipe, path, weight=s)
        fuse(pipe)
        ou, ot = C.ours_state(pipe)
        sm = C.summarize(C.compare(ou, ot, bu, bt, cu, ct, dk))
        sm["not_loaded"] = len(cap.not_loaded())
        sm["not_loaded_sample"] = cap.not_loaded()[:4]
        sm["warnings"] = (cap.others() + logs)[:4]
        sm.pop("only_ours"), sm.pop("only_comfy")
        res[str(s)] = sm
        print(path.split("/")[-1], s, json.dumps(sm), flush=True)
    return res


# (a)
pipe = C.build("sd15")
C.make_lora(pipe, "full", "full", rank=4, alpha=4.0)
p = f"{C.OUT}/sd15_full_alpha_eq_rank_diffusers.safetensors"
save_lora(p, unet=pipe.unet, text_encoder=pipe.text_encoder, dtype=torch.float32)
out["a_diffusers_alpha_eq_rank"] = check("sd15", p, (1.0,))

# (b)
patcher, dk = C.B.comfy_unet_patcher("sd15", C.build("sd15").unet)
km = comfy.lora.model_lora_keys_unet(patcher.model, {})
target = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
out["b_keys_for_" + target] = sorted(k for k, v in km.items() if v == target)
print(out["b_keys_for_" + target])

# (c) DoRA
pipe = C.build("sd15")
inject_lora(pipe.unet, rank=4, alpha=2.0, use_dora=True)
inject_lora(pipe.text_encoder, rank=4, alpha=2.0, use_dora=True)
g = torch.Generator().manual_seed(5)
with torch.no_grad():
    for m in (pipe.unet, pipe.text_encoder):
        for _, layer in lora_layers(m):
            for t in (layer.lora_A["default"], layer.lora_B["default"]):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            mag = layer.lora_magnitude["default"]
            mag.mul_(1 + 0.2 * torch.rand(mag.shape, generator=g))
p = f"{C.OUT}/sd15_attn_dora_kohya.safetensors"
save_lora(p, unet=pipe.unet, text_encoder=pipe.text_encoder, format="kohya", dtype=torch.float32)
out["c_dora_kohya"] = check("sd15", p)
json.dump(out, open(f"{C.OUT}/q1b.json", "w"), indent=1, default=str)

"""Q4 follow-up: ComfyUI's CLIP-L has a text_projection that SD1.5 / SDXL checkpoints lack; ComfyUI leaves it
uninitialised (comfy.ops layers skip init; comfy/sd.py:1236 filters the "clip missing" warning), and
"Extract and Save Lora" writes a LoRA for every 2-D weight, that one included: its factors are then the SVD of
(garbage_B - garbage_A). What happens to such files in ComfyUI and in our loader?

Part A: the faithful run (uninitialised memory, whatever it holds on this machine).
Part B: deterministic stand-ins, from q4's clean file (run q4 sd15 first): the text_projection factors replaced by
(i) finite non-zero values, (ii) values holding a NaN.
Writes $OUT/q4b.json.

Finding (repro): A's text_projection factors are not finite (or garbage) and ComfyUI applies them
(comfy.text_projection_patched_finite false). Pass for us: load_lora never applies that projection: before
lora_diffusion b0416d6 it refused the file (LoraFormatError); since, it skips the key with a warning ("loaded",
strict or not, NaN included).
"""
from __future__ import annotations

import glob
import json

import torch
from safetensors.torch import load_file, save_file

import common as C
from common import comfy
import q4_comfy_files_in_ours as Q4
from lora_diffusion import load_lora

TP = "text_encoders.clip_l.transformer.text_projection"


def try_ours(path, strict):
    pipe = C.build("sd15")
    try:
        load_lora(pipe, path, strict=strict)
        return "loaded"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"


def try_comfy(path):
    base = C.build("sd15")
    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    new_model, new_clip, _, cap = C.comfy_load("sd15", base, lora_sd, 1.0)
    _, te, logs = C.comfy_patched_state(new_model, new_clip)
    w = te["clip_l.transformer.text_projection.weight"]
    return {"not_loaded": len(cap.not_loaded()), "warnings": (cap.others() + logs)[:3],
            "text_projection_patched_finite": bool(torch.isfinite(w).all())}


def describe(sd):
    up, down = sd[f"{TP}.lora_up.weight"].float(), sd[f"{TP}.lora_down.weight"].float()
    return {"finite": bool(torch.isfinite(up).all() and torch.isfinite(down).all()),
            "nonzero": bool(up.abs().sum() > 0 and down.abs().sum() > 0),
            "max_abs": float(torch.nan_to_num(torch.cat([up.flatten(), down.flatten()])).abs().max())}


out = {}
path, _, _ = Q4.extract("sd15", zero_missing=False, tag="_uninit")
sd = load_file(path)
out["A_faithful"] = {"file": path, "text_projection_factors": describe(sd), "ours_strict": try_ours(path, True),
                     "ours_non_strict": try_ours(path, False), "comfy": try_comfy(path)}
print(json.dumps(out["A_faithful"], indent=1), flush=True)

clean = sorted(glob.glob(f"{C.OUT}/comfy_lorasave/q4_sd15_0*.safetensors"))[-1]
sd = load_file(clean)
g = torch.Generator().manual_seed(0)
for label, fill in (("B_finite_garbage", lambda t: torch.randn(t.shape, generator=g).to(t.dtype)),
                    ("B_nan_garbage", lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype))):
    sd2 = dict(sd)
    for s in ("lora_up.weight", "lora_down.weight"):
        sd2[f"{TP}.{s}"] = fill(sd[f"{TP}.{s}"])
    p = f"{C.OUT}/q4b_{label}.safetensors"
    save_file(sd2, p)
    out[label] = {"file": p, "text_projection_factors": describe(sd2), "ours_strict": try_ours(p, True),
                  "ours_non_strict": try_ours(p, False), "comfy": try_comfy(p)}
    print(label, json.dumps(out[label], indent=1), flush=True)
json.dump(out, open(f"{C.OUT}/q4b.json", "w"), indent=1)

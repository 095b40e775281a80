"""Which DoRA formula each side applies, on one layer of q1b's DoRA kohya file (run q1b first):
  DoRA / PEFT / LyCORIS:  W' = m * (W + s*B@A) / ||W + s*B@A||_row      (norm of the MERGED weight)
  candidate "base norm":  W' = m * (W + s*B@A) / ||W||_row              (norm of the BASE weight)
ComfyUI = comfy.lora.calculate_weight (-> comfy/weight_adapter/base.py weight_decompose); ours = load_lora + fuse.
Also the same through a non-square Linear with an input-axis (LyCORIS wd_on_out=False) scale, to show ComfyUI's
other branch uses the merged weight. Writes $OUT/q1c.json.

Finding (repro): ours_vs_DoRA(merged-norm) ~ 1e-6 (ours is DoRA), comfy_vs_base-norm ~ 1e-6 while
comfy_vs_DoRA(merged-norm) is O(0.1-1): ComfyUI divides by the base weight's row norm on the per-output-row path;
input_axis_comfy_vs_DoRA(merged-norm) ~ 1e-6 (its other branch uses the merged weight)."""
import json
import torch
from safetensors.torch import load_file
import common as C
from common import comfy
from lora_diffusion import fuse, load_lora

path = f"{C.OUT}/sd15_attn_dora_kohya.safetensors"
sd = load_file(path)
name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
dkey = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
A, B = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
m, alpha = sd[f"{name}.dora_scale"].double(), sd[f"{name}.alpha"].item()
s = alpha / A.shape[0]
base = C.build("sd15")
W = base.unet.state_dict()[dkey].double()
V = W + s * B @ A
dora = m * V / V.norm(dim=1, keepdim=True)
basenorm = m * V / W.norm(dim=1, keepdim=True)

lora = {f"x.{k}": v for k, v in [("lora_down.weight", sd[f"{name}.lora_down.weight"]), ("lora_up.weight", sd[f"{name}.lora_up.weight"]),
                                 ("alpha", sd[f"{name}.alpha"]), ("dora_scale", sd[f"{name}.dora_scale"])]}
patches = comfy.lora.load_lora(lora, {"x": "k"}, log_missing=True)
comfy_w = comfy.lora.calculate_weight([(1.0, patches["k"], 1.0, None, None)], W.float().clone(), "k").double()
pipe = C.build("sd15")
load_lora(pipe, path)
fuse(pipe)
ours = pipe.unet.state_dict()[dkey].double()
rel = lambda x, y: ((x - y).abs().max() / (dora - W).abs().max()).item()
out = {"layer": dkey, "dora_scale_shape": list(m.shape),
       "ours_vs_DoRA(merged-norm)": rel(ours, dora), "ours_vs_base-norm": rel(ours, basenorm),
       "comfy_vs_DoRA(merged-norm)": rel(comfy_w, dora), "comfy_vs_base-norm": rel(comfy_w, basenorm)}

# input-axis scale on a non-square weight: ComfyUI's other branch
g = torch.Generator().manual_seed(1)
W2 = torch.randn(6, 10, generator=g, dtype=torch.float64) * 0.1
A2, B2 = torch.randn(2, 10, generator=g, dtype=torch.float64) * 0.1, torch.randn(6, 2, generator=g, dtype=torch.float64) * 0.1
V2 = W2 + B2 @ A2
m_in = (W2.norm(dim=0, keepdim=True) * 1.1)
lora2 = {"y.lora_down.weight": A2.float(), "y.lora_up.weight": B2.float(), "y.alpha": torch.tensor(2.0), "y.dora_scale": m_in.float()}
p2 = comfy.lora.load_lora(lora2, {"y": "k2"})
c2 = comfy.lora.calculate_weight([(1.0, p2["k2"], 1.0, None, None)], W2.float().clone(), "k2").double()
d2 = m_in * V2 / V2.norm(dim=0, keepdim=True)
out["input_axis_comfy_vs_DoRA(merged-norm)"] = ((c2 - d2).abs().max() / (d2 - W2).abs().max()).item()
print(json.dumps(out, indent=1))
json.dump(out, open(f"{C.OUT}/q1c.json", "w"), indent=1)

"""Q2, our side: inject our LoRA (targets attn | full) into the SD1.5-sized diffusers UNet + CLIP-L (base weights as
kohya's), random factors, alpha != rank; save_lora(format="kohya") (default fp16); then reload that file with
load_lora and record unfused outputs, fuse, and the fused weights of every wrapped layer for q2_kohya.py.
Usage: q2_ours.py attn|full  (either interpreter; the files are tagged <targets>_tf<transformers version>)"""
import sys

import torch
import transformers
from safetensors.torch import save_file, load_file

from common import WORK, inputs, sd15_pipeline
from lora_diffusion import fuse, inject_lora, load_lora, save_lora
from lora_diffusion.formats import with_text_model
from lora_diffusion.inject import lora_layers, remove_lora

targets = sys.argv[1]
tag = f"{targets}_tf{transformers.__version__.replace('.', '')}"
torch.manual_seed(20)
pipe = sd15_pipeline()
inject_lora(pipe.unet, rank=8, alpha=3, targets=targets)
inject_lora(pipe.text_encoder, rank=4, alpha=10, targets=targets)
with torch.no_grad():
    for m in (pipe.unet, pipe.text_encoder):
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["default"], std=0.05)
path = WORK / f"ours_{tag}.safetensors"
save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder, format="kohya", metadata={"name": f"ours_{targets}"})
remove_lora(pipe.unet), remove_lora(pipe.text_encoder)

x, t, ctx, ids = inputs()


@torch.no_grad()
def outs():
    return pipe.unet(x, t, ctx).sample, pipe.text_encoder(ids).last_hidden_state


res = {}
res["base_unet"], res["base_te"] = outs()
name = load_lora(pipe, path, strict=True)
paths = [("unet", p) for p, _ in lora_layers(pipe.unet)] + [("te", with_text_model(p)) for p, _ in lora_layers(pipe.text_encoder)]
res["lora1_unet"], res["lora1_te"] = outs()
fuse(pipe)
res["fused_unet"], res["fused_te"] = outs()
fused = {}
for comp, p in paths:
    model = pipe.unet if comp == "unet" else pipe.text_encoder
    own = p if p in dict(model.named_modules()) else p.removeprefix("text_model.")
    fused[f"{comp}.{p}"] = model.get_submodule(own).weight.detach().contiguous()
save_file(fused, WORK / f"ours_{tag}_fused.safetensors")
save_file({k: v.contiguous() for k, v in res.items()}, WORK / f"ours_{tag}_outputs.safetensors")
n = len(load_file(path))
print(f"[{tag}] wrote {path.name}: {n} keys, {len(paths)} modules ({sum(c == 'unet' for c, _ in paths)} UNet, "
      f"{sum(c == 'te' for c, _ in paths)} text encoder); fused weights and outputs saved")

"""Q2, kohya side: load our kohya-format file (q2_ours.py) the way kohya's gen_img.py does
(create_network_from_weights -> apply_to -> load_state_dict(weights_sd, False), l.1911-1924) and merge it
(merge_to, l.1938); report unexpected / missing keys and modules; compare outputs and merged weights with ours.
Usage: q2_kohya.py <tag, e.g. attn_tf5230>   (after q2_ours.py; old-transformers interpreter)
Pass: missing 0, unexpected 0, no file module without a kohya layer, 0 only-ours / only-kohya layers; outputs and
merged weights agree to fp32 rounding (today: <= ~1e-5 of the effect, merged weights ~1e-6)."""
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kohya_shim as K
from common import WORK, inputs, rel

tag = sys.argv[1]
L = K.kohya_lora
path = WORK / f"ours_{tag}.safetensors"
ours = load_file(WORK / f"ours_{tag}_outputs.safetensors")
unet, te = K.base_models()
x, t, ctx, ids = inputs()
with safe_open(str(path), "pt") as f:
    header = f.metadata()
print(f"[{tag}] header: " + ", ".join(f"{k}={header[k]}" for k in sorted(header) if k.startswith("ss_")))


@torch.no_grad()
def outs():
    return unet(x, t, ctx).sample, te(ids).last_hidden_state


base = dict(zip(("unet", "te"), outs()))
K.reset_targets()
net, wsd = L.create_network_from_weights(1.0, str(path), None, te, unet, for_inference=False)
file_modules = {k.split(".")[0] for k in wsd}
made = {lora.lora_name for lora in net.text_encoder_loras + net.unet_loras}
net.apply_to(te, unet)
info = net.load_state_dict(wsd, strict=False)
print(f"  file {len(wsd)} keys / {len(file_modules)} modules; kohya built {len(made)} modules "
      f"({len(net.text_encoder_loras)} te, {len(net.unet_loras)} unet); load_state_dict: missing {len(info.missing_keys)}, "
      f"unexpected {len(info.unexpected_keys)} {info.unexpected_keys[:4]}; file modules kohya has no layer for: "
      f"{sorted(file_modules - made)[:6]}")
lora1 = dict(zip(("unet", "te"), outs()))
K.unapply(unet), K.unapply(te)
del net
for comp in ("unet", "te"):
    eff = lora1[comp] - base[comp]
    print(f"  {comp:<4} kohya applied vs ours unfused: effects max|diff|/max|effect| = "
          f"{rel(eff, ours['lora1_' + comp] - ours['base_' + comp], eff):.2e} (effect max {eff.abs().max():.3g})")

names = {id(m): ("unet", n) for n, m in unet.named_modules()} | {id(m): ("te", n) for n, m in te.named_modules()}
K.reset_targets()
net, wsd = L.create_network_from_weights(1.0, str(path), None, te, unet, for_inference=True)
mods = [names[id(lora.org_module)] for lora in net.text_encoder_loras + net.unet_loras]
net.merge_to(te, unet, wsd, torch.float32, "cpu")
merged = dict(zip(("unet", "te"), outs()))
for comp in ("unet", "te"):
    eff = merged[comp] - base[comp]
    print(f"  {comp:<4} kohya merge_to vs ours fuse outputs: effects max|diff|/max|effect| = "
          f"{rel(eff, ours['fused_' + comp] - ours['base_' + comp], eff):.2e}")
worst, worst_layer, n = 0.0, None, 0
with safe_open(str(WORK / f"ours_{tag}_fused.safetensors"), "pt") as fo, safe_open(str(WORK / "base_unet.safetensors"), "pt") as fu, \
        safe_open(str(WORK / "base_te.safetensors"), "pt") as ft:
    ours_keys = set(fo.keys())
    kohya_keys = {f"{c}.{p}" for c, p in mods}
    for key in sorted(ours_keys & kohya_keys):
        comp, p = key.split(".", 1)
        kw = (unet if comp == "unet" else te).get_submodule(p).weight.detach()
        bw = (fu if comp == "unet" else ft).get_tensor(p + ".weight")
        r = float((fo.get_tensor(key) - kw).abs().max()) / float((kw - bw).abs().max())
        n += 1
        if r > worst:
            worst, worst_layer = r, key
print(f"  merged weights: {n} layers compared (ours fused {len(ours_keys)}, kohya merged {len(kohya_keys)}, "
      f"only ours {len(ours_keys - kohya_keys)}, only kohya {len(kohya_keys - ours_keys)}); "
      f"worst max|ours-kohya|/max|delta| = {worst:.2e} ({worst_layer})")

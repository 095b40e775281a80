"""Q1, kohya side: kohya's LoRA network on kohya's SD1.5 UNet + CLIP-L, random lora_up/lora_down and per-module
alphas != dim, saved with kohya's save_weights (fp16, as --save_precision fp16); then the reference numbers kohya
itself computes from that file: outputs with the network applied (multiplier 1 and 0.5), merge_to weights and
the merged model's outputs.  Usage: q1_kohya.py lora|locon (after make_base.py; old-transformers interpreter).
Writes $OUT/kohya_<v>.safetensors, kohya_<v>_merged.safetensors, kohya_<v>_outputs.safetensors for q1_ours.py.
Pass: "kohya's own reload: missing 0 unexpected 0" (the reference itself is sound)."""
import random
import sys

import torch
from safetensors.torch import load_file, save_file

import kohya_shim as K
from common import WORK, inputs

variant = sys.argv[1]
L = K.kohya_lora
torch.manual_seed(10)
random.seed(10)

unet, te = K.base_models()
x, t, ctx, ids = inputs()


@torch.no_grad()
def outs():
    return unet(x, t, ctx).sample, te(ids).last_hidden_state


# 1. train-time network (create_network: kohya's default targets; conv_dim adds ResNets / down/upsamplers 3x3)
K.reset_targets()
kw = dict(conv_dim="4", conv_alpha="1") if variant == "locon" else {}
net = L.create_network(1.0, 8, 4.0, None, te, unet, **kw)
alphas = [0.5, 1.0, 2.0, 3.0, 5.0, 6.0, 12.0, 16.0]
with torch.no_grad():
    for lora in net.text_encoder_loras + net.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.05)
        lora.lora_down.weight.mul_(random.choice([0.5, 1.0, 2.0]))
        lora.alpha.fill_(random.choice([a for a in alphas if a != lora.lora_dim]))
n_te, n_unet = len(net.text_encoder_loras), len(net.unet_loras)
kinds = {"linear": 0, "conv1x1": 0, "conv3x3": 0}
for lora in net.unet_loras + net.text_encoder_loras:
    w = lora.lora_down.weight
    kinds["linear" if w.dim() == 2 else "conv1x1" if w.shape[2:] == (1, 1) else "conv3x3"] += 1
path = WORK / f"kohya_{variant}.safetensors"
net.apply_to(te, unet)  # as train_network.py does: apply_to registers the modules (add_module) save_weights saves
net.save_weights(str(path), torch.float16, {"ss_network_module": "networks.lora", "ss_network_dim": "8",
                                             "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1"})
K.unapply(unet), K.unapply(te)
del net
sd = load_file(path)
print(f"[{variant}] kohya network: {n_te} text-encoder + {n_unet} UNet modules {kinds}; file {path.name}: {len(sd)} keys")
print("  sample keys:", sorted(sd)[:2], [k for k in sorted(sd) if k.startswith("lora_te")][:1])

ref = {}
ref["base_unet"], ref["base_te"] = outs()

# 2. inference as kohya does it from the file: create_network_from_weights + load_state_dict + apply_to
K.reset_targets()
net, wsd = L.create_network_from_weights(1.0, str(path), None, te, unet, for_inference=False)
net.apply_to(te, unet)  # gen_img.py l.1923-1924: apply_to, then load_state_dict(weights_sd, False)
info = net.load_state_dict(wsd, strict=False)
print(f"  kohya's own reload: missing {len(info.missing_keys)} unexpected {len(info.unexpected_keys)}")
ref["lora1_unet"], ref["lora1_te"] = outs()
net.set_multiplier(0.5)
ref["lora05_unet"], ref["lora05_te"] = outs()
K.unapply(unet), K.unapply(te)
del net

# 3. merge_to (LoRAInfModule.merge_to: W + multiplier * (up @ down) * scale, fp32)
names = {id(m): ("unet", n) for n, m in unet.named_modules()} | {id(m): ("te", n) for n, m in te.named_modules()}
K.reset_targets()
net, wsd = L.create_network_from_weights(1.0, str(path), None, te, unet, for_inference=True)
mods = [names[id(lora.org_module)] for lora in net.text_encoder_loras + net.unet_loras]
net.merge_to(te, unet, wsd, torch.float32, "cpu")
ref["merged_unet"], ref["merged_te"] = outs()
merged = {}
for comp, n in mods:
    merged[f"{comp}.{n}"] = (unet if comp == "unet" else te).get_submodule(n).weight.detach().contiguous()
save_file(merged, WORK / f"kohya_{variant}_merged.safetensors")
save_file({k: v.contiguous() for k, v in ref.items()}, WORK / f"kohya_{variant}_outputs.safetensors")
print(f"  merged {len(merged)} layers; outputs saved")

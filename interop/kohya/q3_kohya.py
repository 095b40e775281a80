"""Q3, kohya side (key level, meta device): kohya's SDXL LoRA network (networks/lora.py on
library/sdxl_original_unet.SdxlUNet2DConditionModel + CLIP-L + CLIP-G (CLIPTextModelWithProjection)), default
targets and with conv_dim (LoCon). Writes, per variant:
  $OUT/kohya_sdxl_<v>.safetensors      every key kohya's save_weights would write, random tensors of the right shapes
  $OUT/kohya_sdxl_<v>_expect.json      lora name -> the diffusers module kohya itself says it is
                                       (UNet: its own SGM->diffusers map, library/sdxl_model_util.py
                                       convert_sdxl_unet_state_dict_to_diffusers; text encoders: the same path)
  $OUT/kohya_sdxl_shapes.json          lora name -> (down shape, up shape) of the LoCon network (for q3_ours.py)
Old-transformers interpreter. No pass criterion of its own: the reference for q3_ours.py."""
import json
import random

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import kohya_shim as K
from common import CLIP_L, WORK
from library import sdxl_model_util

CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

with torch.device("meta"):
    unet = K.sdxl_original_unet.SdxlUNet2DConditionModel()
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
print(f"kohya SDXL UNet: {sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B params (meta)")
names = {id(m): ("unet", n) for n, m in unet.named_modules()} | {id(m): ("text_encoder", n) for n, m in te1.named_modules()} \
    | {id(m): ("text_encoder_2", n) for n, m in te2.named_modules()}
shapes_all = {}
for variant, kw in (("lora", {}), ("locon", dict(conv_dim="4", conv_alpha="2"))):
    K.reset_targets()
    with torch.device("meta"):
        net = K.kohya_lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, **kw)
    g = torch.Generator().manual_seed(0)
    sd, expect = {}, {}
    for lora in net.text_encoder_loras + net.unet_loras:
        comp, path = names[id(lora.org_module)]
        if comp == "unet":
            conv = sdxl_model_util.convert_sdxl_unet_state_dict_to_diffusers({path + ".weight": None})
            (dpath,) = conv
            dpath = dpath[: -len(".weight")]
        else:
            dpath = path
        expect[lora.lora_name] = [comp, dpath, path]
        down, up = tuple(lora.lora_down.weight.shape), tuple(lora.lora_up.weight.shape)
        shapes_all[lora.lora_name] = [down, up]
        sd[lora.lora_name + ".lora_down.weight"] = torch.randn(down, generator=g).half()
        sd[lora.lora_name + ".lora_up.weight"] = torch.randn(up, generator=g).half()
        sd[lora.lora_name + ".alpha"] = torch.tensor(float(random.choice([1, 2, 8])), dtype=torch.float16)
    save_file(sd, WORK / f"kohya_sdxl_{variant}.safetensors")
    (WORK / f"kohya_sdxl_{variant}_expect.json").write_text(json.dumps(expect, indent=0))
    unet_names = [n for n in expect if n.startswith("lora_unet_")]
    print(f"[{variant}] kohya SDXL network: {len(net.text_encoder_loras)} te modules "
          f"({sum(n.startswith('lora_te1_') for n in expect)} te1, {sum(n.startswith('lora_te2_') for n in expect)} te2), "
          f"{len(net.unet_loras)} UNet modules; {len(sd)} keys; e.g. {unet_names[0]}, {[n for n in expect if n.startswith('lora_te2_')][0]}")
    del net
(WORK / "kohya_sdxl_shapes.json").write_text(json.dumps(shapes_all))

"""Q3, would kohya's SDXL network load what our writer writes? For each key list q3_ours.py wrote
($OUT/ours_sdxl_*.keys.json), tensors of the real SDXL shapes (kohya's own network's, $OUT/kohya_sdxl_shapes.json)
are fed to kohya's create_network_from_weights (which first runs convert_diffusers_to_sai_if_needed on
diffusers-named UNet keys, networks/lora.py l.758-802), apply_to and load_state_dict(strict=False), as gen_img.py
does (l.1911-1924), on meta-device SDXL models. Old-transformers interpreter.
Pass: for every key list "0 names are not kohya SDXL modules", load_state_dict missing 0 unexpected 0."""
import json
import warnings

warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import kohya_shim as K
from common import CLIP_L, WORK

CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
shapes = json.loads((WORK / "kohya_sdxl_shapes.json").read_text())
for f in sorted(WORK.glob("ours_sdxl_*.keys.json")):
    keys = json.loads(f.read_text())
    # the names kohya will use after its own diffusers->SAI conversion (values are not looked at)
    probe = {k: None for k in keys}
    try:
        K.kohya_lora.convert_diffusers_to_sai_if_needed(probe)
    except Exception as e:
        print(f"[{f.name}] convert_diffusers_to_sai_if_needed raised {type(e).__name__}: {e}")
        continue
    sd, no_shape = {}, set()
    for k in probe:
        name, _, what = k.partition(".")
        if name not in shapes:
            no_shape.add(name)
            continue
        down, up = shapes[name]
        sd[k] = torch.tensor(1.0) if what == "alpha" else torch.zeros(down if "down" in what else up)
    with torch.device("meta"):
        unet = K.sdxl_original_unet.SdxlUNet2DConditionModel()
        te1, te2 = CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    K.reset_targets()
    with torch.device("meta"):
        net, wsd = K.kohya_lora.create_network_from_weights(1.0, None, None, [te1, te2], unet, weights_sd=sd)
    net.apply_to([te1, te2], unet)
    info = net.load_state_dict(wsd, strict=False)
    print(f"[{f.name}] {len(keys)} keys / {len({k.split('.')[0] for k in keys})} modules; after kohya's conversion "
          f"{len(no_shape)} names are not kohya SDXL modules {sorted(no_shape)[:2]}; kohya built "
          f"{len(net.text_encoder_loras)} te + {len(net.unet_loras)} unet modules; load_state_dict missing "
          f"{len(info.missing_keys)} unexpected {len(info.unexpected_keys)}")

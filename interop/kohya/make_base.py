"""Base weights shared by every check: kohya's own SD1.5 UNet (library/original_unet.py, seed 0) and a CLIP-L
text encoder (seed 1), fp32, saved once to $OUT/base_unet.safetensors and $OUT/base_te.safetensors."""
import torch
from safetensors.torch import save_file

import kohya_shim as K
from common import WORK, clip_l

if not (WORK / "base_unet.safetensors").exists():
    torch.manual_seed(0)
    unet = K.original_unet.UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, WORK / "base_unet.safetensors")
    del unet
if not (WORK / "base_te.safetensors").exists():
    te = clip_l()
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, WORK / "base_te.safetensors")
print("base weights in", WORK)

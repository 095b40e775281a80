"""Sanity check of the LDM/SGM module names used as A1111's model: diffusers' own single-file converter
(convert_ldm_unet_checkpoint, independent of lora_diffusion) maps our original-layout UNet keys
(lora_diffusion.tools.to_ldm_checkpoint) back to exactly the diffusers UNet state dict.

Pass: for sd15 and sdxl, the same key set and every tensor torch.equal."""
import sys

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

import models
from lora_diffusion.tools import to_ldm_checkpoint

ok = True
for name, f in (("sd15", models.sd15_pipeline), ("sdxl", models.sdxl_pipeline)):
    p = f()
    st = to_ldm_checkpoint(p)
    back = convert_ldm_unet_checkpoint(st, dict(p.unet.config))
    ref = p.unet.state_dict()
    same = set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    ok &= same
    print(f"{'PASS' if same else 'FAIL'} check_ldm_names {name}: diffusers' LDM->diffusers UNet conversion "
          f"round-trips our LDM names: {same} ({len(ref)} tensors)")
sys.exit(0 if ok else 1)

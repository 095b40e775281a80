"""Shared shapes, inputs and helpers (no kohya imports here: usable from an interpreter without sd-scripts'
dependencies too). Every file goes to $OUT (run_all.sh sets it), never into the repo."""
import os
import tempfile
from pathlib import Path

import torch

WORK = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "lora_diffusion_interop" / "kohya")
WORK.mkdir(parents=True, exist_ok=True)

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 4, 32, 32, generator=g)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, 768, generator=g)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    return x, t, ctx, ids


def clip_l(seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()


def load_te_state(te, sd):
    """Base text-encoder weights saved with transformers <5.6 names (text_model.*) into this CLIPTextModel."""
    own = te.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = te.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)


def rel(a, b, ref):
    """max|a-b| / max|ref| (ref: the LoRA's effect)."""
    return float((a.double() - b.double()).abs().max() / ref.double().abs().max())


def sd15_pipeline():
    """A diffusers StableDiffusionPipeline with an SD1.5-sized UNet and CLIP-L carrying the base weights kohya's
    models carry ($OUT/base_*.safetensors: kohya's original_unet state dict loads into diffusers' UNet as is);
    VAE / tokenizer / scheduler: lora_diffusion.testing's tiny ones (never run here)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from lora_diffusion.testing import tiny_components

    parts = tiny_components(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    missing, unexpected = unet.load_state_dict(load_file(WORK / "base_unet.safetensors"), assign=True, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    te = clip_l()
    load_te_state(te, load_file(WORK / "base_te.safetensors"))
    parts.update(unet=unet.eval(), text_encoder=te)
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

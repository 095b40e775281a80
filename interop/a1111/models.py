"""Helper, no check of its own: small SD1.5- and SDXL-structured diffusers pipelines (real module names, small
widths: SD1.5 4 levels 32/32/64/64, CLIP 12 layers x 32; SDXL 3 levels, CLIP-L + OpenCLIP-style te2), built offline."""
import copy
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from lora_diffusion.testing import tiny_components


def sd15_pipeline(seed=0):
    parts = tiny_components(seed)
    tok = parts["tokenizer"]
    torch.manual_seed(seed + 10)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=12,
                                      vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    parts.update(unet=unet.eval(), text_encoder=te.eval())
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed=0):
    parts = tiny_components(seed)
    tok = parts["tokenizer"]
    torch.manual_seed(seed + 20)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=80, norm_num_groups=8)
    cfg = dict(intermediate_size=48, num_attention_heads=4, num_hidden_layers=4, vocab_size=len(tok),
               max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=32, hidden_act="gelu", **cfg))
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=te1.eval(), text_encoder_2=te2.eval(), tokenizer=tok,
                                     tokenizer_2=copy.deepcopy(tok), unet=unet.eval(), scheduler=parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe

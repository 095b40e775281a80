"""Minimal repro: to_kohya (what save_lora(format="kohya") / convert --to kohya call) names an SDXL LoRA the SDXL way
only if it has text_encoder_2 keys or a 2048-d attn2.to_k (formats_kohya._architecture_spec -> formats.guess_architecture).
A UNet-only SDXL LoRA without attn2.to_k comes out with SD1/diffusers UNet names and an SD1 header.
Found with sd-scripts @ 48d368f: the attn1 line printed lora_unet_down_blocks_1_..._attn1_to_q, sd_v1 (kohya's SDXL
network has no such module: the file would load nothing there). The fix (lora_diffusion d5aeaae): save_lora records
the UNet's architecture from its config in the metadata and to_kohya prefers it; to_kohya without that metadata still
guesses from the tensors. Pass (fixed): the "with metadata" line prints SGM names (lora_unet_input_blocks_4_1_...) and
sdxl_base_v1-0; the first two lines show the guess with and without a 2048-d attn2.to_k."""
import torch
from diffusers import UNet2DConditionModel

from lora_diffusion.formats import LoraWeights
from lora_diffusion.formats_kohya import to_kohya

with torch.device("meta"):
    unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)
try:  # what save_lora puts in the metadata since the fix
    from lora_diffusion.pipeline import _unet_architecture
    saved_meta = {"architecture": _unet_architecture(unet)}
except ImportError:  # before the fix
    saved_meta = None
ATTN1, ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
for path, meta in [(ATTN1, None), (ATTN2, None)] + ([(ATTN1, saved_meta)] if saved_meta else []):
    w = unet.get_submodule(path).weight
    lora = {f"unet.{path}": LoraWeights(torch.zeros(1, w.shape[1]), torch.zeros(w.shape[0], 1), 1.0)}
    state, header = to_kohya(lora, meta)
    label = path + (f"  (with metadata {meta})" if meta else "")
    print(f"{label:<60} -> {next(iter(state)).split('.')[0]:<64} {header['ss_base_model_version']} {header['modelspec.architecture']}")

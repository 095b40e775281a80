"""Q3, our side (key level). Run after q3_kohya.py, in either interpreter.
 (a) reader: kohya's SDXL files ($OUT/kohya_sdxl_{lora,locon}.safetensors) against a diffusers SDXL UNet + CLIP-L +
     CLIP-G of real sizes on the meta device: every key must resolve (pipeline._plan, strict=True, with its shape
     checks) to the module kohya's own SGM->diffusers map names ($OUT/kohya_sdxl_*_expect.json); then load_lora
     itself on a StableDiffusionXLPipeline of those meta models.
 (b) writer: save_lora(format="kohya") on a StableDiffusionXLPipeline whose UNet has SDXL's block structure
     (3 levels, transformer_layers_per_block 1/2/10, attention in the lower two up blocks) at small widths, targets
     attn and full; plus to_kohya on real-size SDXL shapes for UNet-only LoRAs (no text_encoder_2 keys).
     Writes $OUT/ours_sdxl_*.keys.json for q3_kohya_load.py.
Pass: (a) "mapped to a different module than kohya's own map: 0" for lora and locon; (b) "names not in kohya's
SDXL LoCon network: 0", header sdxl_base_v1-0, our reload OK; (b2) "not in kohya's SDXL network: 0" (the
UNet-only attn1 case is the naming defect q3_repro_unet_only.py shows)."""
import json
import logging

import torch
import transformers
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from common import CLIP_L, WORK
from lora_diffusion import inject_lora, load_lora, save_lora
from lora_diffusion.formats import LoraWeights, read_lora_file_with_params, strip_text_model
from lora_diffusion.formats_kohya import canonical_key, to_kohya
from lora_diffusion.inject import lora_layers, remove_lora, resolve_targets
from lora_diffusion.pipeline import _plan, module_listing
from lora_diffusion.testing import tiny_sdxl_pipeline

logging.disable(logging.WARNING)
print("transformers", transformers.__version__)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
with torch.device("meta"):
    models = {"unet": UNet2DConditionModel(**SDXL), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
              "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}

# (a) reader
for variant in ("lora", "locon"):
    path = WORK / f"kohya_sdxl_{variant}.safetensors"
    expect = json.loads((WORK / f"kohya_sdxl_{variant}_expect.json").read_text())
    lora, params, header = read_lora_file_with_params(path, modules={c: module_listing(m) for c, m in models.items()})
    planned = {}
    for comp, model in models.items():
        for target, _ in _plan(model, comp, lora, "chk", True, str(path)):  # raises on unmatched keys / wrong shapes
            planned[(comp, target)] = True
    wrong = []
    for name, (comp, dpath, kpath) in expect.items():
        ckey = canonical_key(name)
        c, p = ckey.split(".", 1)
        p_own = p if p in dict(models[c].named_modules()) else strip_text_model(p)
        want = dpath if comp == "unet" else (dpath if dpath in dict(models[comp].named_modules()) else strip_text_model(dpath))
        if c != comp or p_own != want or (c, p_own) not in planned:
            wrong.append((name, ckey, comp, want))
    print(f"[read {variant}] {len(expect)} kohya modules ({len(lora)} read as LoRA layers, {len(params)} param deltas); "
          f"_plan strict=True matched {len(planned)}; mapped to a different module than kohya's own map: {len(wrong)} {wrong[:3]}")
    pipe = tiny_sdxl_pipeline()
    pipe.unet, pipe.text_encoder, pipe.text_encoder_2 = models["unet"], models["text_encoder"], models["text_encoder_2"]
    try:
        name = load_lora(pipe, path, strict=True)
        n = {c: sum(name in l.specs for _, l in lora_layers(m)) for c, m in models.items()}
        print(f"  load_lora(strict=True) on a meta-device SDXL pipeline: wrapped {n}")
        for m in models.values():
            remove_lora(m)
    except Exception as e:  # meta tensors may not support everything load_lora does
        print(f"  load_lora on meta models not possible: {type(e).__name__}: {str(e)[:200]}")

# (b) writer, small widths with SDXL's block structure
pipe = tiny_sdxl_pipeline()
cfg = dict(pipe.unet.config)
cfg.update(block_out_channels=(32, 64, 128), down_block_types=SDXL["down_block_types"], up_block_types=SDXL["up_block_types"],
           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8))
cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
torch.manual_seed(0)
pipe.unet = UNet2DConditionModel(**cfg)
kohya_names = set(json.loads((WORK / "kohya_sdxl_shapes.json").read_text()))
for targets in ("attn", "full"):
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        inject_lora(m, rank=4, alpha=2, targets=targets, adapter=targets)
    out = WORK / f"ours_sdxl_{targets}.safetensors"
    save_lora(out, unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, adapter=targets, format="kohya")
    with safe_open(str(out), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    mods = sorted({k.split(".")[0] for k in keys})
    unknown = [m for m in mods if m not in kohya_names]
    print(f"[write {targets}] {len(keys)} keys, {len(mods)} modules (unet {sum(m.startswith('lora_unet_') for m in mods)}, "
          f"te1 {sum(m.startswith('lora_te1_') for m in mods)}, te2 {sum(m.startswith('lora_te2_') for m in mods)}); e.g. "
          f"{[m for m in mods if m.startswith('lora_unet_')][:1]}; names not in kohya's SDXL LoCon network: {len(unknown)} {unknown[:4]}; "
          f"header ss_base_model_version={header.get('ss_base_model_version')}")
    (WORK / f"ours_sdxl_{targets}.keys.json").write_text(json.dumps(keys))
    name = load_lora(pipe, out, adapter=f"back_{targets}", strict=True)
    print("  our own reload of it (strict=True) OK")

# (b2) UNet-only SDXL LoRAs at real shapes (to_kohya decides SDXL naming from text_encoder_2 keys or 2048-d attn2.to_k)
unet = models["unet"]
for label, targets in (("unet-only attn", "attn"), ("unet-only attn1", r".*attn1\.(to_q|to_k|to_v|to_out\.0)"),
                       ("unet-only full", "full")):
    lora = {}
    for p in resolve_targets(unet, targets):
        w = unet.get_submodule(p).weight
        a = torch.zeros(1, *w.shape[1:])
        b = torch.zeros(w.shape[0], 1, *([1, 1] if w.dim() == 4 else []))
        lora[f"unet.{p}"] = LoraWeights(a, b, 1.0)
    state, header = to_kohya(lora)
    mods = sorted({k.split(".")[0] for k in state})
    unknown = [m for m in mods if m not in kohya_names]
    print(f"[to_kohya {label}] {len(mods)} modules, header {header['ss_base_model_version']}; not in kohya's SDXL network: "
          f"{len(unknown)} {unknown[:2]}")
    (WORK / f"ours_sdxl_{label.replace(' ', '_')}.keys.json").write_text(json.dumps(list(state)))

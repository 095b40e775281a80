"""Small-width pipelines with the real SD1.5 / SDXL module structure (ours: diffusers) and the matching
ComfyUI models (ComfyUI's own classes: BaseModel/SDXL + ModelPatcher, comfy.sd.CLIP with SD1ClipModel /
SDXLClipModel), loaded with the same base weights through ComfyUI's own diffusers->LDM key map.

Widths are small (the structure, hence every key name, is SD1.5's / SDXL's); ComfyUI's full-size configs are
also built on the meta device to check that the key names match the real sizes too.
"""
from __future__ import annotations

import copy
import torch

import comfy_env

comfy_env.setup()  # (puts COMFYUI_DIR on sys.path; the imports below bind `comfy`)
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.utils  # noqa: E402

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------- ours (diffusers)


def _tokenizer():
    from pathlib import Path
    from transformers import CLIPTokenizer
    from lora_diffusion.testing import byte_tokenizer_dir

    d = Path(byte_tokenizer_dir())
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def _clip_config(tok, hidden, layers, inter, heads, proj=None, act="quick_gelu"):
    from transformers import CLIPTextConfig

    kw = dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_hidden_layers=layers,
              vocab_size=49408, max_position_embeddings=77, hidden_act=act, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if proj:
        kw["projection_dim"] = proj
    return CLIPTextConfig(**kw)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


SD15_TE = dict(hidden=32, layers=12, inter=37, heads=4)  # CLIP-L structure: 12 layers (widths small)
SDXL_TE1 = dict(hidden=32, layers=12, inter=37, heads=4)
SDXL_TE2 = dict(hidden=48, layers=32, inter=53, heads=4, proj=48)  # bigG: projection_dim = hidden (ComfyUI assumes it)  # OpenCLIP-bigG structure: 32 layers


def sd15_pipeline(seed=0):
    """StableDiffusionPipeline with SD1.5's UNet structure (4 levels, attention in the upper three, conv proj_in)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD15_TE["hidden"], attention_head_dim=8, norm_num_groups=32, use_linear_projection=False)
    te = CLIPTextModel(_clip_config(tok, **SD15_TE))
    _randomize(unet, seed + 1)
    _randomize(te, seed + 2)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for m in (unet, te):
        m.eval()
    return pipe


def sdxl_pipeline(seed=0):
    """StableDiffusionXLPipeline with SDXL's UNet structure (3 levels, transformer depth 1/2/10 -> here (0,2,10)
    as SDXL: DownBlock2D then two CrossAttn levels with 2 and 10 layers), CLIP-L (12 layers) + bigG (32 layers)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer()
    torch.manual_seed(seed)
    ctx = SDXL_TE1["hidden"] + SDXL_TE2["hidden"]
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + SDXL_TE2["proj"], cross_attention_dim=ctx, norm_num_groups=32)
    te1 = CLIPTextModel(_clip_config(tok, **SDXL_TE1))
    te2 = CLIPTextModelWithProjection(_clip_config(tok, **SDXL_TE2, act="gelu"))
    _randomize(unet, seed + 1)
    _randomize(te1, seed + 2)
    _randomize(te2, seed + 3)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=copy.deepcopy(tok), unet=unet, scheduler=_scheduler())
    for m in (unet, te1, te2):
        m.eval()
    return pipe


def _randomize(model, seed):
    """Give every weight non-trivial values (diffusers zero-inits some convs; a zero base would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def clip_state_with_text_model(te):
    """HF CLIP state dict with ``text_model.`` (transformers >= 5.6 dropped it from module paths)."""
    out = {}
    for k, v in te.state_dict().items():
        if k.startswith("text_model.") or k.startswith("text_projection"):
            out[k] = v
        else:
            out["text_model." + k] = v
    return out


# ---------------------------------------------------------------------------------------------- ComfyUI side

# the exact full-size configs ComfyUI itself detects for SD1.5 / SDXL diffusers UNets (model_detection.py)
def comfy_full_unet_config(kind):
    if kind == "sd15":
        cfg = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
               'adm_in_channels': None, 'dtype': torch.float32, 'in_channels': 4, 'model_channels': 320,
               'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4],
               'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
               'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 'use_temporal_attention': False,
               'use_temporal_resblock': False}
    else:
        cfg = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
               'num_classes': 'sequential', 'adm_in_channels': 2816, 'dtype': torch.float32, 'in_channels': 4,
               'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
               'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
               'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
               'use_temporal_attention': False, 'use_temporal_resblock': False}
    return comfy.model_detection.convert_config(cfg)


def comfy_small_unet_config(kind):
    cfg = comfy_full_unet_config(kind)
    if kind == "sd15":
        cfg.update(model_channels=32, channel_mult=[1, 1, 2, 2], context_dim=SD15_TE["hidden"])
    else:
        cfg.update(model_channels=32, channel_mult=[1, 2, 4], context_dim=SDXL_TE1["hidden"] + SDXL_TE2["hidden"],
                   adm_in_channels=6 * 8 + SDXL_TE2["proj"])
    return cfg


def comfy_model_config(kind, unet_config):
    cls = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
    assert cls.matches(comfy_full_unet_config(kind)), "ComfyUI's own model list picks this class for the full config"
    mc = cls(unet_config)
    if kind == "sdxl" and unet_config["model_channels"] != 320:
        mc.unet_config["num_head_channels"] = 16  # 64 does not divide the small widths; names do not depend on it
    return mc


def comfy_unet_meta(kind):
    """Full-size ComfyUI model on the meta device (key names only)."""
    mc = comfy_model_config(kind, comfy_full_unet_config(kind))
    with torch.device("meta"):
        model = mc.get_model({}, device=torch.device("meta"))
    return model


def comfy_unet_patcher(kind, diffusers_unet):
    """Small ComfyUI model holding ``diffusers_unet``'s weights, converted as comfy.sd.load_diffusion_model_state_dict
    converts a diffusers UNet (comfy.utils.unet_to_diffusers); returns (ModelPatcher, diffusers->LDM key map)."""
    cfg = comfy_small_unet_config(kind)
    mc = comfy_model_config(kind, cfg)
    model = mc.get_model({}, device=CPU)
    sd = {k: v.detach().clone() for k, v in diffusers_unet.state_dict().items()}
    diffusers_keys = comfy.utils.unet_to_diffusers(mc.unet_config)
    new_sd, unused = {}, []
    for k in diffusers_keys:
        if k in sd:
            new_sd[diffusers_keys[k]] = sd.pop(k)
        else:
            unused.append(k)
    missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
    # (ComfyUI's map also names layers this structure lacks, e.g. conv_shortcut in every ResNet, as for the real
    # SD1.5 / SDXL: unused. What matters: every diffusers tensor went somewhere and ComfyUI's model got them all.)
    assert not missing and not unexpected and not sd, (missing[:5], unexpected[:5], list(sd)[:5])
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    return patcher, diffusers_keys


def _clip_options(kind, tok_len):
    def opts(te):
        o = dict(hidden_size=te["hidden"], intermediate_size=te["inter"], num_attention_heads=te["heads"],
                 num_hidden_layers=te["layers"])  # ComfyUI fixes vocab 49408 (clip_model.py:86)
        if "proj" in te:
            o["projection_dim"] = te["proj"]
        return o
    if kind == "sd15":
        return {"clip_l_model_config": opts(SD15_TE)}
    return {"clip_l_model_config": opts(SDXL_TE1), "clip_g_model_config": opts(SDXL_TE2)}


def comfy_clip(kind, pipe=None, meta=False, zero_missing=False):
    """comfy.sd.CLIP with ComfyUI's SD1ClipModel (clip_l) / SDXLClipModel (clip_l + clip_g) classes; small widths
    through ComfyUI's own ``<name>_model_config`` option, loaded with the pipeline's text-encoder weights."""
    if kind == "sd15":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    opts = {"dtype": torch.float32, "load_device": CPU, "offload_device": CPU, "initial_device": CPU}
    if meta:
        opts["initial_device"] = torch.device("meta")
    else:
        opts.update(_clip_options(kind, len(pipe.tokenizer)))
    clip = comfy.sd.CLIP(target, model_options=opts)
    if meta:
        return clip
    sd = {}
    for k, v in clip_state_with_text_model(pipe.text_encoder).items():
        sd["clip_l.transformer." + k] = v.detach().clone()
    if kind == "sdxl":
        for k, v in clip_state_with_text_model(pipe.text_encoder_2).items():
            sd["clip_g.transformer." + k] = v.detach().clone()
    own = clip.cond_stage_model.state_dict()
    missing = [k for k in own if k not in sd and "position_ids" not in k and "logit_scale" not in k
               and not k.startswith("clip_l.transformer.text_projection")]
    extra = [k for k in sd if k not in own]
    assert not missing and not extra, (missing[:5], extra[:5])
    for k in sd:
        assert own[k].shape == sd[k].shape, (k, own[k].shape, sd[k].shape)
    # as ComfyUI loads a text encoder: load_state_dict(strict=False) (comfy/sd.py:256, sd1_clip.py:294); the missing
    # clip_l.transformer.text_projection.weight (SD1.5 / SDXL's CLIP-L has none; ComfyUI filters that warning,
    # sd.py:1236) stays as comfy.ops left it: torch.empty, i.e. uninitialised memory.
    clip.cond_stage_model.load_state_dict(sd, strict=False)
    if zero_missing:
        with torch.no_grad():
            for k in missing_ok(own, sd):
                clip.cond_stage_model.get_parameter(k).zero_()
    return clip


def missing_ok(own, sd):
    return [k for k in own if k not in sd and k.endswith("text_projection.weight")]

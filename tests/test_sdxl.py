"""SDXL pipelines (two text encoders, ``text_encoder_2``): LoRA files load as stock diffusers loads them, in the
diffusers form and the kohya form (SGM block names, as kohya writes, or diffusers names), and the pipeline
invariants hold for the second encoder too."""

import pytest
import torch

from lora_diffusion import delete_adapter, disable_lora, enable_lora, fuse, list_adapters, load_lora, save_lora, set_adapters, unfuse
from lora_diffusion.blend import LBW_SDXL, block_factor
from lora_diffusion.formats import read_lora_file, read_safetensors, write_lora_file
from lora_diffusion.formats_kohya import module_path_from_kohya
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import random_lora, tiny_sdxl_pipeline

from conftest import generate


def _diffusers_named(key: str) -> str:
    """A kohya UNet key with the module named the diffusers way (``lora_unet_down_blocks_1_attentions_0_...``), as
    some converters write SDXL files, instead of kohya's SGM blocks (``lora_unet_input_blocks_4_1_...``)."""
    name, _, suffix = key.partition(".")
    component, path = module_path_from_kohya(name)
    return f"lora_unet_{path.replace('.', '_')}.{suffix}" if component == "unet" else key


@pytest.mark.parametrize("form", ["diffusers", "kohya", "kohya-diffusers-names"])
def test_sdxl_files_load_as_stock_diffusers_loads_them(tmp_path, form):
    """Attention, feed-forward and ResNet (LoCon) layers, samplers included, in both text encoders and the UNet."""
    pytest.importorskip("peft")  # (diffusers' loader needs it)
    from safetensors.torch import save_file

    lora = random_lora(tiny_sdxl_pipeline(0), seed=1, rank=4, alpha=8, unet_targets="full")
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    path = tmp_path / "xl.safetensors"
    write_lora_file(path, lora, format="diffusers" if form == "diffusers" else "kohya", dtype=torch.float32)
    state, header = read_safetensors(path)
    if form == "kohya":  # as kohya's SDXL trainer writes (A1111 and ComfyUI read it): the UNet by its SGM blocks
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_input_blocks_3_0_op.alpha", "lora_unet_middle_block_0_in_layers_2.lora_up.weight",
                "lora_unet_output_blocks_2_2_conv.alpha", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.alpha"} <= set(state)
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in state)
    if form == "kohya-diffusers-names":
        save_file({_diffusers_named(k): v for k, v in state.items()}, str(path), metadata=header)
        assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in read_safetensors(path)[0])
    assert read_lora_file(path)[0].keys() == lora.keys()
    ours, ref, base = tiny_sdxl_pipeline(0), tiny_sdxl_pipeline(0), tiny_sdxl_pipeline(0)
    load_lora(ours, path)
    ref.load_lora_weights(str(path))
    assert len(list(lora_layers(ours.text_encoder_2))) == sum(k.startswith("text_encoder_2.") for k in lora)
    for pipe in (ours, ref, base):
        pipe.to(torch.float64)  # the same maths gives the same numbers in fp64
    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        mine, theirs = ours.text_encoder_2(ids), ref.text_encoder_2(ids)
        torch.testing.assert_close(mine.text_embeds, theirs.text_embeds, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(mine.text_embeds, base.text_encoder_2(ids).text_embeds)
    image = generate(ours)
    assert abs(image - generate(base)).max() > 0.05
    assert abs(image - generate(ref)).max() < 1e-6


def test_sdxl_pipeline_invariants(tmp_path):
    pipe = tiny_sdxl_pipeline(0)
    te2 = pipe.text_encoder_2
    before = {k: v.clone() for k, v in te2.state_dict().items()}
    path = tmp_path / "xl.safetensors"
    write_lora_file(path, random_lora(pipe, seed=2, rank=4, alpha=4), dtype=torch.float32)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def te2_out() -> torch.Tensor:
        with torch.no_grad():
            return te2(ids).text_embeds

    plain = te2_out()
    assert load_lora(pipe, path) == "xl"
    assert list_adapters(pipe) == {"unet": ["xl"], "text_encoder": ["xl"], "text_encoder_2": ["xl"]}
    unfused = te2_out()
    assert not torch.allclose(unfused, plain)
    set_adapters(pipe, {"xl": 1.0}, text_encoder=0.0)  # the text-encoder weight holds for both encoders
    torch.testing.assert_close(te2_out(), plain, rtol=0, atol=0)
    set_adapters(pipe, {"xl": 1.0})
    disable_lora(pipe)
    torch.testing.assert_close(te2_out(), plain, rtol=0, atol=0)
    enable_lora(pipe)
    fuse(pipe)
    torch.testing.assert_close(te2_out(), unfused, rtol=1e-5, atol=1e-6)
    unfuse(pipe)
    for module_path, layer in lora_layers(te2):  # the base weights back bit for bit
        assert torch.equal(layer.base_layer.weight, before[f"{module_path}.weight"]), module_path
    saved = tmp_path / "again.safetensors"
    save_lora(saved, unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=te2, adapter="xl", dtype=torch.float32)
    first, again = read_lora_file(path)[0], read_lora_file(saved)[0]
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k].A, again[k].A) and torch.equal(first[k].B, again[k].B) for k in first)
    delete_adapter(pipe, "xl")
    assert list_adapters(pipe) == {}
    torch.testing.assert_close(te2_out(), plain, rtol=0, atol=0)


def test_sdxl_lora_into_an_sd1_pipeline_names_the_missing_encoder(tmp_path):
    from lora_diffusion.formats import LoraFormatError
    from lora_diffusion.testing import tiny_pipeline

    path = tmp_path / "xl.safetensors"
    write_lora_file(path, random_lora(tiny_sdxl_pipeline(0), seed=1, unet_targets=None), dtype=torch.float32)
    with pytest.raises(LoraFormatError, match="no text_encoder_2"):
        load_lora(tiny_pipeline(0), path)


def test_lbw_sdxl_vector_weights_the_sdxl_blocks():
    """LoRA Block Weight's 12-value SDXL vector (BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05)."""
    values = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3]
    assert len(LBW_SDXL) == len(values) == 12
    cases = {("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"): 0.5,
             ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"): 0.1,
             ("unet", "down_blocks.2.attentions.1.proj_in"): 0.4,
             ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"): 0.6,
             ("unet", "up_blocks.0.attentions.2.proj_out"): 0.9,
             ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"): 1.1,
             ("unet", "down_blocks.0.resnets.0.conv1"): 0.0,  # IN01: not in the 12, so 0, as in the LBW extension
             ("unet", "time_embedding.linear_1"): 1.0}  # in no block
    for (component, path), factor in cases.items():
        assert block_factor(values, component, path) == factor, (component, path)
    with pytest.raises(ValueError, match="17 values.*12 for SDXL.*26 .SD1. or 20 .SDXL.; got 13"):
        block_factor([1.0] * 13, "unet", "mid_block.attentions.0.proj_in")
    every = [0.5] + [0.25 * i for i in range(1, 19)] + [2.0]  # the 20 of every block: BASE, IN00-IN08, MID, OUT00-OUT08
    assert block_factor(every, "unet", "down_blocks.0.resnets.0.conv1") == 0.5 and block_factor(every, "unet", "conv_in") == 0.25
    assert block_factor(every, "unet", "up_blocks.2.resnets.2.conv1") == 2.0 and block_factor(every, "unet", "mid_block.resnets.0.conv1") == 2.5


def test_bake_an_sdxl_pipeline(tmp_path):
    """``bake`` fuses into both text encoders and saves a folder that stock diffusers loads with the LoRA in it,
    and a single-file checkpoint in SGM layout whose every weight diffusers' own converters read back exactly (UNet
    with SGM block names, VAE, CLIP-L, OpenCLIP-G in open_clip's layout); the pipeline comes back as it was."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file

    from lora_diffusion.formats import strip_text_model
    from lora_diffusion.tools import bake

    pipe = tiny_sdxl_pipeline(0)
    path = tmp_path / "xl.safetensors"
    write_lora_file(path, random_lora(pipe, seed=3, rank=4, alpha=4), dtype=torch.float32)
    bake(pipe, {path: 0.7}, tmp_path / "baked", single_file=tmp_path / "xl.ckpt.safetensors")
    assert list_adapters(pipe) == {} and not list(lora_layers(pipe.text_encoder_2))
    baked = StableDiffusionXLPipeline.from_pretrained(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    ckpt = load_file(str(tmp_path / "xl.ckpt.safetensors"))
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in ckpt)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in ckpt
    te1 = convert_ldm_clip_checkpoint(ckpt)
    te2 = convert_open_clip_checkpoint(baked.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model.")
    flat = not any(k.startswith("text_model.") for k in baked.text_encoder.state_dict())  # (transformers >= 5.6)
    converted = ((convert_ldm_unet_checkpoint(ckpt, dict(baked.unet.config)), baked.unet),
                 (convert_ldm_vae_checkpoint(ckpt, dict(baked.vae.config)), baked.vae),
                 ({strip_text_model(k) if flat else k: v for k, v in te1.items()}, baked.text_encoder),
                 (te2, baked.text_encoder_2))
    for back, model in converted:
        ref = model.state_dict()
        assert back.keys() == ref.keys(), sorted(set(back) ^ set(ref))[:5]
        assert all(torch.equal(back[k], ref[k]) for k in ref)
    # nothing else in the file (open_clip packs each layer's six q/k/v tensors into two)
    packed = 4 * baked.text_encoder_2.config.num_hidden_layers
    assert len(ckpt) == sum(len(model.state_dict()) for _, model in converted) - packed
    load_lora(pipe, path, weight=0.7)
    fuse(pipe)
    assert abs(generate(baked) - generate(pipe)).max() < 1e-5


def test_prompt_tags_weight_both_text_encoders(tmp_path):
    """A1111's ``<lora:name:te:unet>`` on an SDXL pipeline: the te weight holds for both text encoders."""
    from lora_diffusion.blend import apply_prompt_loras

    pipe = tiny_sdxl_pipeline(0)
    write_lora_file(tmp_path / "xl.safetensors", random_lora(pipe, seed=4), dtype=torch.float32)
    assert apply_prompt_loras(pipe, "a cat <lora:xl:0.3:0.8>", tmp_path) == "a cat"
    for component, weight in (("unet", 0.8), ("text_encoder", 0.3), ("text_encoder_2", 0.3)):
        layers = [layer for _, layer in lora_layers(getattr(pipe, component))]
        assert layers and all(layer.weights == {"xl": weight} for layer in layers), component


def test_an_sdxl_learned_token_loads_into_both_encoders_or_refuses_the_whole_load(tmp_path):
    """An SDXL embedding (``clip_l`` / ``clip_g``) named by a LoRA goes into both tokenizers and encoders under
    the token in its metadata (else the LoRA's trigger word); a wrong width or a missing token refuses the load
    before anything changes."""
    from safetensors.torch import save_file

    from lora_diffusion.formats import LoraFormatError

    pipe = tiny_sdxl_pipeline(0)
    lora = {k: v for k, v in random_lora(pipe, seed=1).items() if k.startswith("unet.")}
    gen = torch.Generator().manual_seed(0)
    good = {"clip_l": torch.randn(1, 32, generator=gen), "clip_g": torch.randn(1, 48, generator=gen)}
    cases = {"token": (good, {"token": "<a>"}, None), "trigger": (good, {}, ["<b>"]),
             "wide": ({**good, "clip_g": torch.randn(1, 40)}, {"token": "<c>"}, None), "nameless": (good, {}, None)}
    for name, (tensors, header, words) in cases.items():
        folder = tmp_path / name
        write_lora_file(folder / "pytorch_lora_weights.safetensors", lora, dtype=torch.float32,
                        metadata={"embedding_file": "embeddings.safetensors", **({"trigger_words": words} if words else {})})
        save_file(tensors, folder / "embeddings.safetensors", metadata=header)
        fresh = tiny_sdxl_pipeline(0)
        sizes = len(fresh.tokenizer), len(fresh.tokenizer_2)
        if name in ("wide", "nameless"):
            with pytest.raises(LoraFormatError, match="text_encoder_2 needs finite vectors 48 wide|without its token"):
                load_lora(fresh, folder)
            assert list_adapters(fresh) == {} and (len(fresh.tokenizer), len(fresh.tokenizer_2)) == sizes
            continue
        load_lora(fresh, folder)
        token = header.get("token") or words[0]
        for key, tokenizer, encoder in (("clip_l", fresh.tokenizer, fresh.text_encoder),
                                        ("clip_g", fresh.tokenizer_2, fresh.text_encoder_2)):
            row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
            assert torch.equal(row, good[key][0]), (name, key)


@pytest.mark.parametrize("targets", [r".*attn1\.to_q", "full"])
def test_a_unet_only_sdxl_lora_is_written_as_kohya_writes_sdxl(tmp_path, targets):
    """``save_lora`` knows the UNet: an SDXL LoRA without text encoders, and without the 2048-d ``attn2.to_k`` that
    tells SDXL from its tensors (attn1 only), is still written with kohya's SGM names and SDXL header (it was named
    as SD 1.x, and read back only thanks to the reader's either-names mapping); a convert keeps it SDXL."""
    from lora_diffusion import inject_lora
    from lora_diffusion.tools import convert_lora

    pipe = tiny_sdxl_pipeline(0)
    inject_lora(pipe.unet, rank=2, targets=targets)
    path = save_lora(tmp_path / "xl.safetensors", unet=pipe.unet, format="kohya", dtype=torch.float32)
    diffusers = save_lora(tmp_path / "xl_diffusers.safetensors", unet=pipe.unet, dtype=torch.float32)
    converted = convert_lora(diffusers, tmp_path / "xl_converted.safetensors", to="kohya")
    for file in (path, converted):
        state, header = read_safetensors(file)
        assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["modelspec.architecture"].startswith("stable-diffusion-xl")
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in state)
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in state)
        assert read_lora_file(file)[0].keys() == read_lora_file(diffusers)[0].keys()

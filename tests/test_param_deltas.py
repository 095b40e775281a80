"""Deltas to parameters outside the LoRA layers (ComfyUI's "Extract and Save Lora" with its default bias_diff, A1111's
full networks): ``.diff_b`` biases, 1-D ``.diff`` norm scales and the text encoder's embedding tables load into the
parameters themselves. A ComfyUI-style extraction of model B minus model A, every weight a full-rank LoRA, loaded
into A gives B; weight 0, disable, delete and remove_lora give A back bit for bit; convert and merge keep them."""

import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import delete_adapter, disable_lora, enable_lora, fuse, load_lora, remove_lora, set_adapters, unfuse
from lora_diffusion.blend import merge_loras
from lora_diffusion.formats import LoraFormatError, read_lora_file, read_lora_file_with_params, read_safetensors
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.tools import convert_lora, inspect_lora

from conftest import base_params, comfyui_extraction, move_weights, save_peft_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(A, B, the extraction file of B - A): B is A with every parameter moved by about 10 %."""
    a, b = tiny_pipeline(0), move_weights(tiny_pipeline(0), 0.1, seed=1)
    path = tmp_path_factory.mktemp("extract") / "ComfyUI_extracted_lora_00001_.safetensors"
    save_file(comfyui_extraction(a, b), str(path))
    return a, b, path


def _outputs(pipe):
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(latents, t, encoder_hidden_states=text).sample


def test_sdxl_extraction_loaded_into_a_gives_b(tmp_path):
    """The same for SDXL: SGM names (label_emb, the out norm), both text encoders (clip_g with text_projection); and
    converted to a kohya file (kohya's SDXL names), the same parameters."""
    from lora_diffusion.testing import tiny_sdxl_pipeline

    a, b = tiny_sdxl_pipeline(0), move_weights(tiny_sdxl_pipeline(0), 0.1, seed=2)
    state = comfyui_extraction(a, b)
    assert any(k.startswith("diffusion_model.label_emb.") for k in state) and any(k.startswith("text_encoders.clip_g.") for k in state)
    save_file(state, str(tmp_path / "xl.safetensors"))
    kohya = convert_lora(tmp_path / "xl.safetensors", tmp_path / "xl_kohya.safetensors", to="kohya", dtype=torch.float32)
    assert any(k.startswith("lora_unet_label_emb_0_0.") for k in read_safetensors(kohya)[0])  # SGM names, as kohya's SDXL
    target = base_params(b)
    for file in (tmp_path / "xl.safetensors", kohya):
        pipe = tiny_sdxl_pipeline(0)
        load_lora(pipe, file)
        fuse(pipe)
        got = base_params(pipe)
        for key, p in target.items():
            torch.testing.assert_close(got[key], p, rtol=1e-5, atol=1e-5, msg=f"{file.name} {key}")


def test_extraction_loaded_into_a_gives_b(models):
    """Every parameter of B (to the factors' rounding), B's outputs unfused and fused; the file's counts in inspect."""
    a, b, path = models
    lora, params, header = read_lora_file_with_params(path)
    assert header["_format"] == "comfyui" and params and any(k.endswith(".bias") for k in params)
    assert any("norm" in k and k.endswith(".weight") for k in params) and "text_encoder.text_model.embeddings.token_embedding.weight" in params
    info = inspect_lora(path)
    assert info["param_deltas"] == len(params) and info["layers"] == {"text_encoder": 30, "unet": len([k for k in lora if k.startswith("unet.")])}
    pipe = tiny_pipeline(0)
    load_lora(pipe, path, adapter="b")
    target = base_params(b)
    layers = {k.replace("text_encoder.text_model.", "text_encoder.") for k in lora}  # (transformers >= 5.6 paths)
    for fused in (False, True):
        if fused:
            fuse(pipe)
        got = base_params(pipe)
        for key, p in target.items():
            if key.rsplit(".", 1)[0] in layers and key.endswith(".weight") and not fused:
                continue  # an unfused LoRA layer's weight is A's: its delta is the adapter's
            torch.testing.assert_close(got[key], p, rtol=1e-5, atol=1e-5, msg=key)
        for ours, ref in zip(_outputs(pipe), _outputs(b)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    unfuse(pipe)


def test_weight_zero_disable_delete_and_remove_give_a_back(models):
    """The parameters are A's bit for bit at weight 0, while disabled, after delete_adapter and after remove_lora; a
    block weight of 0 on the down blocks leaves their norms and biases at A's and moves the others."""
    a, b, path = models
    base = base_params(a)
    pipe = tiny_pipeline(0)
    load_lora(pipe, path, adapter="b")

    def same_as_a(what):
        got = base_params(pipe)
        for key in base:
            assert torch.equal(got[key], base[key]), (what, key)

    set_adapters(pipe, {"b": 0.0})
    same_as_a("weight 0")
    set_adapters(pipe, {"b": 0.5})
    bias = "unet.down_blocks.0.resnets.0.norm1.bias"
    torch.testing.assert_close(base_params(pipe)[bias], (base[bias] + base_params(b)[bias]) / 2, rtol=1e-5, atol=1e-6)
    set_adapters(pipe, {"b": 1.0}, blocks={"down": 0, "mid": 1, "up": 1})
    got = base_params(pipe)
    assert torch.equal(got[bias], base[bias]) and not torch.equal(got["unet.up_blocks.0.resnets.0.norm1.bias"], base["unet.up_blocks.0.resnets.0.norm1.bias"])
    set_adapters(pipe, {"b": 1.0})
    disable_lora(pipe)
    same_as_a("disabled")
    assert torch.equal(_outputs(pipe)[1], _outputs(a)[1])
    enable_lora(pipe)
    assert not torch.equal(base_params(pipe)[bias], base[bias])
    delete_adapter(pipe, "b")
    same_as_a("deleted")
    load_lora(pipe, path, adapter="b")
    remove_lora(pipe.unet)
    remove_lora(pipe.text_encoder)
    same_as_a("removed")


def test_convert_and_merge_keep_them(models, tmp_path):
    """To kohya the deltas are written as kohya names (.diff_b, .diff, the table's factors) and load to the same
    parameters; a diffusers file cannot hold them (refused, nothing written); a merge at 0.5 + 0.5 is the file."""
    a, b, path = models
    out = convert_lora(path, tmp_path / "kohya.safetensors", to="kohya", dtype=torch.float32)
    keys = read_safetensors(out)[0]
    assert any(k.endswith(".diff_b") for k in keys) and "lora_te_text_model_embeddings_token_embedding.lora_up.weight" in keys
    loaded = []
    for file in (path, out):
        pipe = tiny_pipeline(0)
        load_lora(pipe, file)
        loaded.append(base_params(pipe))
    for key in loaded[0]:
        assert torch.equal(loaded[0][key], loaded[1][key]), key
    with pytest.raises(LoraFormatError, match="no place for deltas to biases, norms or embedding tables"):
        convert_lora(path, tmp_path / "d.safetensors", to="diffusers")
    assert not (tmp_path / "d.safetensors").exists()
    merged = merge_loras({path: 0.5, out: 0.5}, tmp_path / "merged.safetensors", format="kohya", dtype=torch.float32)
    pipe = tiny_pipeline(0)
    load_lora(pipe, merged.path)
    got = base_params(pipe)
    for key in loaded[0]:
        torch.testing.assert_close(got[key], loaded[0][key], rtol=1e-5, atol=1e-6, msg=key)


def test_lycoris_norm_deltas_go_into_the_norms(tmp_path):
    """LyCORIS' ``w_norm`` / ``b_norm`` (its ``train_norm``), beside a LoRA module: added to the norm's weight and bias
    times the adapter's weight, as LyCORIS, A1111 and ComfyUI add them; deleting the adapter gives them back bit for
    bit; converted to kohya they are ComfyUI's ``.diff`` / ``.diff_b`` and load to the same parameters."""
    from lora_diffusion.formats_kohya import kohya_name

    pipe = tiny_pipeline(0)
    base = base_params(pipe)
    norms = ["unet.down_blocks.0.resnets.0.norm1", "unet.mid_block.attentions.0.norm", "text_encoder.text_model.final_layer_norm"]
    g = torch.Generator().manual_seed(0)
    state, expect = {}, {}
    for i, key in enumerate(norms):
        param = key if f"{key}.weight" in base else key.replace("text_model.", "", 1)  # (transformers 5's CLIP)
        width = base[f"{param}.weight"].numel()
        state[f"{kohya_name(key)}.w_norm"] = w = torch.randn(width, generator=g) * 0.1
        expect[f"{param}.weight"] = w
        if i != 1:  # (b_norm is optional)
            state[f"{kohya_name(key)}.b_norm"] = b = torch.randn(width, generator=g) * 0.1
            expect[f"{param}.bias"] = b
    to_q = kohya_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    state.update({f"{to_q}.lora_down.weight": torch.randn(2, 64, generator=g), f"{to_q}.lora_up.weight": torch.randn(64, 2, generator=g)})
    path = tmp_path / "lyco_norms.safetensors"
    save_file(state, str(path))
    assert inspect_lora(path)["module_kinds"] == {"LoRA": 1, "norm": 3} and inspect_lora(path)["format"] == "lycoris"
    load_lora(pipe, path, weight=0.7)
    got = base_params(pipe)
    for key, delta in expect.items():
        assert torch.equal(got[key], base[key] + 0.7 * delta), key  # (the tiny model's norms are fp32, as the deltas)
    assert torch.equal(got["unet.mid_block.attentions.0.norm.bias"], base["unet.mid_block.attentions.0.norm.bias"])
    out = convert_lora(path, tmp_path / "kohya.safetensors", to="kohya", dtype=torch.float32)
    assert f"{kohya_name(norms[0])}.diff" in read_safetensors(out)[0]
    again = tiny_pipeline(0)
    load_lora(again, out, weight=0.7)
    assert all(torch.equal(v, got[k]) for k, v in base_params(again).items())
    delete_adapter(pipe, "lyco_norms")
    assert all(torch.equal(v, base[k]) for k, v in base_params(pipe).items())
    state[f"{kohya_name(norms[0])}.diff_b"] = torch.zeros(base[f"{norms[0]}.bias"].numel())
    save_file(state, str(tmp_path / "both.safetensors"))
    with pytest.raises(LoraFormatError, match="norm1 has both diff_b and b_norm, two deltas to one parameter"):
        read_lora_file(tmp_path / "both.safetensors")


def test_bad_deltas_are_refused(models, tmp_path):
    """A delta of the wrong shape names the parameter and both shapes, and leaves the pipeline as it was."""
    a, b, path = models
    state = read_safetensors(path)[0]
    key = next(k for k in state if k.endswith("in_layers.0.diff_b"))
    state[key] = torch.zeros(state[key].numel() + 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=r"bad.safetensors: unet\.\S+norm1\.bias: the file's delta has shape \[\d+\], the model's parameter \[\d+\]"):
        load_lora(pipe, tmp_path / "bad.safetensors")
    base = base_params(a)
    assert all(torch.equal(v, base[k]) for k, v in base_params(pipe).items())
    assert read_lora_file(path)[1]["_param_deltas"] == str(len(read_lora_file_with_params(path)[1]))


def test_save_and_bake_keep_them(models, tmp_path, caplog):
    """save_lora of the loaded adapter keeps the deltas in a kohya file (loading it gives the same parameters) and warns
    that a diffusers file drops them; bake of the extraction into A writes B's parameters and leaves A as it was."""
    import logging

    from lora_diffusion import save_lora
    from lora_diffusion.tools import bake

    a, b, path = models
    pipe = tiny_pipeline(0)
    load_lora(pipe, path, adapter="b")
    loaded = base_params(pipe)
    out = save_lora(tmp_path / "again.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="b",
                    format="kohya", dtype=torch.float32)
    again = tiny_pipeline(0)
    load_lora(again, out)
    assert all(torch.equal(v, loaded[k]) for k, v in base_params(again).items())
    with caplog.at_level(logging.WARNING):
        save_lora(tmp_path / "d.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="b")
    assert "biases / norms / embedding tables, which a diffusers file cannot hold: not saved" in caplog.text

    base = tiny_pipeline(0)
    before = base_params(base)
    baked = bake(base, {path: 1.0}, tmp_path / "baked")
    assert all(torch.equal(v, before[k]) for k, v in base_params(base).items())
    from diffusers import StableDiffusionPipeline

    got, target = base_params(StableDiffusionPipeline.from_pretrained(baked)), base_params(b)
    for key, p in target.items():
        torch.testing.assert_close(got[key], p, rtol=1e-5, atol=1e-5, msg=key)


def test_zero_deltas_for_modules_the_model_lacks_are_skipped(models, tmp_path):
    """ComfyUI extracts every weight, unchanged ones as zero factors: such zero deltas for modules the model lacks load
    (strict) as the nothing they are; a non-zero one is still refused, naming it."""
    a, b, path = models
    state = read_safetensors(path)[0]
    zero = {"diffusion_model.extra_norm.diff_b": torch.zeros(8)}
    save_file({**state, **zero}, str(tmp_path / "zeros.safetensors"))
    pipe = tiny_pipeline(0)
    load_lora(pipe, tmp_path / "zeros.safetensors")
    reference = tiny_pipeline(0)
    load_lora(reference, path)
    assert all(torch.equal(v, base_params(reference)[k]) for k, v in base_params(pipe).items())
    save_file({**state, "diffusion_model.extra_norm.diff_b": torch.ones(8)}, str(tmp_path / "nonzero.safetensors"))
    with pytest.raises(LoraFormatError, match=r"match no parameter of this model: unet\.extra_norm\.bias"):
        load_lora(tiny_pipeline(0), tmp_path / "nonzero.safetensors")


@pytest.mark.parametrize("fill", [0.0, 3.0, float("nan")])
def test_comfyui_clip_l_projection_is_skipped_on_an_encoder_without_one(models, tmp_path, fill, caplog):
    """ComfyUI's CLIP-L has a ``text_projection`` that SD never uses and ComfyUI leaves uninitialised, and its "Extract
    and Save Lora" extracts it: zero, garbage or NaN factors (seen with ComfyUI 0.3.64). ComfyUI applies them to a
    weight nothing reads; SD's CLIPTextModel has no projection, so the file loads as without them, with a warning
    naming them when they are not zero. (Before: refused, strict or not, for NaN; refused when strict otherwise.)"""
    a, b, path = models
    extra = "text_encoders.clip_l.transformer.text_projection"
    garbage = {f"{extra}.lora_up.weight": torch.full((32, 4), fill), f"{extra}.lora_down.weight": torch.full((4, 32), fill)}
    save_file({**read_safetensors(path)[0], **garbage}, str(tmp_path / "projection.safetensors"))
    pipe, reference = tiny_pipeline(0), tiny_pipeline(0)
    with caplog.at_level("WARNING", logger="lora_diffusion"):
        load_lora(pipe, tmp_path / "projection.safetensors")
    assert ("text_projection skipped: this text encoder has no output projection" in caplog.text) == (fill != 0)
    load_lora(reference, path)
    fuse(pipe), fuse(reference)
    assert all(torch.equal(v, base_params(reference)[k]) for k, v in base_params(pipe).items())


def test_a_non_finite_projection_an_encoder_has_is_refused(tmp_path):
    """SDXL's second encoder has a real ``text_projection`` (clip_g's): NaN there is refused, naming it, and the
    pipeline is left as it was."""
    from lora_diffusion.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    out, width = pipe.text_encoder_2.text_projection.weight.shape
    extra, q = "text_encoders.clip_g.transformer.text_projection", "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    state = {f"{extra}.lora_up.weight": torch.full((out, 2), float("nan")), f"{extra}.lora_down.weight": torch.ones(2, width),
             f"{q}.lora_up.weight": torch.ones(width, 2), f"{q}.lora_down.weight": torch.ones(2, width)}
    save_file(state, str(tmp_path / "nan.safetensors"))
    before = base_params(pipe)
    with pytest.raises(LoraFormatError, match=r"nan\.safetensors: text_encoder_2\.\S*text_projection \(B\) holds NaN or Inf"):
        load_lora(pipe, tmp_path / "nan.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in base_params(pipe).items()) and not any("lora" in k for k in pipe.text_encoder_2.state_dict())


def _peft_lora_bias_file(tmp_path, bias_on_to_q: float = 0.0):
    """The tiny pipeline with PEFT adapters made with ``lora_bias=True`` (a LoRA extracted from a fine-tune: lora_B has
    its own bias) on the UNet's to_q (no bias of its own: its lora_B bias is ``bias_on_to_q``) and to_out.0 and the
    text encoder's q_proj and out_proj, random factors and biases, and the diffusers file of them."""
    from peft import LoraConfig, inject_adapter_in_model

    ref = tiny_pipeline(0)
    unet_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_out.0"], lora_bias=True)
    te_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "out_proj"], lora_bias=True)
    with pytest.warns(UserWarning, match="has no bias"):  # PEFT's own warning about to_q
        ref.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, ref.text_encoder)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in list(ref.unet.named_parameters()) + list(ref.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "to_q.lora_B" in name and name.endswith(".bias"):
                p.fill_(bias_on_to_q)
    return ref, save_peft_lora(ref, tmp_path, unet_cfg, te_cfg)


def test_peft_lora_bias_file_gives_peft_outputs(tmp_path):
    """A diffusers / PEFT file with lora_B biases (``lora_bias=True``) gives PEFT's outputs: each bias, times
    w * alpha / r, goes into the layer's bias; half the weight gives stock diffusers' half; weight 0 the base bit for
    bit. A zero lora_B bias on a layer without a bias (to_q: PEFT makes one for every layer) changes nothing."""
    pytest.importorskip("peft")
    ref, path = _peft_lora_bias_file(tmp_path / "peft")
    assert any(k.endswith("to_out.0.lora_B.bias") for k in read_safetensors(path)[0])
    pipe = tiny_pipeline(0)
    base = _outputs(pipe)
    name = load_lora(pipe, path)
    for got, want, plain in zip(_outputs(pipe), _outputs(ref), base):
        assert (want - plain).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    state, header = read_safetensors(path)  # the biases matter: without them, another output
    save_file({k: v for k, v in state.items() if not k.endswith(".bias")}, tmp_path / "no_bias.safetensors", header)
    without_bias = tiny_pipeline(0)
    load_lora(without_bias, tmp_path / "no_bias.safetensors")
    assert (_outputs(without_bias)[1] - _outputs(ref)[1]).abs().max() > 1e-3

    stock = tiny_pipeline(0)
    stock.load_lora_weights(str(path), adapter_name="x")
    stock.set_adapters(["x"], [0.5])
    set_adapters(pipe, {name: 0.5})
    for got, want in zip(_outputs(pipe), _outputs(stock)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    set_adapters(pipe, {name: 0.0})
    for got, plain in zip(_outputs(pipe), base):
        assert torch.equal(got, plain)

    kohya = convert_lora(path, tmp_path / "kohya.safetensors", to="kohya")  # the biases as ComfyUI's .diff_b
    assert any(k.endswith(".diff_b") for k in read_safetensors(kohya)[0])
    converted = tiny_pipeline(0)
    load_lora(converted, kohya)
    for got, want in zip(_outputs(converted), _outputs(ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoraFormatError, match="diffusers"):  # (no lossless diffusers form for the scaled biases)
        convert_lora(path, tmp_path / "back.safetensors", to="diffusers")


def test_peft_lora_bias_on_a_layer_without_a_bias_is_refused(tmp_path):
    _, path = _peft_lora_bias_file(tmp_path / "peft", bias_on_to_q=0.1)
    pipe, before = tiny_pipeline(0), None
    before = base_params(pipe)
    with pytest.raises(LoraFormatError, match=r"to_q\.bias"):
        load_lora(pipe, path)
    after = base_params(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    state, header = read_safetensors(path)  # a bias of another length, even a zero one, is named
    key = next(k for k in state if k.endswith("to_q.lora_B.bias"))
    state[key] = torch.zeros(3)
    save_file(state, tmp_path / "bad.safetensors", header)
    with pytest.raises(LoraFormatError, match=r"to_q\.lora_B\.bias has shape \[3\]"):
        read_lora_file(tmp_path / "bad.safetensors")

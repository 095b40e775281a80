"""LyCORIS LoHa / LoKr / Tucker-LoCon files load as the exact LoRA they equal: PEFT's deltas and outputs on the
same weights, A1111's scale rules, the full-rank fallback, and errors that name the module."""

import pytest
import torch
from safetensors.torch import save_file

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, get_peft_model, inject_adapter_in_model  # noqa: E402

from lora_diffusion import fuse, load_lora  # noqa: E402
from lora_diffusion.formats import LoraFormatError, from_lycoris, read_lora_file  # noqa: E402
from lora_diffusion.formats_kohya import kohya_name  # noqa: E402
from lora_diffusion.inject import lora_layers  # noqa: E402
from lora_diffusion.testing import tiny_pipeline  # noqa: E402
from lora_diffusion.tools import convert_lora, inspect_lora  # noqa: E402

LIN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"
NAMES = {"lin": kohya_name(LIN), "conv": kohya_name(CONV)}


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(256, 192)
        self.conv = torch.nn.Conv2d(64, 96, 3, padding=1)


def _randomize_peft(model, seed: int) -> dict[str, torch.Tensor]:
    """Random LyCORIS factors in ``model``'s PEFT layers; returns them under LyCORIS' per-module names
    (``<module>.hada_w1_a``...), the module part still PEFT's path."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if ".hada_" in name or ".lokr_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            module, role = name.rsplit(".", 2)[:2]
            out[f"{module}.{role}"] = p.detach().clone()
    return out


def _delta(w) -> torch.Tensor:
    return (w.B.flatten(1) @ w.A.flatten(1)) * (w.alpha / w.rank)


CONFIGS = {
    "loha": (LoHaConfig(r=4, alpha=6, target_modules=["lin", "conv"]), 16),
    "loha_tucker": (LoHaConfig(r=4, alpha=6, target_modules=["lin", "conv"], use_effective_conv2d=True), 16),
    "lokr_both_decomposed": (LoKrConfig(r=4, alpha=6, target_modules=["lin", "conv"], decompose_both=True), 16),
    "lokr_tucker": (LoKrConfig(r=4, alpha=6, target_modules=["lin", "conv"], decompose_both=True, use_effective_conv2d=True), None),
    "lokr_w1_full": (LoKrConfig(r=4, alpha=6, target_modules=["lin", "conv"]), None),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_delta_equals_peft(config):
    """Each module's LoRA form, B @ A * alpha / r, is PEFT's delta for the same factors (fp32 rounding), with the
    rank the identities give (the Linear: r * r), not a dense fallback."""
    cfg, rank = CONFIGS[config]
    model = get_peft_model(TwoLayers(), cfg)
    factors = _randomize_peft(model, seed=1)
    state = {f"{NAMES[k.split('.')[-2]]}.{k.rsplit('.', 1)[1]}": t for k, t in factors.items()}
    state.update({f"{name}.alpha": torch.tensor(6.0) for name in NAMES.values()})
    lora = from_lycoris(state)
    for module, key in (("lin", LIN), ("conv", CONV)):
        ref = getattr(model.base_model.model, module).get_delta_weight("default")
        w = lora[key]
        assert w.A.dim() == ref.dim() and w.B.shape[0] == ref.shape[0]
        ours = _delta(w).reshape(ref.shape)
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (config, module)
    if rank is not None:
        assert lora[LIN].rank == rank


def test_a1111_scales():
    """alpha / dim where a factor is decomposed (LoKr: lokr_w2_b's rows), 1 where none is or there is no alpha."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 16, generator=g)
    w2a, w2b = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    cases = {
        "full_alpha": ({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(6.0)}, torch.kron(w1, w2)),
        "decomposed_alpha": ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(6.0)}, 3.0 * torch.kron(w1, w2a @ w2b)),
        "decomposed_no_alpha": ({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, torch.kron(w1, w2a @ w2b)),
        "loha_no_alpha": ({"hada_w1_a": w2a, "hada_w1_b": w2b, "hada_w2_a": w2a.flip(0), "hada_w2_b": w2b}, (w2a @ w2b) * (w2a.flip(0) @ w2b)),
    }
    for case, (parts, expected) in cases.items():
        (w,) = from_lycoris({f"{NAMES['lin']}.{role}": t for role, t in parts.items()}).values()
        torch.testing.assert_close(_delta(w), expected, rtol=1e-5, atol=1e-6, msg=case)


def test_full_rank_fallback_is_exact():
    """A LoHa whose r1 * r2 exceeds the layer's full rank is stored as I @ dW: rank = min(out, in), exact."""
    g = torch.Generator().manual_seed(0)
    parts = {"hada_w1_a": torch.randn(24, 8, generator=g), "hada_w1_b": torch.randn(8, 40, generator=g),
             "hada_w2_a": torch.randn(24, 8, generator=g), "hada_w2_b": torch.randn(8, 40, generator=g), "alpha": torch.tensor(4.0)}  # fmt: skip
    (w,) = from_lycoris({f"{NAMES['lin']}.{role}": t for role, t in parts.items()}).values()
    expected = 0.5 * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    assert w.rank == 24 and torch.equal(w.B, torch.eye(24))
    torch.testing.assert_close(_delta(w), expected, rtol=1e-6, atol=1e-5)


def test_tucker_locon_equals_a1111_formula():
    """LyCORIS LoCon with a Tucker core (``lora_mid``): dW[o, c] = sum up[o, n] mid[n, m] down[m, c] (per tap)."""
    g = torch.Generator().manual_seed(0)
    down, mid, up = torch.randn(4, 64, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), torch.randn(96, 4, 1, 1, generator=g)
    state = {f"{NAMES['conv']}.lora_down.weight": down, f"{NAMES['conv']}.lora_mid.weight": mid,
             f"{NAMES['conv']}.lora_up.weight": up, f"{NAMES['conv']}.alpha": torch.tensor(2.0)}  # fmt: skip
    (w,) = from_lycoris(state).values()
    expected = 0.5 * torch.einsum("nmkl,on,mc->ockl", mid, up.flatten(1), down.flatten(1))
    assert w.A.shape == (4, 64, 3, 3) and w.B.shape == (96, 4, 1, 1)
    torch.testing.assert_close(_delta(w).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def _peft_loha_pipeline(seed: int, tucker: bool):
    """The tiny pipeline with a PEFT LoHa on the UNet's attention projections and resnet convs (1x1 proj_in too,
    flattened as LyCORIS stores it) and on the text encoder's q/v; and a LyCORIS file of the same factors."""
    pipe = tiny_pipeline(0)
    unet_cfg = LoHaConfig(r=2, alpha=3, target_modules=["to_q", "to_v", "conv1", "proj_in"], use_effective_conv2d=tucker)
    pipe.unet = get_peft_model(pipe.unet, unet_cfg).base_model.model
    inject_adapter_in_model(LoHaConfig(r=2, alpha=1, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    state = {}
    for component, model, alpha in (("unet", pipe.unet, 3.0), ("text_encoder", pipe.text_encoder, 1.0)):
        for key, t in _randomize_peft(model, seed).items():
            module, role = key.rsplit(".", 1)
            name = kohya_name(f"{component}.{module}")
            state[f"{name}.{role}"], state[f"{name}.alpha"] = t, torch.tensor(alpha)
    return pipe, state


@pytest.mark.parametrize("tucker", [False, True])
def test_pipeline_equals_peft(tmp_path, tucker):
    """Loaded into the tiny pipeline, a LoHa file gives PEFT's LoHa outputs on the same factors (UNet and text
    encoder), unfused and fused; converted to a kohya LoRA, it is a plain LoRA file with the same outputs."""
    ref, state = _peft_loha_pipeline(seed=3, tucker=tucker)
    path = tmp_path / "loha.safetensors"
    save_file(state, str(path))
    g = torch.Generator().manual_seed(0)
    ids = ref.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])

    def outputs(pipe):
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            return text, pipe.unet(latents, t, encoder_hidden_states=text).sample

    text_ref, unet_ref = outputs(ref)
    pipe = tiny_pipeline(0)
    base_text, base_unet = outputs(pipe)
    assert load_lora(pipe, path) == "loha"
    assert len(dict(lora_layers(pipe.unet))) == len([m for m in ref.unet.modules() if hasattr(m, "hada_w1_a")])
    for fused in (False, True):
        if fused:
            fuse(pipe)
        text, unet = outputs(pipe)
        torch.testing.assert_close(text, text_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unet, unet_ref, rtol=1e-4, atol=1e-4)
    assert (text_ref - base_text).abs().max() > 1e-2 and (unet_ref - base_unet).abs().max() > 1e-2  # it did something

    # converted, a plain LoRA file: kohya's loads in ours, diffusers' in stock diffusers (whose kohya reader wants
    # out_proj among the text encoder's targets to tell the key style), with PEFT's LoHa outputs
    for fmt in ("kohya", "diffusers"):
        out = convert_lora(path, tmp_path / f"as_{fmt}.safetensors", to=fmt)
        assert read_lora_file(out)[1]["_format"] == fmt
        pipe = tiny_pipeline(0)
        if fmt == "kohya":
            load_lora(pipe, out)
        else:
            pipe.load_lora_weights(str(out))
        text, unet = outputs(pipe)
        torch.testing.assert_close(text, text_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(unet, unet_ref, rtol=1e-4, atol=1e-4)
    info = inspect_lora(path)
    n = len([m for m in ref.unet.modules() if hasattr(m, "hada_w1_a")]) + len([m for m in ref.text_encoder.modules() if hasattr(m, "hada_w1_a")])
    assert info["format"] == "lycoris" and info["conv_layers"] > 0 and info["module_kinds"] == {"LoHa": n}


def test_mixed_file_and_errors(tmp_path):
    """A file that mixes LoRA and LoHa modules loads both; a LoHa module without its second half, one module
    with LoHa and LoRA keys, one with LoHa and OFT keys and a factor given as one number are refused, each naming the
    module or key."""
    g = torch.Generator().manual_seed(0)
    loha = {"hada_w1_a": torch.randn(64, 2, generator=g), "hada_w1_b": torch.randn(2, 64, generator=g),
            "hada_w2_a": torch.randn(64, 2, generator=g), "hada_w2_b": torch.randn(2, 64, generator=g)}  # fmt: skip
    q = kohya_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    k = kohya_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k")
    state = {**{f"{q}.{r}": t for r, t in loha.items()}, f"{k}.lora_down.weight": torch.randn(2, 64, generator=g),
             f"{k}.lora_up.weight": torch.randn(64, 2, generator=g), f"{k}.alpha": torch.tensor(1.0)}  # fmt: skip
    lora = from_lycoris(state)
    assert len(lora) == 2 and lora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"].alpha == 1.0
    save_file(state, str(tmp_path / "mixed.safetensors"))
    pipe = tiny_pipeline(0)
    load_lora(pipe, tmp_path / "mixed.safetensors")
    assert len(dict(lora_layers(pipe.unet))) == 2

    def refused(bad: dict, match: str):
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(LoraFormatError, match=match):
            read_lora_file(tmp_path / "bad.safetensors")

    refused({f"{q}.hada_w1_a": loha["hada_w1_a"], f"{q}.hada_w1_b": loha["hada_w1_b"]}, f"{q} is LoHa but has no hada_w2_a, hada_w2_b")
    refused({**{f"{q}.{r}": t for r, t in loha.items()}, f"{q}.lora_down.weight": torch.zeros(2, 64)}, f"{q} mixes LoHa and LoRA keys")
    refused({**{f"{q}.{r}": t for r, t in loha.items()}, f"{q}.oft_blocks": torch.ones(4, 16, 16)}, f"{q} mixes LoHa and OFT keys")
    refused({**{f"{q}.{r}": t for r, t in loha.items()}, f"{q}.hada_w2_b": torch.zeros(2, 63)}, f"{q} has LoHa halves that do not fit together")
    refused({f"{q}.lokr_w1": torch.zeros(2, 2), f"{q}.lokr_w2_a": torch.zeros(16, 2)}, f"{q} is LoKr but has neither lokr_w2 nor both")
    # a factor given as one number (an IndexError from deep inside before)
    refused({**{f"{q}.{r}": t for r, t in loha.items()}, f"{q}.hada_w1_b": torch.tensor(1.5)}, f"{q} has hada_w1_b as a single number")
    refused({f"{q}.lokr_w1": torch.tensor(2.0), f"{q}.lokr_w2": torch.zeros(32, 64)}, f"{q} has lokr_w1 as a single number")


def test_flattened_factors_fit_the_layer(tmp_path):
    """As A1111 reads them: a conv's factors stored flattened (a 1x1 proj_in's as a Linear's) and a Linear's stored
    as a 1x1 conv's load, with the delta of the factors reshaped; a flattened factor of the wrong width is refused."""
    g = torch.Generator().manual_seed(0)
    proj_in, to_q = "unet.down_blocks.1.attentions.0.proj_in", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    state = {f"{kohya_name(proj_in)}.lora_down.weight": down, f"{kohya_name(proj_in)}.lora_up.weight": up,
             f"{kohya_name(to_q)}.lora_down.weight": down[:, :, None, None].clone(), f"{kohya_name(to_q)}.lora_up.weight": up[:, :, None, None].clone()}  # fmt: skip
    save_file(state, str(tmp_path / "flat.safetensors"))
    pipe = tiny_pipeline(0)
    module = {p: p.split(".", 1)[1] for p in (proj_in, to_q)}
    before = {p: pipe.unet.get_submodule(module[p]).weight.detach().clone() for p in (proj_in, to_q)}
    load_lora(pipe, tmp_path / "flat.safetensors")
    fuse(pipe)
    for p in (proj_in, to_q):
        delta = pipe.unet.get_submodule(module[p]).weight.detach() - before[p]
        torch.testing.assert_close(delta.reshape(64, 64), up @ down, rtol=1e-5, atol=1e-5)
    state[f"{kohya_name(proj_in)}.lora_down.weight"] = torch.randn(2, 63, generator=g)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFormatError, match=r"proj_in: file has down \(2, 63\)"):
        load_lora(tiny_pipeline(0), tmp_path / "bad.safetensors")


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_comfyui_named_files_load_as_their_kohya_twins(tmp_path, sdxl):
    """A LoRA under ComfyUI's own names (``diffusion_model.<LDM path>``, ``text_encoders.clip_l/clip_g.transformer.``,
    as its LoraSave and training nodes write) reads as the same canonical LoRA as the kohya file, LoHa modules too,
    and loads with the same outputs; a bias delta (``.diff_b``) goes into the bias."""
    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.formats_kohya import ldm_module_path, ldm_unet_prefixes
    from lora_diffusion.testing import random_lora, tiny_sdxl_pipeline

    make = tiny_sdxl_pipeline if sdxl else tiny_pipeline
    pipe = make(0)
    lora = random_lora(pipe, seed=4, rank=2, alpha=3, unet_targets="full")
    unet = pipe.unet
    prefixes = ldm_unet_prefixes(2, len(unet.down_blocks), [hasattr(b, "attentions") for b in unet.up_blocks])
    encoders = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    state = {}
    for key, w in lora.items():
        component, _, path = key.partition(".")
        name = (f"diffusion_model.{ldm_module_path(path, prefixes)}" if component == "unet"
                else f"text_encoders.{encoders[component]}.transformer.{path}")
        state.update({f"{name}.lora_down.weight": w.A.float(), f"{name}.lora_up.weight": w.B.float(), f"{name}.alpha": torch.tensor(w.alpha)})
    g = torch.Generator().manual_seed(0)  # and one LoHa module, a resnet conv
    conv = unet.down_blocks[0].resnets[0].conv1
    loha_name = f"diffusion_model.{ldm_module_path('down_blocks.0.resnets.0.conv1', prefixes)}"
    loha = {"hada_w1_a": torch.randn(conv.out_channels, 2, generator=g), "hada_w1_b": torch.randn(2, conv.weight[0].numel(), generator=g),
            "hada_w2_a": torch.randn(conv.out_channels, 2, generator=g), "hada_w2_b": torch.randn(2, conv.weight[0].numel(), generator=g)}  # fmt: skip
    state = {k: v for k, v in state.items() if not k.startswith(loha_name + ".")}
    state.update({f"{loha_name}.{role}": t for role, t in loha.items()})
    save_file(state, str(tmp_path / "comfy.safetensors"))
    ours, header = read_lora_file(tmp_path / "comfy.safetensors")
    assert header["_format"] == "comfyui" and ours.keys() == lora.keys()
    for key, w in lora.items():
        if key == "unet.down_blocks.0.resnets.0.conv1":
            expected = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
            torch.testing.assert_close(_delta(ours[key]), expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ours[key].A, w.A.float()) and torch.equal(ours[key].B, w.B.float()) and ours[key].alpha == w.alpha
    write_lora_file(tmp_path / "kohya.safetensors", ours, format="kohya", dtype=torch.float32)
    outputs = []
    for file in ("comfy", "kohya"):
        p = make(0)
        load_lora(p, tmp_path / f"{file}.safetensors", adapter="x")
        fuse(p)
        outputs.append(torch.cat([t.flatten() for t in p.unet.state_dict().values()]))
    assert torch.equal(outputs[0], outputs[1])
    bias = f"{loha_name.replace('in_layers.2', 'emb_layers.1')}.diff_b"
    save_file({**state, bias: torch.full((conv.out_channels,), 0.25)}, str(tmp_path / "bias.safetensors"))
    assert read_lora_file(tmp_path / "bias.safetensors")[1]["_param_deltas"] == "1"
    p = make(0)
    b0 = p.unet.down_blocks[0].resnets[0].time_emb_proj.bias.detach().clone()
    load_lora(p, tmp_path / "bias.safetensors")  # the bias delta goes into the bias (tests/test_param_deltas.py)
    assert torch.equal(p.unet.down_blocks[0].resnets[0].time_emb_proj.base_layer.bias, b0 + 0.25)


def test_a_float16_loha_keeps_float16_precision():
    """Read from float16, the LoRA form is float16 too (as the file), each rank-one pair balanced to equal norms: the
    up factor of a LoHa is a product of two up factors and the scale, which unbalanced falls into float16's
    subnormal range (here ~2e-6) while the down factor sits at ~4e-5."""
    g = torch.Generator().manual_seed(0)
    parts = {f"hada_w{i}_{s}": (torch.randn(*shape, generator=g) * 0.01).half()
             for i in (1, 2) for s, shape in (("a", (320, 16)), ("b", (16, 320)))}  # fmt: skip
    (w,) = from_lycoris({**{f"{NAMES['lin']}.{r}": t for r, t in parts.items()}, f"{NAMES['lin']}.alpha": torch.tensor(1.0)}).values()
    f = {k: v.float() for k, v in parts.items()}
    expected = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) / 16
    assert w.A.dtype == w.B.dtype == torch.float16 and w.rank == 256
    error = (_delta(w.__class__(w.A.float(), w.B.float(), w.alpha)) - expected).norm() / expected.norm()
    assert error < 1.5e-3, error  # measured: 9.6e-4 (unbalanced: 2.7e-3)

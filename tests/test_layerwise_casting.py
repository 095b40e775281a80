"""LoRAs on a model whose weights are stored in fp8 (A1111's "FP8 weight": diffusers' ``enable_layerwise_casting``
or our ``fp8.store_fp8``), enabled before or after loading: the unfused output is PEFT's, the factors stay in the compute dtype, fusing
rounds ``W0 + delta`` to fp8 once, re-weighting while fused equals fusing afresh and unfusing restores the fp8
weights bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.formats import write_lora_file
from lora_diffusion.fp8 import store_fp8
from lora_diffusion.inject import lora_layers
from lora_diffusion.layers import LoraLinear
from lora_diffusion.testing import random_lora, tiny_pipeline

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("lwc")
    paths = []
    for seed in (1, 2):
        paths.append(str(folder / f"style{seed}.safetensors"))
        write_lora_file(paths[-1], random_lora(tiny_pipeline(0), seed=seed, unet_targets="attn", text_encoder_targets=None),
                        dtype=torch.float32)
    return paths


def _cast(pipe, compute: torch.dtype, how: str = "diffusers") -> None:
    """The UNet's weights stored in fp8: by diffusers' layerwise casting (its default skips: norms, proj_in / out),
    or by ``fp8.store_fp8`` (every Linear / Conv2d weight, as A1111's FP8 weight)."""
    if how == "diffusers":
        pipe.unet.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=compute)
    else:
        store_fp8([("unet", pipe.unet)], compute)


def _call(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x.to(pipe.text_encoder.dtype), 500, states.to(pipe.text_encoder.dtype)).sample


@pytest.mark.parametrize("how", ["diffusers", "ours"])
@pytest.mark.parametrize("order", ["cast_then_load", "load_then_cast"])
def test_unfused_loras_on_fp8_weights_are_peft_s(files, order, how):
    """fp32 compute, fp8 storage: ours (either order) equals diffusers+PEFT's to fp32 rounding, in the compute dtype
    with the weights in fp8 between calls; one adapter and two blended. PEFT's: under the same layerwise casting,
    which it takes only after loading; or, for ``store_fp8``, on the model with the same weights rounded to fp8."""
    ours, peft = tiny_pipeline(0), tiny_pipeline(0)
    if how == "ours":
        for module in peft.unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.data = module.weight.data.to(FP8).float()
    for name, path in zip(("a", "b"), files):
        peft.load_lora_weights(path, adapter_name=name)
    if how == "diffusers":
        _cast(peft, torch.float32)
    if order == "cast_then_load":
        _cast(ours, torch.float32, how)
    for name, path in zip(("a", "b"), files):
        ld.load_lora(ours, path, adapter=name)
    if order == "load_then_cast":
        _cast(ours, torch.float32, how)
    layers = [layer for _, layer in lora_layers(ours.unet)]
    assert layers and all(layer.base_layer.weight.dtype == FP8 for layer in layers)
    assert all(p.dtype == torch.float32 for layer in layers for p in (*layer.lora_A.values(), *layer.lora_B.values()))
    for weights in ({"a": 0.8}, {"a": 0.7, "b": -0.4}):
        ld.set_adapters(ours, weights)
        peft.set_adapters(list(weights), list(weights.values()))
        torch.testing.assert_close(_call(ours), _call(peft), rtol=0, atol=2e-5)
        assert all(layer.base_layer.weight.dtype == FP8 for layer in layers)
    ld.disable_lora(ours)  # disabled: the fp8 base model itself
    base = tiny_pipeline(0)
    _cast(base, torch.float32, how)
    assert torch.equal(_call(ours), _call(base))


@pytest.mark.parametrize("how", ["diffusers", "ours"])
def test_fusing_into_fp8_weights_rounds_once_and_unfuses_exactly(files, how):
    """bf16 compute: fused, each weight is ``W0 + delta`` (fp32) rounded to fp8 once; a re-weight while fused equals
    fusing afresh; unfusing gives the fp8 weights back bit for bit; the fused call is near the unfused one (the
    delta rounded to fp8's 3 mantissa bits)."""
    pipe = tiny_pipeline(0).to(torch.bfloat16)
    _cast(pipe, torch.bfloat16, how)
    for name, path in zip(("a", "b"), files):
        ld.load_lora(pipe, path, adapter=name)
    layers = [layer for _, layer in lora_layers(pipe.unet)]
    originals = [layer.base_layer.weight.detach().clone() for layer in layers]
    ld.set_adapters(pipe, {"a": 0.8, "b": 0.5})
    unfused = _call(pipe)
    ld.fuse(pipe)
    assert not any(isinstance(m, LoraLinear) for m in pipe.unet.modules())  # (the wrappers out: the base's calls)

    def expected(weights):
        return [(w0.float() + layer.delta_weight(list(weights), weights)).to(FP8) for layer, w0 in zip(layers, originals)]

    fused = [layer.base_layer.weight for layer in layers]
    assert all(w.dtype == FP8 and torch.equal(w.view(torch.uint8), e.view(torch.uint8))
               for w, e in zip(fused, expected({"a": 0.8, "b": 0.5})))
    assert sum(not torch.equal(w.view(torch.uint8), w0.view(torch.uint8)) for w, w0 in zip(fused, originals)) > len(layers) // 2
    out = _call(pipe)
    assert (out.float() - unfused.float()).abs().max() < 0.1 * unfused.float().abs().max()
    ld.set_adapters(pipe, {"a": -0.3, "b": 1.0})
    assert all(torch.equal(layer.base_layer.weight.view(torch.uint8), e.view(torch.uint8))
               for layer, e in zip(layers, expected({"a": -0.3, "b": 1.0})))
    ld.unfuse(pipe)
    assert all(torch.equal(layer.base_layer.weight.view(torch.uint8), w0.view(torch.uint8)) for layer, w0 in zip(layers, originals))
    ld.set_adapters(pipe, {"a": 0.8, "b": 0.5})
    assert torch.equal(_call(pipe), unfused)


def test_a_dora_layer_on_an_fp8_weight_is_refused_by_name():
    from diffusers.hooks import apply_layerwise_casting

    model = nn.Sequential(LoraLinear(nn.Linear(4, 4)))
    model[0].add_adapter("dora", rank=2, dora=True)
    apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=torch.float32, skip_modules_pattern=("lora_",))
    assert model[0].base_layer.weight.dtype == FP8 and model[0].lora_A["dora"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"DoRA adapter\(s\) \['dora'\] need the base weight, which is stored in fp8"):
        model(torch.ones(1, 4))


def test_a_dora_file_loaded_onto_fp8_weights_acts_on_the_fp8_weights(tmp_path):
    """DoRA (and OFT, GLoRA: deltas computed from the weight they are loaded onto) on weights stored in fp8: the
    delta of the fp8 weight, widened to fp32: the model with those weights rounded to fp8 and kept in fp32 gives the
    same output."""
    from test_dora import _outputs, _peft_dora_file

    _, path = _peft_dora_file(tmp_path)
    stored = tiny_pipeline(0)
    _cast(stored, torch.float32)
    hooked = {name for name, module in stored.unet.named_modules() if getattr(module, "_diffusers_hook", None) is not None}
    rounded = tiny_pipeline(0)
    for name, module in rounded.unet.named_modules():
        if name in hooked:
            for p in module.parameters(recurse=False):
                p.data = p.data.to(FP8).float()
    for pipe in (stored, rounded):
        ld.load_lora(pipe, path)
    assert {name.removesuffix(".base_layer") for name, m in stored.unet.named_modules() if getattr(m, "_diffusers_hook", None)} == hooked
    torch.testing.assert_close(_outputs(stored)[1], _outputs(rounded)[1], rtol=0, atol=1e-5)

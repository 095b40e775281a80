"""Invariants of the LoRA layers themselves (no diffusers needed)."""

import pytest
import torch
from torch import nn

from lora_diffusion.layers import LoraConv2d, LoraLinear


def _with_adapters(layer, specs, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, (rank, alpha) in specs.items():
        layer.add_adapter(name, rank=rank, alpha=alpha)
        with torch.no_grad():
            layer.lora_A[name].copy_(torch.randn(layer.lora_A[name].shape, generator=g))
            layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g))
    return layer


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(16, 12)


def _conv(seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(6, 8, 3, stride=2, padding=1)


@pytest.mark.parametrize("make, x", [(_linear, torch.randn(3, 5, 16)), (_conv, torch.randn(2, 6, 9, 9))])
def test_fresh_adapter_changes_nothing(make, x):
    base = make()
    layer = (LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make())
    layer.add_adapter("a", rank=4, alpha=7)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A["a"].abs().sum() > 0  # A is random, only B is zero


def test_linear_forward_matches_formula():
    layer = _with_adapters(LoraLinear(_linear()), {"a": (4, 8.0)})
    layer.weights["a"] = 0.7
    x = torch.randn(5, 16)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w.T + b + 0.7 * (8.0 / 4) * (x @ layer.lora_A["a"].T @ layer.lora_B["a"].T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, x", [(_linear, torch.randn(4, 16)), (_conv, torch.randn(2, 6, 9, 9))])
def test_two_adapters_equal_sum_of_weighted_deltas(make, x):
    base = make()
    layer = _with_adapters((LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make()), {"a": (2, 3.0), "b": (5, 5.0)})
    layer.set_weights({"a": 0.3, "b": -0.9})
    dense = make()
    with torch.no_grad():
        dense.weight += layer.delta_weight()
        d_a = layer.delta_weight(["a"], {"a": 1.0})
        d_b = layer.delta_weight(["b"], {"b": 1.0})
    torch.testing.assert_close(layer.delta_weight(), 0.3 * d_a - 0.9 * d_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)
    # the concatenated path equals one adapter at a time
    only_a = _with_adapters((LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make()), {"a": (2, 3.0), "b": (5, 5.0)})
    only_a.set_weights({"a": 0.3})
    only_b = _with_adapters((LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make()), {"a": (2, 3.0), "b": (5, 5.0)})
    only_b.set_weights({"b": -0.9})
    torch.testing.assert_close(layer(x), only_a(x) + only_b(x) - base(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make, wrapper, x", [(_linear, LoraLinear, torch.randn(7, 16)), (_conv, LoraConv2d, torch.randn(2, 6, 9, 9))],
                         ids=["linear", "conv"])
def test_fuse_equals_unfused_and_unfuse_is_exact(make, wrapper, x):
    layer = _with_adapters(wrapper(make()), {"a": (4, 8.0), "b": (2, 2.0)})
    layer.set_weights({"a": 0.5, "b": 1.5})
    w0 = layer.base_layer.weight.detach().clone()
    unfused = layer(x)
    layer.fuse()
    assert not torch.equal(layer.base_layer.weight, w0)
    # to fp32 rounding of sums whose terms reach the output's largest values (~75 here: ulp 8e-6), which both
    # sides round differently (unfused inference runs through its own merged weight, formed by another GEMM)
    torch.testing.assert_close(layer(x), unfused, rtol=1e-5, atol=1e-6 * unfused.abs().max().item())
    # re-weighting while fused equals fusing afresh, bit for bit
    layer.set_weights({"a": -0.25, "b": 2.0})
    reweighted = layer.base_layer.weight.detach().clone()
    fresh = _with_adapters(wrapper(make()), {"a": (4, 8.0), "b": (2, 2.0)})
    fresh.set_weights({"a": -0.25, "b": 2.0})
    fresh.fuse()
    assert torch.equal(reweighted, fresh.base_layer.weight)
    layer.unfuse()
    assert torch.equal(layer.base_layer.weight, w0)


def test_cache_follows_in_place_updates():
    layer = _with_adapters(LoraLinear(_linear()), {"a": (2, 2.0), "b": (2, 2.0)})
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].mul_(2.0)  # e.g. an optimizer step or load_state_dict
        after = layer(x)
    assert not torch.allclose(before, after)
    expected = layer.base_layer(x) + sum(
        (x @ layer.lora_A[n].T @ layer.lora_B[n].T) * layer.specs[n].scale for n in ("a", "b")
    )
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_conv_lora_matches_dense_delta():
    layer = _with_adapters(LoraConv2d(_conv()), {"a": (3, 6.0)})
    x = torch.randn(2, 6, 9, 9)
    dense = _conv()
    with torch.no_grad():
        dense.weight += layer.delta_weight()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)


def test_rank_larger_than_layer_raises():
    with pytest.raises(ValueError, match="rank 13 is larger than this layer allows"):
        LoraLinear(_linear()).add_adapter("a", rank=13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_with_fp32_lora(dtype):
    layer = _with_adapters(LoraLinear(_linear().to(dtype)), {"a": (4, 4.0)})
    assert layer.lora_A["a"].dtype == torch.float32
    x = torch.randn(4, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = layer.base_layer(x).float() + (x.float() @ layer.lora_A["a"].T @ layer.lora_B["a"].T)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    w0 = layer.base_layer.weight.detach().clone()
    layer.fuse()
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=3e-2, atol=3e-2)
    layer.unfuse()
    assert torch.equal(layer.base_layer.weight, w0)


def test_nan_adapter_refuses_to_fuse():
    layer = _with_adapters(LoraLinear(_linear()), {"a": (2, 2.0)})
    with torch.no_grad():
        layer.lora_B["a"][0, 0] = float("nan")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.fuse()
    assert torch.equal(layer.base_layer.weight, w0)


def _kohya_forward(org, down, up, x, scale, multiplier, dropout, rank_dropout, module_dropout):
    """sd-scripts' ``LoRAModule.forward`` in training (networks/lora.py), written out as the reference."""
    org_forwarded = org(x)
    if module_dropout is not None and torch.rand(1) < module_dropout:
        return org_forwarded
    lx = down(x)
    if dropout is not None:
        lx = torch.nn.functional.dropout(lx, p=dropout)
    if rank_dropout is not None:
        mask = torch.rand((lx.size(0), down.weight.shape[0]), device=lx.device) > rank_dropout
        if len(lx.size()) == 3:
            mask = mask.unsqueeze(1)
        elif len(lx.size()) == 4:
            mask = mask.unsqueeze(-1).unsqueeze(-1)
        lx = lx * mask
        scale = scale * (1.0 / (1.0 - rank_dropout))
    return org_forwarded + up(lx) * multiplier * scale


@pytest.mark.parametrize("make, x", [(_linear, torch.randn(3, 5, 16)), (_linear, torch.randn(7, 16)),
                                     (_conv, torch.randn(2, 6, 9, 9))])
def test_kohya_dropouts_are_sd_scripts_forward_and_eval_drops_nothing(make, x):
    """``LoraDropout``'s neuron, rank and module dropouts give kohya's training forward bit for bit from the same
    seed (its draws, in its order, on the CPU); a dropped module adds nothing; in eval mode the adapter is the
    plain one; a float is still PEFT's input dropout."""
    from lora_diffusion import LoraDropout

    base = make()
    layer = (LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make())
    layer.add_adapter("k", rank=4, alpha=2.0, dropout=LoraDropout(neuron=0.25, rank=0.5, module=0.3), weight=0.7)
    plain = _with_adapters((LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make()), {"k": (4, 2.0)})
    with torch.no_grad():
        layer.lora_A["k"].copy_(plain.lora_A["k"])
        layer.lora_B["k"].copy_(plain.lora_B["k"])
    if isinstance(base, nn.Linear):
        down, up = nn.Linear(16, 4, bias=False), nn.Linear(4, 12, bias=False)
    else:
        down, up = nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 8, 1, bias=False)
    down.weight.data, up.weight.data = plain.lora_A["k"].data, plain.lora_B["k"].data
    dropped = kept = 0
    for seed in range(12):
        torch.manual_seed(seed)
        ours = layer(x)
        torch.manual_seed(seed)
        ref = _kohya_forward(base, down, up, x, 0.5, 0.7, 0.25, 0.5, 0.3)
        assert torch.equal(ours, ref), seed
        dropped += torch.equal(ours, base(x))
        kept += not torch.equal(ours, base(x))
    assert dropped and kept  # the module dropout (0.3) fell both ways in 12 draws
    layer.eval()
    plain.set_weights({"k": 0.7})
    assert torch.equal(layer(x), plain(x))
    rank_only = (LoraLinear if isinstance(base, nn.Linear) else LoraConv2d)(make())
    rank_only.add_adapter("k", rank=4, alpha=2.0, dropout=LoraDropout(rank=0.5))
    with torch.no_grad():
        rank_only.lora_B["k"].normal_()
    torch.manual_seed(0)
    first = rank_only(x)
    torch.manual_seed(1)
    assert not torch.equal(first, rank_only(x))  # each call draws its own rows
    # a LoraDropout of the input alone is PEFT's nn.Dropout; none at all is no module
    only_input = LoraLinear(nn.Linear(4, 4))
    only_input.add_adapter("a", rank=2, dropout=LoraDropout(input=0.1))
    only_input.add_adapter("b", rank=2, dropout=LoraDropout())
    assert type(only_input.lora_dropout["a"]) is nn.Dropout and only_input.lora_dropout["a"].p == 0.1
    assert type(only_input.lora_dropout["b"]) is nn.Identity
    with pytest.raises(ValueError, match="rank must be a probability"):
        LoraDropout(rank=1.0)
    with pytest.raises(ValueError, match="DoRA"):
        LoraLinear(nn.Linear(4, 4)).add_adapter("d", rank=2, dora=True, dropout=LoraDropout(module=0.1))

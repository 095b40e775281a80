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

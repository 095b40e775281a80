"""--fp8_base's layers: the same outputs and input gradients as kohya's (autocast casting each fp8 weight), without
the compute-dtype copy of each weight that autocast keeps for the backward; back to the plain layers after."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_diffusion.inject import inject_lora
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.fp8 import FP8, Fp8Conv2d, Fp8Linear, restore_fp8, store_fp8
from lora_diffusion.layers import compute_dtype

LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), (3, 7, 24)),
    "conv": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 9)),
    "conv_stride2": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 9, 9)),  # (SD's downsamplers; odd size)
    "conv_1x1_grouped": (lambda: nn.Conv2d(8, 16, 1, groups=2, bias=False), (2, 8, 5, 5)),
}


def _weight_copies(model: nn.Module, run) -> int:
    """Bytes of the tensors autograd saves for the backward during ``run()`` that have the shape of one of
    ``model``'s Linear / Conv2d weights and are not a parameter's storage: the layers' weight copies."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if tuple(t.shape) in shapes and storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


@pytest.mark.parametrize("name", LAYERS)
def test_an_fp8_layer_computes_as_autocast_on_its_fp8_weight(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().to(torch.bfloat16).requires_grad_(False)
    kohya = copy.deepcopy(layer)
    kohya.weight.data = kohya.weight.data.to(FP8)  # kohya's: the fp8 weight, autocast casts it at each call
    (ours,) = store_fp8([("m", layer)], torch.bfloat16)
    assert ours is layer and type(layer) in (Fp8Linear, Fp8Conv2d) and layer.weight.dtype == FP8
    assert torch.equal(layer.weight.view(torch.uint8), kohya.weight.view(torch.uint8))
    x = torch.randn(shape, requires_grad=True)  # fp32 in, as a LayerNorm / GroupNorm output under autocast
    outputs, grads = [], []
    for module in (layer, kohya):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
        outputs.append(out)
        grads.append(grad)
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16 and torch.equal(outputs[0], outputs[1])
    assert grads[0].dtype == torch.float32
    # the input gradient: the same matmul for a Linear; a transposed convolution against the convolution's own
    # backward for a Conv2d (the same products, summed in another order)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0 if name == "linear" else 1e-2)
    assert (grads[0] - grads[1]).abs().max() <= grads[1].abs().max() * (0 if name == "linear" else 2e-3)
    with torch.no_grad():  # outside autocast: in the input's dtype
        assert torch.equal(layer(x.detach().to(torch.bfloat16)), kohya._conv_forward(x.detach().to(torch.bfloat16), kohya.weight.to(torch.bfloat16), kohya.bias)
                           if isinstance(kohya, nn.Conv2d) else nn.functional.linear(x.detach().to(torch.bfloat16), kohya.weight.to(torch.bfloat16), kohya.bias))
    assert compute_dtype(layer) == torch.bfloat16
    restore_fp8([layer], torch.bfloat16)
    assert not hasattr(layer, "fp8_compute_dtype") and type(layer) is type(kohya) and layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, kohya.weight.to(torch.bfloat16))


def test_an_fp8_unet_keeps_no_compute_dtype_weight_copies_for_the_backward():
    """A LoRA step through the tiny UNet: kohya's autocast path keeps a bf16 copy of each fp8 weight that a
    gradient passes until the backward (with the fp8 weights, more than the bf16 model's weights); ours keeps none, and the LoRA gradients equal
    kohya's up to the convolution backward's summation order."""
    runs = {}
    for kind in ("kohya", "ours"):
        unet = tiny_pipeline(0).unet.requires_grad_(False).to(torch.bfloat16)
        params = inject_lora(unet, rank=4)
        torch.manual_seed(1)
        for p in params:
            nn.init.normal_(p, std=0.1)
        if kind == "ours":
            layers = store_fp8([("unet", unet)], torch.bfloat16)
            assert {type(m) for m in layers} == {Fp8Linear, Fp8Conv2d}
        else:
            for module in unet.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.requires_grad:
                    module.weight.data = module.weight.data.to(FP8)
        torch.manual_seed(2)
        x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

        def step(unet=unet, params=params, x=x, context=context):
            for p in params:
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = unet(x, 10, context).sample
            out.float().square().mean().backward()

        weights = sum(m.weight.untyped_storage().nbytes() for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                      and not m.weight.requires_grad)
        runs[kind] = (_weight_copies(unet, step), weights, [p.grad.clone() for p in params])
    (kohya_copies, fp8_bytes, kohya_grads), (our_copies, _, our_grads) = runs["kohya"], runs["ours"]
    assert fp8_bytes + kohya_copies > 2 * fp8_bytes and our_copies == 0  # (2x: the weights in bf16)
    for ours, theirs in zip(our_grads, kohya_grads):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=1e-3 * float(theirs.abs().max()) + 1e-6)


def test_fp8_layers_compile_without_graph_breaks():
    """``--fp8_base --compile``: dynamo traces the fp8 layers whole; the compiled output and input gradient are
    the eager ones."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).requires_grad_(False)
    store_fp8([("m", model)], torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for run in (compiled, model):
        x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(x)
        out.float().sum().backward()
        results.append((out, x.grad))
    assert not counters["graph_break"]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_weight_past_fp8s_range_is_refused_by_name_and_nothing_changes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(2, 2, 1)).requires_grad_(False)
    with torch.no_grad():
        model[1].weight[0, 0] = 500.0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^unet.1.weight holds 500, past float8_e4m3fn's range \(\+-448\)$"):
        store_fp8([("unet", model)], torch.float32)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())
    assert [type(m) for m in model] == [nn.Linear, nn.Conv2d] and not hasattr(model[0], "fp8_compute_dtype")
    with torch.no_grad():
        model[1].weight[0, 0] = 1.0
    layers = store_fp8([("unet", model)], torch.float32)
    assert [m.weight.dtype for m in layers] == [FP8] * 2 and model[0].bias.dtype == torch.float32
    assert [compute_dtype(m) for m in layers] == [torch.float32] * 2


def test_layers_that_cannot_run_as_fp8_layers_are_left_as_they_are():
    """A Linear subclass (its own forward) and a reflect-padded Conv2d keep their class and dtype: stored in fp8
    they would need autocast at every call."""

    class Custom(nn.Linear):
        pass

    model = nn.Sequential(Custom(2, 2), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Linear(2, 2))
    layers = store_fp8([("m", model)], torch.float32)
    assert layers == [model[2]] and type(model[2]) is Fp8Linear
    assert [type(m) for m in model[:2]] == [Custom, nn.Conv2d] and {m.weight.dtype for m in model[:2]} == {torch.float32}

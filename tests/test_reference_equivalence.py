"""Our numbers equal the references: PEFT-injected models, and stock diffusers loading our files (and v.v.)."""

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

from lora_diffusion import inject_lora, load_lora, save_lora  # noqa: E402
from lora_diffusion.formats import read_safetensors  # noqa: E402
from lora_diffusion.inject import lora_layers  # noqa: E402
from lora_diffusion.testing import tiny_pipeline  # noqa: E402

from conftest import generate, randomize_lora, save_peft_lora  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _copy_ours_into_peft(ours, theirs):
    """Copy our A/B factors into the PEFT layer at the same module path."""
    peft_modules = dict(theirs.named_modules())
    for path, layer in lora_layers(ours):
        target = peft_modules[path]
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(layer.lora_A["default"])
            target.lora_B["default"].weight.copy_(layer.lora_B["default"])


def _layer_inputs(model) -> dict[str, torch.Tensor]:
    """Run-time inputs of each LoRA layer of ``model`` (first call), captured by hooks during the caller's run."""
    inputs: dict[str, torch.Tensor] = {}
    def keep(path: str):
        def hook(_module, args) -> None:  # (returning the input would replace it)
            inputs.setdefault(path, args[0].detach())
        return hook

    for path, layer in lora_layers(model):
        layer.register_forward_pre_hook(keep(path))
    return inputs


def test_unet_and_text_encoder_equal_peft():
    """The same weights give PEFT's outputs: exactly in fp64 end to end (only the maths can differ there), and each
    LoRA layer to fp32 rounding on the inputs it sees in the fp32 run. (End to end in fp32 both we and PEFT sit
    ~3e-3 from the fp64 result: this random tiny UNet grows a last-bit difference in any layer ~1e4 fold, so an
    fp32 comparison of whole outputs only tells whether the op order is PEFT's.)"""
    ours, ref = tiny_pipeline(0), tiny_pipeline(0)
    inject_lora(ours.unet, rank=4, alpha=8)
    inject_lora(ours.text_encoder, rank=2, alpha=3)
    randomize_lora(ours.unet, seed=1)
    randomize_lora(ours.text_encoder, seed=2)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS), ref.text_encoder)
    _copy_ours_into_peft(ours.unet, ref.unet)
    _copy_ours_into_peft(ours.text_encoder, ref.text_encoder)

    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    inputs = {"unet": _layer_inputs(ours.unet), "te": _layer_inputs(ours.text_encoder)}
    with torch.no_grad():
        base_te = tiny_pipeline(0).text_encoder(ids)[0]
        te_ours = ours.text_encoder(ids)[0]
        ours.unet(sample, 500, encoder_hidden_states=cond)
    assert not torch.allclose(te_ours, base_te, atol=1e-3)  # the adapters really act
    for part, model, peft_model in (("unet", ours.unet, ref.unet), ("te", ours.text_encoder, ref.text_encoder)):
        assert len(inputs[part]) == len(list(lora_layers(model))) > 0
        peft_layers = dict(peft_model.named_modules())
        for path, x in inputs[part].items():
            with torch.no_grad():
                got, expect = model.get_submodule(path)(x), peft_layers[path](x)
            assert (got - expect).abs().max() <= 2e-6 * expect.abs().max(), (part, path)

    ours.to(torch.float64)
    ref.to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], ref.text_encoder(ids)[0], rtol=1e-10, atol=1e-10)
        args = (sample.double(), 500)
        u_ours = ours.unet(*args, encoder_hidden_states=cond.double()).sample
        u_ref = ref.unet(*args, encoder_hidden_states=cond.double()).sample
    torch.testing.assert_close(u_ours, u_ref, rtol=1e-10, atol=1e-10)


def _trained_lora_file(tmp_path, rank=4, alpha=8, te_rank=2, te_alpha=6):
    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=rank, alpha=alpha)
    inject_lora(pipe.text_encoder, rank=te_rank, alpha=te_alpha)
    randomize_lora(pipe.unet, seed=3)
    randomize_lora(pipe.text_encoder, seed=4)
    path = tmp_path / "style.safetensors"
    save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder, dtype=torch.float32, metadata={"trigger_words": ["<s1>"]})
    return path


def test_our_file_loads_in_stock_diffusers_with_alpha(tmp_path):
    path = _trained_lora_file(tmp_path)
    base = generate(tiny_pipeline(0))
    ours = tiny_pipeline(0)
    load_lora(ours, path)
    ref = tiny_pipeline(0)
    ref.load_lora_weights(str(path))
    ids = ours.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    a, b = generate(ours), generate(ref)
    assert abs(a - base).max() > 0.05  # the LoRA changes the image
    # the same image up to fp32 rounding (measured 4e-4: a last-bit difference grows ~1e4 fold in this random tiny
    # model, see above); a misread alpha moves it by 0.6-0.7
    assert abs(a - b).max() < 1e-3
    ours.to(torch.float64)
    ref.to(torch.float64)
    with torch.no_grad():  # in fp64 the same maths is the same numbers (alpha 6 / rank 2: a scale of 3)
        torch.testing.assert_close(ours.text_encoder(ids)[0], ref.text_encoder(ids)[0], rtol=1e-10, atol=1e-10)
    assert abs(generate(ours) - generate(ref)).max() < 1e-6


def test_diffusers_file_from_peft_loads_with_ours(tmp_path):
    ref = tiny_pipeline(0)
    unet_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    te_cfg = LoraConfig(r=2, lora_alpha=5, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    ref.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, ref.text_encoder)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in list(ref.unet.named_parameters()) + list(ref.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft_lora(ref, tmp_path, unet_cfg, te_cfg)
    diffusers_pipe = tiny_pipeline(0)
    diffusers_pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    ours = tiny_pipeline(0)
    name = load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    assert name == tmp_path.name
    layer = ours.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.specs[name].alpha == 2 and layer.specs[name].rank == 4
    a, b = generate(ours), generate(diffusers_pipe)
    assert abs(a - generate(tiny_pipeline(0))).max() > 0.05
    assert abs(a - b).max() < 1e-5


def test_save_load_save_is_identical(tmp_path):
    first = _trained_lora_file(tmp_path)
    pipe = tiny_pipeline(0)
    name = load_lora(pipe, first)
    second = tmp_path / "again.safetensors"
    save_lora(second, unet=pipe.unet, text_encoder=pipe.text_encoder, adapter=name, dtype=torch.float32)
    (s1, h1), (s2, h2) = read_safetensors(first), read_safetensors(second)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1 == h2  # metadata too: trigger words, ranks, alphas, diffusers' adapter metadata


def test_fp16_default_and_text_encoder_keys(tmp_path):
    pipe = tiny_pipeline(0)
    inject_lora(pipe.text_encoder, rank=2)
    path = save_lora(tmp_path / "te.safetensors", text_encoder=pipe.text_encoder)
    state, header = read_safetensors(path)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert "lora_adapter_metadata" in header and header["format"] == "pt"


def test_partial_targets_load_in_stock_diffusers_exactly_and_quietly(tmp_path):
    """A file with only some layers (UNet cross-attention, two text-encoder projections, one of them with its
    own rank and alpha) wraps exactly those layers in stock diffusers, without PEFT's config/state-dict
    inconsistency warning, and gives our images; its header is smaller than diffusers' own."""
    import warnings

    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=4, alpha=2, targets="cross")
    inject_lora(pipe.text_encoder, rank=2, alpha=3, targets=r".*layers\.1\.self_attn\.v_proj")
    inject_lora(pipe.text_encoder, rank=4, alpha=4, targets=r".*layers\.0\.self_attn\.q_proj", adapter="other")
    for _, layer in lora_layers(pipe.text_encoder):  # one adapter, two (rank, alpha) pairs
        if "other" in layer.specs:
            layer.specs["default"] = layer.specs.pop("other")
            for store in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                store["default"] = store.pop("other")
            layer.weights, layer.active = {"default": 1.0}, ["default"]
    randomize_lora(pipe.unet, seed=5)
    randomize_lora(pipe.text_encoder, seed=6)
    path = save_lora(tmp_path / "partial.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, dtype=torch.float32)

    ref = tiny_pipeline(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref.load_lora_weights(str(path))
    assert not [w for w in caught if "inconsisten" in str(w.message)], [str(w.message) for w in caught]
    for model in ("unet", "text_encoder"):
        wrapped = {n for n, m in getattr(ref, model).named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
        expected = {n for n, _ in lora_layers(getattr(pipe, model))}
        assert {n.removeprefix("text_model.") for n in wrapped} == {n.removeprefix("text_model.") for n in expected}
    q = ref.text_encoder.get_submodule(next(n for n, _ in lora_layers(pipe.text_encoder) if n.endswith("0.self_attn.q_proj")))
    assert q.r["default_0"] == 4 and q.scaling["default_0"] == 1.0  # the per-layer rank/alpha reached PEFT

    ours = tiny_pipeline(0)
    load_lora(ours, path)
    a, b = generate(ours), generate(ref)
    assert abs(a - generate(tiny_pipeline(0))).max() > 0.05
    assert abs(a - b).max() < 1e-5


def test_mixed_precision_step_equals_peft_bit_for_bit_with_fewer_casts():
    """bf16 UNet, fp32 LoRA factors, autocast (the GPU recipe, here on CPU autocast): loss and every LoRA gradient
    equal PEFT's bit for bit, while we skip PEFT's lossless bf16 -> fp32 -> bf16 round trip of each layer input."""
    import copy

    from diffusers.training_utils import cast_training_params

    from lora_diffusion.testing import OpCounter

    unet = tiny_pipeline(0, dtype=torch.bfloat16).unet
    ours, ref = copy.deepcopy(unet), copy.deepcopy(unet)
    inject_lora(ours, rank=4, alpha=8)
    randomize_lora(ours, seed=1, std=0.1)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    cast_training_params(ref, dtype=torch.float32)
    _copy_ours_into_peft(ours, ref)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 16, 16, generator=g).bfloat16(), torch.randn(2, 77, 32, generator=g).bfloat16()
    results = []
    for model in (ours, ref):
        model.train()
        with OpCounter() as count:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, torch.tensor([10, 500]), cond).sample
            loss = out.float().pow(2).mean()
            loss.backward()
        grads = {n.replace(".default", "").replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B"): p.grad
                 for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, count.counts["_to_copy"]))
    (loss_o, grads_o, casts_o), (loss_p, grads_p, casts_p) = results
    assert next(iter(grads_o.values())).dtype == torch.float32
    assert torch.equal(loss_o, loss_p)
    assert grads_o.keys() == grads_p.keys() and len(grads_o) > 0
    assert all(torch.equal(grads_o[k], grads_p[k]) for k in grads_o)
    assert any(grads_o[k].abs().max() > 0 for k in grads_o)
    n_layers = sum(1 for _ in lora_layers(ours))
    assert casts_o <= casts_p - 2 * n_layers, (casts_o, casts_p, n_layers)  # >= 2 casts fewer per layer

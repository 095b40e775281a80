"""Injection into the tiny UNet and CLIP text encoder: targets, freezing, removal."""

import pytest
import torch

from lora_diffusion import inject_lora, remove_lora
from lora_diffusion.inject import lora_layers, resolve_targets
from lora_diffusion.layers import LoraConv2d, LoraLinear

from conftest import randomize_lora


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=cond).sample


def test_default_targets_are_attention_projections(pipe):
    unet_names = resolve_targets(pipe.unet, None)
    # tiny UNet: 2 down + 3 up + 1 mid transformer blocks, each attn1 and attn2 with q, k, v, out.0
    assert len(unet_names) == 6 * 2 * 4
    assert all(n.rsplit(".", 2)[-2:] in (["attn1", "to_q"], ["attn1", "to_k"], ["attn1", "to_v"], ["attn2", "to_q"],
               ["attn2", "to_k"], ["attn2", "to_v"]) or n.endswith(".to_out.0") for n in unet_names)
    te_names = resolve_targets(pipe.text_encoder, None)
    assert len(te_names) == 5 * 4 and all(n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "out_proj"} for n in te_names)


def test_presets_regex_and_suffixes(pipe):
    cross = resolve_targets(pipe.unet, "cross")
    assert len(cross) == 24 and all(".attn2." in n for n in cross)
    mlp = resolve_targets(pipe.unet, "attn-mlp")
    assert len(mlp) == 48 + 6 * 2 + 6 * 2  # + ff.net.0.proj, ff.net.2, proj_in, proj_out
    full = resolve_targets(pipe.unet, "full")
    assert any(n.endswith("resnets.0.conv1") for n in full) and len(full) > len(mlp)
    assert resolve_targets(pipe.unet, ["attn2.to_k"]) == [n for n in cross if n.endswith("attn2.to_k")]
    assert resolve_targets(pipe.unet, r"mid_block\..*attn1\.to_q") == ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert len(resolve_targets(pipe.text_encoder, "attn-mlp")) == 5 * 6
    with pytest.raises(ValueError, match="matched no Linear/Conv2d"):
        inject_lora(pipe.unet, targets=["no_such_layer"])


def test_fresh_injection_changes_nothing_and_only_lora_trains(pipe):
    before = _unet_out(pipe.unet)
    params = inject_lora(pipe.unet, rank=4, alpha=8, targets="full")
    assert torch.equal(_unet_out(pipe.unet), before)
    trainable = {id(p) for p in pipe.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert any(isinstance(layer, LoraConv2d) for _, layer in lora_layers(pipe.unet))
    assert any(isinstance(layer, LoraLinear) for _, layer in lora_layers(pipe.unet))


def test_second_adapter_sits_beside_the_first(pipe):
    inject_lora(pipe.unet, rank=2, adapter="a")
    inject_lora(pipe.unet, rank=3, targets="cross", adapter="b")
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert list(layer.specs) == ["a", "b"] and layer.specs["b"].rank == 3
    self_attn = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_k")
    assert list(self_attn.specs) == ["a"]
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(pipe.unet, rank=2, adapter="a")


def test_remove_lora_puts_back_the_same_modules(pipe):
    originals = {n: m for n, m in pipe.unet.named_modules()}
    pipe.unet.conv_in.requires_grad_(False)  # the user's own choice of what trains comes back too
    trainable = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    before = _unet_out(pipe.unet)
    inject_lora(pipe.unet, rank=4)
    inject_lora(pipe.unet, rank=2, adapter="second")
    randomize_lora(pipe.unet)
    assert not torch.allclose(_unet_out(pipe.unet), before)
    remove_lora(pipe.unet)
    after = {n: m for n, m in pipe.unet.named_modules()}
    assert after.keys() == originals.keys() and all(after[n] is originals[n] for n in after)
    assert torch.equal(_unet_out(pipe.unet), before)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == trainable and not all(trainable.values())


def test_rank_too_large_names_the_layer(pipe):
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.k_proj: rank 64 is larger"):
        inject_lora(pipe.text_encoder, rank=64)


def test_wrapping_a_layer_of_a_fused_model_puts_the_detached_wrappers_back(pipe):
    """While fused, every wrapper is out of the module tree (``lora_layers`` then reads only the detached ones,
    without walking the tree): ``wrap_layer`` attaches them first, so no wrapper is ever missed or listed twice."""
    from lora_diffusion import fuse
    from lora_diffusion.inject import DETACHED_ATTR, wrap_layer

    inject_lora(pipe.unet, rank=2, targets="cross")
    fuse(pipe)
    fused = dict(lora_layers(pipe.unet))
    assert len(fused) == 24 and len(getattr(pipe.unet, DETACHED_ATTR)) == 24
    path = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    new = wrap_layer(pipe.unet, path)
    assert not getattr(pipe.unet, DETACHED_ATTR)
    layers = list(lora_layers(pipe.unet))
    assert len(layers) == 25 and len({p for p, _ in layers}) == 25
    assert dict(layers)[path] is new and all(dict(layers)[p] is layer for p, layer in fused.items())


def test_rank_and_alpha_patterns_give_each_layer_what_peft_gives_it():
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the first regex matching a module path or a tail of it sets
    that layer's rank and alpha (text-encoder patterns with or without ``text_model.``); every layer's rank and
    scale equal PEFT's on the same config."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_diffusion.testing import tiny_pipeline

    ours, ref = tiny_pipeline(), tiny_pipeline()
    cases = [("unet", "full", {"attn2.to_k": 3, r"up_blocks\.1\..*": 2, "conv1": 5}, {"attn2.to_k": 6.0, "conv2": 0.5}),
             ("text_encoder", "attn-mlp", {r"text_model\.encoder\.layers\.0\.self_attn\.q_proj": 2, "fc1": 6}, {"fc.": 1.0})]
    for component, targets, ranks, alphas in cases:
        names = resolve_targets(getattr(ours, component), targets)
        inject_lora(getattr(ours, component), rank=4, alpha=8, targets=targets, rank_pattern=ranks, alpha_pattern=alphas)
        # PEFT matches our module paths (transformers' flattened CLIPTextModel has no text_model. level: PEFT's own
        # lookup then needs a pattern without it, which ours accepts as well)
        peft_ranks = {k.replace(r"text_model\.", ""): v for k, v in ranks.items()}
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=names, rank_pattern=peft_ranks, alpha_pattern=alphas),
                                getattr(ref, component))
        theirs = {n: m for n, m in getattr(ref, component).named_modules() if hasattr(m, "scaling") and "default" in m.scaling}
        mine = dict(lora_layers(getattr(ours, component)))
        assert mine.keys() == theirs.keys() == set(names)
        for name, layer in mine.items():
            spec = layer.specs["default"]
            assert (spec.rank, spec.alpha / spec.rank) == (theirs[name].r["default"], theirs[name].scaling["default"]), name
        assert len({layer.specs["default"].rank for layer in mine.values()}) >= 3, component  # the patterns did apply


def test_a_bad_rank_pattern_is_refused_before_any_layer_is_wrapped(pipe):
    for kwargs, match in (({"rank_pattern": {"attn2.to_k": 0}}, r"attn2\.to_k: rank must be a positive integer, got 0"),
                          ({"rank_pattern": {"(": 2}}, r"pattern '\(' is not a valid regex"),
                          ({"alpha_pattern": {"to_q": float("nan")}}, r"to_q: alpha must be a finite number, got nan")):
        with pytest.raises(ValueError, match=match):
            inject_lora(pipe.unet, rank=4, **kwargs)
        assert not list(lora_layers(pipe.unet))

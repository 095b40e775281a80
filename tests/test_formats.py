"""Formats people share: kohya/A1111/ComfyUI (diffusers and LDM names, LoCon), older diffusers keys,
cloneofsimo; bad input; the convert/inspect tools. Tiny offline pipelines, 2-step 32x32 generations."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_diffusion import inject_lora, load_lora
from lora_diffusion.cli import main as cli_main
from lora_diffusion.formats import (
    LoraFormatError,
    LoraWeights,
    from_diffusers,
    from_kohya,
    read_lora_file,
    read_safetensors,
    to_diffusers,
    to_kohya,
    write_lora_file,
)
from lora_diffusion.formats_cloneofsimo import cloneofsimo_paths, sd1_module_listing
from lora_diffusion.formats_kohya import module_path_from_kohya
from lora_diffusion.inject import lora_layers
from lora_diffusion.pipeline import module_listing, save_lora
from lora_diffusion.testing import random_lora, tiny_pipeline
from lora_diffusion.tools import inspect_lora

logging.getLogger("diffusers").setLevel(logging.ERROR)


def generate(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


def deltas(model) -> dict[str, torch.Tensor]:
    return {p: layer.delta_weight() for p, layer in lora_layers(model)}


@pytest.fixture(scope="module")
def pipe0():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def lora(pipe0):
    """Rank 4, alpha 8 (alpha != rank) on UNet attention + MLP and the text encoder's attention."""
    return random_lora(pipe0, seed=1, rank=4, alpha=8, unet_targets="attn-mlp")


# ---------------------------------------------------------------------------------------------- kohya
def test_kohya_export_loads_in_diffusers_like_ours(tmp_path, lora):
    path = tmp_path / "style.safetensors"
    write_lora_file(path, lora, format="kohya", dtype=torch.float32)
    ours = tiny_pipeline(0)
    load_lora(ours, path)
    ref = tiny_pipeline(0)
    ref.load_lora_weights(str(path), adapter_name="style")  # diffusers converts the kohya keys itself
    base = generate(tiny_pipeline(0))
    a, b = generate(ours), generate(ref)
    assert np.abs(a - base).max() > 1e-2  # the LoRA (alpha 8 / rank 4) does something
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_kohya_keys_alpha_and_metadata(tmp_path, pipe0, lora):
    path = tmp_path / "k.safetensors"
    save_lora_path = tmp_path / "ours.safetensors"
    write_lora_file(save_lora_path, lora, dtype=torch.float32)
    p = tiny_pipeline(0)
    load_lora(p, save_lora_path, adapter="style")
    save_lora(path, unet=p.unet, text_encoder=p.text_encoder, adapter="style", format="kohya", metadata={"trigger_words": ["sks"]})
    state = load_file(str(path))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in state
    assert state["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha"].item() == 8.0
    _, header = read_lora_file(path)
    assert header["_format"] == "kohya"
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.trigger_phrase"] == "sks"
    assert header["ss_output_name"] == "k"  # A1111's alias, as kohya writes it: the file's name, not the adapter's


def test_kohya_roundtrip_tensors_and_alpha(lora):
    state, header = to_kohya(lora)
    back = from_kohya(state, header)
    assert back.keys() == lora.keys()
    for k, w in lora.items():
        assert torch.equal(back[k].A, w.A) and torch.equal(back[k].B, w.B) and back[k].alpha == w.alpha
    state2, _ = to_kohya(back)
    assert state2.keys() == state.keys()
    assert all(torch.equal(state2[k], state[k]) for k in state)


def test_kohya_convert_cli_roundtrip(tmp_path, lora):
    src = tmp_path / "a.safetensors"
    write_lora_file(src, lora, format="kohya", dtype=torch.float16)
    assert cli_main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert cli_main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    a, b = load_file(str(src)), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "kohya, path",
    [
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj", "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"),
        ("lora_unet_down_blocks_0_resnets_1_time_emb_proj", "down_blocks.0.resnets.1.time_emb_proj"),
        ("lora_unet_mid_block_resnets_0_conv_shortcut", "mid_block.resnets.0.conv_shortcut"),
        ("lora_unet_time_embedding_linear_1", "time_embedding.linear_1"),
        ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
        ("lora_te_text_model_encoder_layers_3_mlp_fc2", "text_model.encoder.layers.3.mlp.fc2"),
        # original LDM / SD checkpoint names (SD1/SD2 layout)
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("lora_unet_input_blocks_8_1_proj_in", "down_blocks.2.attentions.1.proj_in"),
        ("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
        ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        ("lora_unet_input_blocks_0_0", "conv_in"),
        ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
        ("lora_unet_middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
        ("lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
        ("lora_unet_output_blocks_0_0_skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
        ("lora_unet_output_blocks_11_0_out_layers_3", "up_blocks.3.resnets.2.conv2"),
        ("lora_unet_output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv"),
        ("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
        ("lora_unet_time_embed_2", "time_embedding.linear_2"),
        ("lora_unet_out_2", "conv_out"),
    ],
)
def test_kohya_names_to_module_paths(kohya, path):
    assert module_path_from_kohya(kohya)[1] == path


def _ldm_name(path: str) -> str:
    """diffusers attention path of the tiny UNet -> LDM name (the inverse the test needs, written independently)."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d)\.attentions\.(\d)\.(.*)", path)
    if m:
        side, b, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        index = 3 * b + j + 1 if side == "down" else 3 * b + j
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.1.{rest}"
    return path.replace("mid_block.attentions.0", "middle_block.1")


def test_kohya_ldm_named_file_loads_like_diffusers_named(tmp_path, lora):
    state, header = to_kohya(lora)
    ldm = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        if name.startswith("lora_unet_"):
            component, path = module_path_from_kohya(name)
            name = "lora_unet_" + _ldm_name(path).replace(".", "_")
        ldm[f"{name}.{suffix}"] = tensor
    assert any("input_blocks_4_1" in k for k in ldm) and any("middle_block_1" in k for k in ldm)
    save_file(ldm, str(tmp_path / "ldm.safetensors"), metadata=header)
    save_file(state, str(tmp_path / "diffusers_names.safetensors"), metadata=header)
    a, b = tiny_pipeline(0), tiny_pipeline(0)
    load_lora(a, tmp_path / "ldm.safetensors")
    load_lora(b, tmp_path / "diffusers_names.safetensors")
    da, db = deltas(a.unet), deltas(b.unet)
    assert da.keys() == db.keys() and len(da) == sum(k.startswith("unet.") for k in lora)
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_kohya_locon_convs_load(tmp_path, pipe0):
    locon = random_lora(pipe0, seed=3, rank=2, alpha=1, unet_targets="full", text_encoder_targets=None)
    assert any(w.A.dim() == 4 and w.A.shape[-1] == 3 for w in locon.values())
    write_lora_file(tmp_path / "locon.safetensors", locon, format="kohya", dtype=torch.float32)
    write_lora_file(tmp_path / "locon_d.safetensors", locon, format="diffusers", dtype=torch.float32)
    a, b = tiny_pipeline(0), tiny_pipeline(0)
    load_lora(a, tmp_path / "locon.safetensors")
    load_lora(b, tmp_path / "locon_d.safetensors")
    assert "conv1" in json.dumps(list(deltas(a.unet)))
    np.testing.assert_array_equal(generate(a), generate(b))
    assert inspect_lora(tmp_path / "locon.safetensors")["conv_layers"] > 0
    assert "conv_dim" in read_lora_file(tmp_path / "locon.safetensors")[1]["ss_network_args"]


# ---------------------------------------------------------------------------------------------- older diffusers keys
def test_older_diffusers_keys(lora):
    state, header = to_diffusers(lora)
    old = {}
    for key, tensor in state.items():
        if key.startswith("text_encoder."):
            key = key.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(".lora_B.weight", ".lora_linear_layer.up.weight")
        elif ".attn1." in key:
            m = re.fullmatch(r"(.*attn1)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight", key)
            if m:
                proc = {"to_out.0": "to_out"}.get(m.group(2), m.group(2))
                key = f"{m.group(1)}.processor.{proc}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"
        else:
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        old[key] = tensor
    assert any(".processor.to_out_lora.down.weight" in k for k in old)
    back = from_diffusers(old, header)
    assert back.keys() == lora.keys()
    assert all(torch.equal(back[k].A, w.A) and back[k].alpha == w.alpha for k, w in lora.items())


# ---------------------------------------------------------------------------------------------- cloneofsimo
def _cloneofsimo_order(model, targets):
    """cloneofsimo's own traversal (`_find_modules`), written independently of the reader."""
    out = []
    for ancestor in model.modules():
        if type(ancestor).__name__ in targets:
            for name, module in ancestor.named_modules():
                if isinstance(module, torch.nn.Linear):
                    out.append(module)
    return out


def test_cloneofsimo_file_loads_to_the_right_modules(tmp_path, caplog):
    pipe = tiny_pipeline(0)
    gen = torch.Generator().manual_seed(5)
    state, meta, expect = {}, {}, {}
    for component, targets in (("unet", ["CrossAttention", "Attention", "GEGLU"]), ("text_encoder", ["CLIPAttention"])):
        meta[component] = json.dumps(targets)
        for i, module in enumerate(_cloneofsimo_order(getattr(pipe, component), targets)):
            state[f"{component}:{i}:down"] = torch.randn(2, module.in_features, generator=gen)
            state[f"{component}:{i}:up"] = torch.randn(module.out_features, 2, generator=gen)
            meta[f"{component}:{i}:rank"] = "2"
            expect[id(module)] = (state[f"{component}:{i}:down"], state[f"{component}:{i}:up"])
    state["<s1>"] = torch.randn(32)
    meta["<s1>"] = "<embed>"
    save_file(state, str(tmp_path / "simo.safetensors"), metadata=meta)
    with caplog.at_level(logging.WARNING):
        load_lora(pipe, tmp_path / "simo.safetensors", adapter="simo")
    assert "<s1>" in caplog.text
    seen = 0
    for component in ("unet", "text_encoder"):
        for _, layer in lora_layers(getattr(pipe, component)):
            a, b = expect[id(layer.base_layer)]
            assert torch.equal(layer.lora_A["simo"], a) and torch.equal(layer.lora_B["simo"], b)
            assert layer.specs["simo"].alpha == 2  # scale baked in: alpha = rank
            seen += 1
    assert seen == len(expect) and seen > 60  # every Attention's q/k/v/out, GEGLU proj, CLIPAttention k/v/q/out


def test_cloneofsimo_sd1_layout_matches_the_real_traversal():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD 1.x defaults
    targets = ["CrossAttention", "Attention", "GEGLU"]
    real = cloneofsimo_paths(module_listing(unet), targets)
    assert cloneofsimo_paths(sd1_module_listing("unet"), targets) == real
    assert len(real) == 16 * 9  # 16 transformer blocks: attn1 + attn2 (4 each) + GEGLU proj


# ---------------------------------------------------------------------------------------------- bad input
def test_unmatched_keys_raise_listing_them_and_strict_false_warns(tmp_path, lora, caplog):
    bad = dict(lora)
    w = bad["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    bad["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"] = LoraWeights(w.A.clone(), w.B.clone(), w.alpha)
    write_lora_file(tmp_path / "bad.safetensors", bad, dtype=torch.float32)
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=r"1 of \d+ unet keys match no layer.*down_blocks\.7"):
        load_lora(pipe, tmp_path / "bad.safetensors")
    assert not list(lora_layers(pipe.unet))  # nothing half-loaded
    with caplog.at_level(logging.WARNING):
        load_lora(pipe, tmp_path / "bad.safetensors", strict=False)
    n_unet = sum(k.startswith("unet.") for k in lora)
    assert f"Loaded the other {n_unet} layers" in caplog.text and "down_blocks.7" in caplog.text


def _fake(lora_shapes: dict[str, tuple[int, int]], rank: int = 4):
    return {k: LoraWeights(torch.zeros(rank, i), torch.zeros(o, rank), float(rank)) for k, (i, o) in lora_shapes.items()}


def test_other_architectures_are_named(tmp_path):
    pipe = tiny_pipeline(0)
    sd2 = _fake({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (1024, 1024)})
    write_lora_file(tmp_path / "sd2.safetensors", sd2)
    with pytest.raises(LoraFormatError, match=r"SD 2\.x"):
        load_lora(pipe, tmp_path / "sd2.safetensors")
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}  # fmt: skip
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraFormatError, match="SDXL"):
        load_lora(pipe, tmp_path / "sdxl.safetensors")
    assert inspect_lora(tmp_path / "sdxl.safetensors")["architecture"].startswith("SDXL")


def test_lycoris_keys_under_names_no_reader_knows_are_named_with_their_type(tmp_path):
    """(LoHa, LoKr, DoRA, OFT, GLoRA and (IA)^3 load: tests/test_lycoris.py, test_dora.py, test_oft.py, test_glora.py.)"""
    state = {f"lora_unet_down_blocks_1_attentions_0_proj_in.{k}": torch.zeros(4, 4) for k in ("a1.weight", "a2.weight")}
    state["lora_unet_down_blocks_1_attentions_0_proj_in.gamma"] = torch.zeros(4)
    save_file(state, str(tmp_path / "lyco.safetensors"))
    with pytest.raises(LoraFormatError, match=r"LyCORIS GLoRA \(1 keys\) found, but 1 of 3 keys fit no LoRA format "
                                              r"\(the others are lycoris\): 'lora_unet_.*proj_in\.gamma'"):
        load_lora(tiny_pipeline(0), tmp_path / "lyco.safetensors")


def test_inspect(tmp_path, lora, capsys):
    path = tmp_path / "style.safetensors"
    write_lora_file(path, lora, format="kohya", metadata={"trigger_words": ["sks style"]})
    info = inspect_lora(path)
    assert info["format"] == "kohya" and info["ranks"] == {4: len(lora)} and info["alphas"] == {8.0: len(lora)}
    assert info["trigger_words"] == ["sks style"] and info["dtype"] == "float16"
    assert info["targets"]["unet attn2.to_k"] == 6 and info["targets"]["text_encoder self_attn.q_proj"] == 5
    assert "ss_network_dim" in info["metadata"]
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "attn2.to_k" in out


def test_inspect_names_targets_as_target_lists_do(tmp_path):
    """Labels are the module paths below the last numbered container, as diffusers' and PEFT's target lists name
    them (the feed-forward layers were labelled ``ff.net`` and ``net.proj``)."""
    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=2, targets="full")
    inject_lora(pipe.text_encoder, rank=2, targets="attn-mlp")
    path = tmp_path / "full.safetensors"
    save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    targets = inspect_lora(path)["targets"]
    for label in ("unet attn1.to_out.0", "unet attn2.to_k", "unet ff.net.0.proj", "unet ff.net.2", "unet attentions.proj_in",
                  "unet resnets.conv1", "unet resnets.time_emb_proj", "text_encoder self_attn.out_proj", "text_encoder mlp.fc1"):
        assert targets.get(label), (label, targets)
    assert not any(label.endswith((" ff.net", " net.proj", " to_out")) for label in targets), targets


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path, lora):
    """A safetensors header length whose low byte is 0x80 (the pickle opcode) must not be taken for a pickle."""
    path = tmp_path / "x.safetensors"
    state = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32, 1, 1),
             "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 2, 1, 1)}  # fmt: skip
    for pad in range(256):
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_lora_file(path)[1]["_format"] == "diffusers"
    pickle = tmp_path / "p.safetensors"
    torch.save(state, pickle)
    with pytest.raises(LoraFormatError, match="pickled"):
        read_lora_file(pickle)


def test_suffix_regex_matches_exactly_the_paths_as_peft_suffixes():
    """``target_modules`` is written as one regex: it must accept each path and any ``prefix.`` + path, and
    nothing else, for every preset on an SD1.5-shaped UNet and for random path sets."""
    import random

    from diffusers import UNet2DConditionModel

    from lora_diffusion.formats import suffix_regex
    from lora_diffusion.inject import resolve_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    names = [n for n, _ in unet.named_modules()]
    for preset in ("attn", "cross", "attn-mlp", "full"):
        targets = resolve_targets(unet, preset)
        rx = re.compile(suffix_regex(targets))
        assert [n for n in names if rx.fullmatch(n)] == targets, preset
        assert all(rx.fullmatch("text_model." + t) for t in targets)
        assert len(rx.pattern) < 0.2 * len(json.dumps(targets))
    rng = random.Random(0)
    parts = ["a", "b", "0", "1", "to_out", "x.y"[0]]
    for _ in range(200):
        universe = {".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(30)}
        chosen = {p for p in universe if rng.random() < 0.4} or {next(iter(universe))}
        rx = re.compile(suffix_regex(chosen))
        for name in universe | {"z." + p for p in universe} | {p + "z" for p in universe}:
            expected = any(name == c or name.endswith("." + c) for c in chosen)
            assert (rx.fullmatch(name) is not None) == expected, (sorted(chosen), name)


def test_written_files_get_the_umask_mode(tmp_path, lora):
    """Files are written through a temp file: the result has the mode of a plain open(), not mkstemp's 0600."""
    import os

    from lora_diffusion.formats import atomic_save

    old = os.umask(0o022)
    try:
        write_lora_file(tmp_path / "a.safetensors", lora)
        write_lora_file(tmp_path / "a.safetensors", lora, format="kohya")  # over an existing file
        atomic_save({"x": torch.zeros(2)}, tmp_path / "x.safetensors", {"format": "pt"})
        os.umask(0o027)
        write_lora_file(tmp_path / "b.safetensors", lora)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.safetensors").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "x.safetensors").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "b.safetensors").st_mode & 0o777) == oct(0o640)


# ---------------------------------------------------------------------------------------------- SDXL: two text encoders
@pytest.fixture(scope="module")
def sdxl_lora(lora):
    """The tiny LoRA plus a second text encoder (``text_encoder_2``, other tensors), as an SDXL file has."""
    te2 = {"text_encoder_2." + k.split(".", 1)[1]: LoraWeights(w.A * 2, w.B * 3, 2.0) for k, w in lora.items() if k.startswith("text_encoder.")}
    return {**lora, **te2}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k, w in a.items():
        assert torch.equal(b[k].A, w.A) and torch.equal(b[k].B, w.B) and b[k].alpha == w.alpha, k


def test_sdxl_second_text_encoder_round_trips_in_every_format(sdxl_lora):
    assert_same(sdxl_lora, from_diffusers(*to_diffusers(sdxl_lora)))
    state, header = to_kohya(sdxl_lora)
    prefixes = {k.split("text_model")[0] for k in state if k.startswith("lora_te")}
    assert prefixes == {"lora_te1_", "lora_te2_"}  # kohya's SDXL names: the first encoder is te1 beside te2
    assert_same(sdxl_lora, from_kohya(state, header))
    # diffusers' own kohya converter reads both encoders from our file
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    converted = _convert_non_diffusers_lora_to_diffusers(dict(state))[0]
    n_te = sum(k.startswith("text_encoder.") for k in sdxl_lora)
    assert sum(k.startswith("text_encoder_2.") for k in converted) == 2 * n_te
    assert sum(k.startswith("text_encoder.") for k in converted) == 2 * n_te


def test_sdxl_files_keep_every_layer_through_convert_and_merge(tmp_path, sdxl_lora, pipe0):
    from lora_diffusion.blend import merge_loras

    src = tmp_path / "x.safetensors"
    write_lora_file(src, sdxl_lora, format="kohya", dtype=torch.float32)
    assert_same(sdxl_lora, read_lora_file(src)[0])
    assert cli_main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert_same(sdxl_lora, read_lora_file(tmp_path / "d.safetensors")[0])
    assert cli_main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    a, b = load_file(str(src)), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = merge_loras({src: 0.5, tmp_path / "d.safetensors": 0.5}, tmp_path / "m.safetensors", dtype=torch.float32)
    assert read_lora_file(tmp_path / "m.safetensors")[0].keys() == merged.lora.keys() == sdxl_lora.keys()
    with pytest.raises(LoraFormatError, match="text_encoder_2"):
        load_lora(tiny_pipeline(0), tmp_path / "d.safetensors")  # an SD1 pipeline has no second encoder


def test_a_component_no_format_holds_is_refused_not_dropped(lora):
    w = next(iter(lora.values()))
    odd = {**lora, "transformer.blocks.0.attn.to_q": w}
    for writer in (to_diffusers, to_kohya):
        with pytest.raises(LoraFormatError, match="'transformer'.*blocks.0.attn.to_q"):
            writer(odd)


# ---------------------------------------------------------------------------------------------- convert keeps what users wrote
def test_convert_keeps_the_source_header_and_trigger_words(tmp_path, lora):
    src = tmp_path / "k.safetensors"
    state, header = to_kohya(lora)
    user = {"ss_tag_frequency": json.dumps({"10_style": {"sks style": 9, "stripes": 4}}), "ss_training_comment": "mine",
            "ss_sd_model_hash": "abc123", "modelspec.title": "My Style", "modelspec.trigger_phrase": "sks style",
            "ss_output_name": "my_style", "ss_base_model_version": "sd_v1", "my_note": "keep me"}  # fmt: skip
    save_file(state, str(src), metadata={**header, **user})
    words = inspect_lora(src)["trigger_words"]
    assert words[:2] == ["sks style", "stripes"]
    assert cli_main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert cli_main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    assert cli_main(["convert", str(src), str(tmp_path / "k3.safetensors"), "--to", "kohya"]) == 0
    for out in ("d", "k2", "k3"):
        _, got = read_lora_file(tmp_path / f"{out}.safetensors")
        assert {k: got.get(k) for k in user} == user, out
        assert inspect_lora(tmp_path / f"{out}.safetensors")["trigger_words"] == words, out
        assert json.loads(got["lora_diffusion"])["trigger_words"] == ["sks style"], out
    _, d = read_lora_file(tmp_path / "d.safetensors")
    assert d["_format"] == "diffusers" and "lora_adapter_metadata" in d  # the format's own keys are written afresh


def test_convert_refuses_to_drop_learned_tokens_unless_told(tmp_path, caplog):
    """cloneofsimo's learned token travels bundled in a kohya file (as A1111 loads it); a diffusers file has no place
    for it: refused unless --drop-embeddings, which drops it with a warning."""
    state, meta = {"<s1>": torch.randn(768)}, {"<s1>": "<embed>", "text_encoder": json.dumps(["CLIPAttention"])}
    for i, path in enumerate(cloneofsimo_paths(sd1_module_listing("text_encoder"), ["CLIPAttention"])):
        state[f"text_encoder:{i}:down"], state[f"text_encoder:{i}:up"] = torch.randn(1, 768), torch.randn(768, 1)
        meta[f"text_encoder:{i}:rank"] = "1"
    save_file(state, str(tmp_path / "simo.safetensors"), metadata=meta)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraFormatError, match="<s1>.*convert --to kohya bundles them.*--drop-embeddings"):
        cli_main(["convert", str(tmp_path / "simo.safetensors"), str(out), "--to", "diffusers", "--debug"])
    assert not out.exists()
    assert cli_main(["convert", str(tmp_path / "simo.safetensors"), str(tmp_path / "bundled.safetensors"), "--to", "kohya"]) == 0
    bundled = read_safetensors(tmp_path / "bundled.safetensors")[0]
    assert torch.equal(bundled["bundle_emb.<s1>.string_to_param.*"], state["<s1>"][None])
    assert inspect_lora(tmp_path / "bundled.safetensors")["embeddings"] == ["<s1>"]
    with caplog.at_level(logging.WARNING):
        assert cli_main(["convert", str(tmp_path / "simo.safetensors"), str(out), "--to", "kohya", "--drop-embeddings"]) == 0
    assert "dropped the learned token embedding(s) <s1>" in caplog.text
    lora, header = read_lora_file(out)
    assert len(lora) == 48 and not {"<s1>", "text_encoder", "text_encoder:0:rank"} & set(header)


# ---------------------------------------------------------------------------------------------- errors name the key
def test_errors_name_the_bad_key(tmp_path, lora):
    state, _ = to_kohya(lora)
    alpha_key = next(k for k in state if k.endswith(".alpha"))
    save_file({**state, alpha_key: torch.tensor([8.0, 8.0])}, str(tmp_path / "alpha.safetensors"))
    with pytest.raises(LoraFormatError, match=re.escape(alpha_key) + r" has shape \[2\]"):
        read_lora_file(tmp_path / "alpha.safetensors")
    save_file({**state, alpha_key: torch.tensor([8.0])}, str(tmp_path / "alpha1.safetensors"))
    assert read_lora_file(tmp_path / "alpha1.safetensors")[0].keys() == lora.keys()  # one number in a 1-d tensor is fine
    save_file({**state, "something_else": torch.zeros(3)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(LoraFormatError, match=r"1 of \d+ keys fit no LoRA format \(the others are kohya\): 'something_else'$"):
        read_lora_file(tmp_path / "stray.safetensors")


def test_peft_dora_magnitude_is_read_and_checked(tmp_path, lora):
    """A PEFT DoRA magnitude is read per output row, [out, 1(, 1, 1)]; one of another length is refused, naming the module.
    (DoRA's outputs: tests/test_dora.py.)"""
    state, header = to_diffusers(lora)
    key = next(k for k in state if k.endswith(".lora_B.weight"))
    rows = state[key].shape[0]
    module = key.removesuffix(".lora_B.weight")
    state[f"{module}.lora_magnitude_vector"] = torch.ones(rows)
    save_file(state, str(tmp_path / "dora.safetensors"), metadata=header)
    read = read_lora_file(tmp_path / "dora.safetensors")[0]
    assert read[module].magnitude.shape[:2] == (rows, 1) and read[module].magnitude.numel() == rows and sum(w.magnitude is not None for w in read.values()) == 1
    state[f"{module}.lora_magnitude_vector"] = torch.ones(rows + 1)
    save_file(state, str(tmp_path / "dora.safetensors"), metadata=header)
    with pytest.raises(LoraFormatError, match=rf"{module}.lora_magnitude_vector has shape \[{rows + 1}\]; the layer has {rows} outputs"):
        read_lora_file(tmp_path / "dora.safetensors")


def test_a_folder_is_read_like_load_lora_reads_it(tmp_path, lora, capsys):
    (tmp_path / "style").mkdir()
    write_lora_file(tmp_path / "style" / "pytorch_lora_weights.safetensors", lora)
    info = inspect_lora(tmp_path / "style")
    assert info["format"] == "diffusers" and info["layers"]["unet"] > 0 and info["size_bytes"] > 1000
    assert cli_main(["inspect", str(tmp_path / "style")]) == 0
    assert cli_main(["inspect", str(tmp_path)]) == 2
    assert "a folder without pytorch_lora_weights.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_non_finite_weights_are_refused_by_key(tmp_path, lora, fmt, capsys):
    state, header = (to_kohya if fmt == "kohya" else to_diffusers)(lora)
    keys = list(state)
    for i, bad in ((3, float("nan")), (len(keys) - 1, float("inf"))):
        broken = dict(state)
        t = broken[keys[i]].clone().reshape(-1)
        t[-1] = bad
        broken[keys[i]] = t.reshape(state[keys[i]].shape)
        save_file(broken, str(tmp_path / "bad.safetensors"), metadata=header)
        with pytest.raises(LoraFormatError, match=re.escape(f"bad.safetensors: {keys[i]} holds NaN or Inf")):
            load_lora(tiny_pipeline(0), tmp_path / "bad.safetensors")
        assert cli_main(["merge", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "m.safetensors"), "--mode", "svd"]) == 2
        assert keys[i] in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    big = {k: (v * 6e4 if v.dim() and v.is_floating_point() else v).half() for k, v in state.items()}  # finite, fp16 norm overflows
    save_file(big, str(tmp_path / "big.safetensors"), metadata=header)
    assert read_lora_file(tmp_path / "big.safetensors")[0].keys() == lora.keys()


def test_a_non_finite_alpha_in_the_diffusers_header_is_refused(tmp_path, lora):
    state, header = to_diffusers(lora)
    meta = json.loads(header["lora_adapter_metadata"])
    meta["unet.lora_alpha"] = float("nan")
    save_file(state, str(tmp_path / "a.safetensors"), metadata={**header, "lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(LoraFormatError, match=r"a.safetensors: unet\..* has alpha nan"):
        read_lora_file(tmp_path / "a.safetensors")


_BAD_HEADERS = [
    ("lora_diffusion", "{bad json", "'lora_diffusion' is not valid JSON"),
    ("lora_diffusion", "null", "'lora_diffusion' holds a JSON NoneType, not an object"),
    ("lora_diffusion", "[1, 2]", "'lora_diffusion' holds a JSON list"),
    ("lora_adapter_metadata", "{bad json", "'lora_adapter_metadata' is not valid JSON"),
    ("lora_adapter_metadata", "3", "'lora_adapter_metadata' holds a JSON int"),
    ("lora_adapter_metadata", '{"unet.lora_alpha": "y"}', "unet r / lora_alpha / rank_pattern / alpha_pattern are not numbers"),
    ("lora_adapter_metadata", '{"unet.lora_alpha": 8, "unet.r": 1e400}', "unet r / lora_alpha"),
    ("lora_adapter_metadata", '{"unet.lora_alpha": 8, "unet.alpha_pattern": [1]}', "unet r / lora_alpha"),
]


@pytest.mark.parametrize("fmt, key, value, message", [("diffusers", *case) for case in _BAD_HEADERS]
                         + [("kohya", *case) for case in _BAD_HEADERS if case[0] == "lora_diffusion"])  # (no adapter metadata)
def test_a_malformed_json_header_is_refused_naming_the_file_and_key(tmp_path, lora, fmt, key, value, message):
    """Our metadata and diffusers' adapter metadata are JSON objects; anything else in them is a short error that names
    the file and the header key, from loading and from inspect alike (was a bare JSONDecodeError, TypeError or
    AttributeError from deep inside)."""
    state, header = (to_diffusers if fmt == "diffusers" else to_kohya)(lora)
    header = {**header, "lora_diffusion": json.dumps({"format_version": 1}), key: value}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=header)
    for call in (lambda: read_lora_file(tmp_path / "bad.safetensors"), lambda: inspect_lora(tmp_path / "bad.safetensors"),
                 lambda: load_lora(tiny_pipeline(0), tmp_path / "bad.safetensors")):
        with pytest.raises(LoraFormatError, match=re.escape(f"{tmp_path / 'bad.safetensors'}: ") + ".*" + re.escape(message)):
            call()


# ---------------------------------------------------------------------------------------------- PEFT patterns
def test_regex_alpha_patterns_match_like_peft_in_stock_diffusers(tmp_path, lora):
    """PEFT reads ``alpha_pattern`` keys as regexes (first match, in order, on a ``.``-tail of the module path)."""
    from safetensors import safe_open

    path = tmp_path / "re.safetensors"
    write_lora_file(path, lora, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["lora_adapter_metadata"])
    meta["unet.alpha_pattern"] = {"up_blocks\\.0\\..*to_q": 0.5, "to_q": 3.0, "attn2\\.to_(k|v)": 16.0}
    meta["text_encoder.alpha_pattern"] = {"layers\\.[01]\\.self_attn\\.q_proj": 2.0}
    header["lora_adapter_metadata"] = json.dumps(meta)
    save_file(load_file(str(path)), str(path), metadata=header)
    ours = tiny_pipeline(0)
    load_lora(ours, path, adapter="re")
    alphas = {p: layer.specs["re"].alpha for c in ("unet", "text_encoder") for p, layer in lora_layers(getattr(ours, c))}
    assert alphas["up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"] == 0.5
    assert alphas["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == 3.0
    assert alphas["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"] == 16.0
    assert alphas["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"] == 8.0
    assert sorted(v for p, v in alphas.items() if "q_proj" in p) == [2.0, 2.0, 8.0, 8.0, 8.0]
    ref = tiny_pipeline(0)
    ref.load_lora_weights(str(path), adapter_name="re")
    np.testing.assert_allclose(generate(ours), generate(ref), atol=1e-5)

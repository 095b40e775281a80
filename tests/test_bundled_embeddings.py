"""Textual-inversion embeddings bundled in a LoRA file (``bundle_emb.<name>.*``, as A1111 reads them and OneTrainer
writes them) load with it under their names as tokens, exactly as ``load_textual_inversion`` of the same vectors;
convert and merge keep them in kohya files; our pivotal tuning's embedding file is bundled on conversion to kohya."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import list_adapters, load_lora
from lora_diffusion.blend import merge_loras
from lora_diffusion.formats import LoraFormatError, read_lora_file, read_safetensors, to_kohya, write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline, tiny_sdxl_pipeline
from lora_diffusion.tools import convert_lora, inspect_lora


def _text(pipe, prompt: str, encoder: str = "text_encoder", tokenizer: str = "tokenizer") -> torch.Tensor:
    tok = getattr(pipe, tokenizer)
    ids = tok([pipe.maybe_convert_prompt(prompt, tok)], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, encoder)(ids)[0]


@pytest.mark.parametrize("part", ["string_to_param.*", "emb_params"])
def test_bundled_embedding_loads_as_a_textual_inversion(tmp_path, part):
    """A kohya LoRA with a two-vector embedding bundled: the LoRA's layers load as without it, and the prompt's token
    gives the text encoder output of ``load_textual_inversion`` of the same vectors (bit for bit); loading the file
    again under another adapter name keeps the token as it is."""
    pipe = tiny_pipeline(0)
    lora = random_lora(pipe, seed=1, std=0.3)
    state, header = to_kohya(lora)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({**state, f"bundle_emb.shiny.{part}": vectors}, str(tmp_path / "bundled.safetensors"), metadata=header)
    save_file(state, str(tmp_path / "plain.safetensors"), metadata=header)
    assert inspect_lora(tmp_path / "bundled.safetensors")["embeddings"] == ["shiny"]
    assert read_lora_file(tmp_path / "bundled.safetensors")[0].keys() == lora.keys()

    load_lora(pipe, tmp_path / "bundled.safetensors")
    ref = tiny_pipeline(0)
    load_lora(ref, tmp_path / "plain.safetensors")
    ref.load_textual_inversion({"shiny": vectors}, token="shiny")
    assert "shiny" in pipe.tokenizer.get_vocab() and "shiny_1" in pipe.tokenizer.get_vocab()
    assert torch.equal(_text(pipe, "a shiny circle"), _text(ref, "a shiny circle"))
    assert not torch.equal(_text(pipe, "a shiny circle"), _text(pipe, "a red circle"))
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    load_lora(pipe, tmp_path / "bundled.safetensors", adapter="again")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)  # the token kept, not added twice


def test_sdxl_bundle_and_errors(tmp_path):
    """An SDXL bundle (clip_l, clip_g) adds its token to both text encoders; in an SD pipeline it is refused, as are a
    vector of the wrong width and a bundle key of another shape, each naming the embedding or key."""
    sdxl = tiny_sdxl_pipeline(0)
    state, header = to_kohya(random_lora(sdxl, seed=2))
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(1, 32, generator=g), torch.randn(1, 48, generator=g)
    save_file({**state, "bundle_emb.glint.clip_l": clip_l, "bundle_emb.glint.clip_g": clip_g}, str(tmp_path / "xl.safetensors"), metadata=header)
    load_lora(sdxl, tmp_path / "xl.safetensors")
    row_l, row_g = sdxl.tokenizer.get_vocab()["glint"], sdxl.tokenizer_2.get_vocab()["glint"]
    assert torch.equal(sdxl.text_encoder.get_input_embeddings().weight[row_l], clip_l[0])
    assert torch.equal(sdxl.text_encoder_2.get_input_embeddings().weight[row_g], clip_g[0])

    sd = tiny_pipeline(0)
    sd_state, sd_header = to_kohya(random_lora(sd, seed=3))
    save_file({**sd_state, "bundle_emb.glint.clip_l": clip_l, "bundle_emb.glint.clip_g": clip_g}, str(tmp_path / "sd.safetensors"), metadata=sd_header)
    with pytest.raises(LoraFormatError, match="the embedding of 'glint' is SDXL's .* one text encoder"):
        load_lora(sd, tmp_path / "sd.safetensors")
    assert "glint" not in sd.tokenizer.get_vocab() and not list_adapters(sd)  # refused before anything changed
    save_file({**sd_state, "bundle_emb.wide.emb_params": torch.zeros(1, 40)}, str(tmp_path / "wide.safetensors"), metadata=sd_header)
    with pytest.raises(LoraFormatError, match=r"wide.safetensors: the vector of 'wide' has shape \(1, 40\)"):
        load_lora(tiny_pipeline(0), tmp_path / "wide.safetensors")
    save_file({**sd_state, "bundle_emb.odd.vectors": torch.zeros(1, 32)}, str(tmp_path / "odd.safetensors"), metadata=sd_header)
    with pytest.raises(LoraFormatError, match=r"'bundle_emb.odd.vectors' \[1, 32\] is not a bundled embedding"):
        read_lora_file(tmp_path / "odd.safetensors")


def test_convert_and_merge_keep_bundles(tmp_path, caplog):
    """kohya -> kohya keeps the bundle bit for bit; -> diffusers is refused unless --drop-embeddings; a merge keeps
    the bundles of its inputs in a kohya file and refuses a diffusers one."""
    pipe = tiny_pipeline(0)
    state, header = to_kohya(random_lora(pipe, seed=1))
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "bundled.safetensors"
    save_file({**state, "bundle_emb.shiny.string_to_param.*": vectors}, str(src), metadata=header)
    out = convert_lora(src, tmp_path / "again.safetensors", to="kohya")
    assert torch.equal(read_safetensors(out)[0]["bundle_emb.shiny.string_to_param.*"], vectors)
    with pytest.raises(LoraFormatError, match="shiny have no place in a diffusers LoRA file"):
        convert_lora(src, tmp_path / "d.safetensors", to="diffusers")
    with caplog.at_level(logging.WARNING):
        convert_lora(src, tmp_path / "d.safetensors", to="diffusers", drop_embeddings=True)
    assert "dropped the learned token embedding(s) shiny" in caplog.text
    write_lora_file(tmp_path / "other.safetensors", random_lora(pipe, seed=2), format="kohya")
    merged = merge_loras({src: 0.5, tmp_path / "other.safetensors": 0.5}, tmp_path / "merged.safetensors", format="kohya")
    assert torch.equal(read_safetensors(merged.path)[0]["bundle_emb.shiny.string_to_param.*"], vectors)
    with pytest.raises(ValueError, match="bundle the embeddings shiny, which a diffusers file cannot hold"):
        merge_loras({src: 0.5, tmp_path / "other.safetensors": 0.5}, tmp_path / "merged_d.safetensors")


@pytest.mark.parametrize("sdxl", [False, True])
def test_pivotal_tuning_file_is_bundled_for_kohya(tmp_path, sdxl):
    """Our pivotal-tuning LoRA (its embedding in a file beside it) converted to kohya carries the embedding bundled:
    in another folder, without that file, it loads the same token and text encoder outputs as the original."""
    pipe = tiny_sdxl_pipeline(0) if sdxl else tiny_pipeline(0)
    g = torch.Generator().manual_seed(0)
    (tmp_path / "run").mkdir()
    if sdxl:
        save_file({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 48, generator=g)},
                  str(tmp_path / "run" / "embeddings.safetensors"), metadata={"token": "<zq>"})
    else:
        save_file({"<zq>": torch.randn(32, generator=g)}, str(tmp_path / "run" / "embeddings.safetensors"))
    src = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    write_lora_file(src, random_lora(pipe, seed=4), metadata={"embedding_file": "embeddings.safetensors", "trigger_words": ["<zq>"]})
    (tmp_path / "shared").mkdir()
    out = convert_lora(src, tmp_path / "shared" / "zq.safetensors", to="kohya")
    assert inspect_lora(out)["embeddings"] == ["<zq>"] and "embedding_file" not in read_lora_file(out)[1]["lora_diffusion"]
    texts = []
    for file in (src, out):
        fresh = tiny_sdxl_pipeline(0) if sdxl else tiny_pipeline(0)
        load_lora(fresh, file)
        texts.append([_text(fresh, "a <zq> circle", enc, tok) for enc, tok in
                      ((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")) if sdxl else (("text_encoder", "tokenizer"),))])
    for a, b in zip(*texts):
        assert torch.equal(a, b)  # the same fp16 factors, the same vectors
    assert "<zq>" in fresh.tokenizer.get_vocab()


def test_bake_keeps_the_token_and_leaves_the_pipeline_as_it_was(tmp_path):
    """Baked into an SDXL model, a bundled token is in both saved tokenizers; the pipeline passed as the base gets
    both tokenizers back without it."""
    from lora_diffusion.tools import bake

    sdxl = tiny_sdxl_pipeline(0)
    state, header = to_kohya(random_lora(sdxl, seed=2))
    g = torch.Generator().manual_seed(0)
    save_file({**state, "bundle_emb.glint.clip_l": torch.randn(1, 32, generator=g), "bundle_emb.glint.clip_g": torch.randn(1, 48, generator=g)},
              str(tmp_path / "xl.safetensors"), metadata=header)
    sizes = (len(sdxl.tokenizer), len(sdxl.tokenizer_2), sdxl.text_encoder_2.get_input_embeddings().weight.shape[0])
    out = bake(sdxl, {tmp_path / "xl.safetensors": 1.0}, tmp_path / "baked")
    assert (len(sdxl.tokenizer), len(sdxl.tokenizer_2), sdxl.text_encoder_2.get_input_embeddings().weight.shape[0]) == sizes
    assert "glint" not in sdxl.tokenizer.get_vocab() and "glint" not in sdxl.tokenizer_2.get_vocab()
    from transformers import AutoTokenizer

    assert "glint" in AutoTokenizer.from_pretrained(out / "tokenizer_2").get_vocab()


def test_onetrainer_sd_bundle(tmp_path, caplog):
    """OneTrainer bundles an SD 1.x token as ``.clip_l`` alone, beside an output vector (``.clip_l_out``) that no
    diffusers pipeline applies: the token loads as ``load_textual_inversion`` of the vectors, and a warning names the
    output vector left out (as ComfyUI leaves it out)."""
    import logging

    pipe = tiny_pipeline(0)
    state, header = to_kohya(random_lora(pipe, seed=1))
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2, 32, generator=g)
    save_file({**state, "bundle_emb.shiny.clip_l": vectors, "bundle_emb.shiny.clip_l_out": torch.randn(2, 32, generator=g)},
              str(tmp_path / "ot.safetensors"), metadata=header)
    save_file(state, str(tmp_path / "plain.safetensors"), metadata=header)
    with caplog.at_level(logging.WARNING):
        load_lora(pipe, tmp_path / "ot.safetensors")
    assert "bundle_emb.shiny.clip_l_out (an output vector, OneTrainer's) is left out" in caplog.text
    ref = tiny_pipeline(0)
    load_lora(ref, tmp_path / "plain.safetensors")
    ref.load_textual_inversion({"shiny": vectors}, token="shiny")
    assert torch.equal(_text(pipe, "a shiny circle"), _text(ref, "a shiny circle"))

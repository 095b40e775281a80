"""PEFT adapters as PEFT saves them (``save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``,
keys under ``base_model.model.``), alone or in PEFT's DreamBooth layout (``unet/``, ``text_encoder/``), load as the
LoRA PEFT computes: its outputs (rank and alpha patterns, rsLoRA, DoRA), in fp64; convert writes them as files the
other tools read; what is not a PEFT LoRA is refused by name."""

import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lora_diffusion import list_adapters, load_lora  # noqa: E402
from lora_diffusion.formats import LoraFormatError, read_lora_file  # noqa: E402
from lora_diffusion.testing import tiny_pipeline  # noqa: E402
from lora_diffusion.tools import convert_lora, inspect_lora  # noqa: E402


def _outputs(unet, text_encoder, tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64), torch.tensor([500])
    with torch.no_grad():
        text = text_encoder(ids)[0]
        return text, unet(latents, t, encoder_hidden_states=text).sample


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _dreambooth_output(tmp_path, unet_config, te_config):
    """PEFT models of the tiny pipeline (fp64) with random adapters, saved as PEFT's DreamBooth example saves them."""
    ref = tiny_pipeline(0).to(torch.float64)
    unet = get_peft_model(ref.unet, unet_config)
    te = get_peft_model(ref.text_encoder, te_config)
    _randomize(unet, 1)
    _randomize(te, 2)
    unet.save_pretrained(tmp_path / "out" / "unet")
    te.save_pretrained(tmp_path / "out" / "text_encoder")
    return _outputs(unet, te, ref.tokenizer), tmp_path / "out"


@pytest.mark.parametrize("dora", [False, True])
def test_peft_dreambooth_folder_gives_peft_outputs(tmp_path, dora):
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                             rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}, use_dora=dora)
    te_config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"], use_rslora=True, use_dora=dora)
    want, out = _dreambooth_output(tmp_path, unet_config, te_config)
    pipe = tiny_pipeline(0).to(torch.float64)
    base = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert load_lora(pipe, out) == "out"
    got = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    lora, header = read_lora_file(out)
    assert header["_format"] == "peft"
    assert {k.split(".", 1)[0] for k in lora} == {"unet", "text_encoder"}
    to_k = next(w for k, w in lora.items() if k.endswith("attn1.to_k"))
    to_v = next(w for k, w in lora.items() if k.endswith("attn1.to_v"))
    q_proj = next(w for k, w in lora.items() if k.endswith("q_proj"))
    assert (to_k.rank, to_k.alpha, to_v.alpha, q_proj.alpha) == (2, 8.0, 3.0, 1.0 * 2**0.5)  # rsLoRA: alpha / sqrt(r)


def test_one_adapter_folder_or_its_file_and_conversion(tmp_path):
    """A single ``save_pretrained`` folder (the component told by its module paths), or its weights file, under the
    folder's name; ``convert`` writes diffusers and kohya files that load to the same outputs; ``inspect`` reads it."""
    ref = tiny_pipeline(0).to(torch.float64)
    unet = get_peft_model(ref.unet, LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "proj_in"]))
    _randomize(unet, 3)
    unet.save_pretrained(tmp_path / "my_style")
    want = _outputs(unet, ref.text_encoder, ref.tokenizer)[1]
    for source, name in ((tmp_path / "my_style", "my_style"), (tmp_path / "my_style" / "adapter_model.safetensors", "my_style")):
        pipe = tiny_pipeline(0).to(torch.float64)
        assert load_lora(pipe, source) == name
        torch.testing.assert_close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)[1], want, rtol=1e-10, atol=1e-10)
    assert inspect_lora(tmp_path / "my_style")["format"] == "peft"
    for to in ("diffusers", "kohya"):
        path = convert_lora(tmp_path / "my_style", tmp_path / f"as_{to}.safetensors", to=to, dtype=torch.float64)
        pipe = tiny_pipeline(0).to(torch.float64)
        load_lora(pipe, path)
        torch.testing.assert_close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)[1], want, rtol=1e-10, atol=1e-10)


def test_what_is_not_a_peft_lora_is_refused_by_name(tmp_path):
    ref = tiny_pipeline(0)
    unet = get_peft_model(ref.unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    unet.save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    pipe = tiny_pipeline(0)

    def refused(match, error=LoraFormatError):
        with pytest.raises(error, match=match):
            load_lora(pipe, tmp_path / "a")
        assert not list_adapters(pipe)

    config_path.write_text(json.dumps({**config, "peft_type": "LOHA"}))
    refused(r"a PEFT LOHA adapter; only PEFT LoRA adapters \(peft_type LORA\) are read")
    config_path.write_text(json.dumps({**config, "r": 8}))
    refused(r"to_q has rank 2 in its tensors but 8 in .*a/adapter_config.json")
    config_path.write_text("not json")
    refused(r"adapter_config.json: not a PEFT adapter config")
    config_path.write_text(json.dumps(config))
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "moved.safetensors")
    refused(r"adapter_model.safetensors: no such file beside .*adapter_config.json", FileNotFoundError)
    with pytest.raises(LoraFormatError, match=r"moved.safetensors: a PEFT adapter's weights .* read it with its adapter_config.json beside it"):
        load_lora(pipe, tmp_path / "a" / "moved.safetensors")  # (another name: not read as the folder's weights file)
    (tmp_path / "a" / "moved.safetensors").rename(tmp_path / "a" / "adapter_model.safetensors")
    assert load_lora(pipe, tmp_path / "a") == "a"

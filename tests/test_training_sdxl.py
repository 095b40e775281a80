"""SDXL LoRA training on a tiny offline SDXL pipeline: the conditioning is the pipeline's own (both text encoders,
the pooled text, the size and crop numbers), it learns, only LoRA parameters change, the file (UNet and both text
encoders) loads in stock diffusers with the same result, resume is exact, cached latents condition alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_diffusion.formats import read_lora_file, read_safetensors
from lora_diffusion.testing import tiny_sdxl_pipeline
from lora_diffusion.training import TrainConfig, train
from lora_diffusion.training.data import Example, ImageDataset
from lora_diffusion.training import outputs
from lora_diffusion.training.loop import condition, encode_text_sdxl, load_pipeline

from training_support import PROMPT, base_state, denoising_loss, flat_images, same_lora_from_a_single_file

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base_xl") / "tiny_xl"
    tiny_sdxl_pipeline(0).save_pretrained(path)
    return str(path)


def config(base: str, tmp_path: Path, **overrides) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        flat_images(data)
    values = dict(pretrained_model_name_or_path=base, train_data_dir=str(data), output_dir=str(tmp_path / "out"),
                  resolution=32, max_train_steps=3, seed=0, token="<s>", num_validation_images=0, checkpointing_steps=0)
    return TrainConfig(**{**values, **overrides})


def test_text_conditioning_is_the_pipelines_encode_prompt():
    pipe = tiny_sdxl_pipeline(0)
    captions = ["a red circle", "an image in the style of <s>, long " + "words " * 80]  # (the second is truncated)
    with torch.no_grad():
        states, pooled = encode_text_sdxl(pipe, captions, "cpu")
        expect, _, expect_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(states, expect) and torch.equal(pooled, expect_pooled)
    assert states.shape[-1] == pipe.unet.config.cross_attention_dim


@pytest.mark.parametrize("flip", [False, True])
def test_size_conditioning_is_what_the_pipeline_builds_for_that_crop(flip, tmp_path):
    """An image 40 wide, 20 high into a 16x16 bucket is resized to 32x16 and cropped at left 4 (x = 0.25): SDXL's
    numbers (original size, crop corner, target size; the corner mirrored when flipped), laid out as the pipeline's
    ``_get_add_time_ids``; the corner is where the loaded pixels come from in the (flipped) resized image."""
    import numpy as np

    pipe = tiny_sdxl_pipeline(0)
    gen = np.random.default_rng(0)
    Image.fromarray(gen.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    dataset = ImageDataset([Example(tmp_path / "x.png", "c", (40, 20))], resolution=16)
    left = 32 - 16 - 4 if flip else 4
    got = dataset.size_conditioning(0, flip, 0.25, 0.5)
    resized = Image.open(tmp_path / "x.png").convert("RGB").resize((32, 16), Image.BICUBIC, reducing_gap=3.0)
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    crop = np.asarray(resized.crop((left, 0, left + 16, 16)), dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(dataset.load(0, flip, 0.25, 0.5), torch.from_numpy(crop).permute(2, 0, 1))
    projection = pipe.text_encoder_2.config.projection_dim
    expect = pipe._get_add_time_ids((20, 40), (0, left), (16, 16), torch.float32, text_encoder_projection_dim=projection)
    assert torch.equal(torch.tensor([got], dtype=torch.float32), expect)
    _, added = condition(pipe, ["c"], torch.tensor([got]), "cpu", torch.float32)
    assert torch.equal(added["time_ids"], expect) and added["text_embeds"].shape == (1, projection)


def test_sdxl_training_learns(base, tmp_path):
    loss0 = denoising_loss(load_pipeline(base))
    result = train(config(base, tmp_path, max_train_steps=15, learning_rate=1e-2, train_batch_size=2,
                          target_modules="full", max_grad_norm=0.0))
    assert result.status == "completed" and result.global_step == 15
    loss1 = denoising_loss(result.pipeline)
    assert loss1 < 0.6 * loss0, (loss0, loss1)  # measured: 1.08 -> 0.48


def test_only_lora_changes_and_the_file_loads_in_stock_diffusers(base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = train(config(base, tmp_path, train_text_encoder=True, learning_rate=1e-2, save_precision="fp32"))
    fresh = load_pipeline(base)
    assert isinstance(result.pipeline, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        trained, original = base_state(getattr(result.pipeline, name)), getattr(fresh, name).state_dict()
        assert trained.keys() == original.keys(), name
        for key, value in original.items():
            assert torch.equal(trained[key], value), f"{name}.{key} changed"
    lora, _ = read_lora_file(result.lora_path)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        trained = [w for k, w in lora.items() if k.startswith(component + ".")]
        assert trained and any(w.B.abs().max() > 0 for w in trained), component

    stock = StableDiffusionXLPipeline.from_pretrained(base)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(result.output_dir), weight_name=outputs.LORA_NAME)
    ours = result.pipeline
    ours.unet.eval()
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    a = ours(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = stock(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(a, fresh(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resume_is_exact_and_cached_latents_condition_alike(base, tmp_path):
    """Resume restores both text encoders' adapters and learned vectors (bit-identical weights); with centre crops, cached latents give
    the weights that encoding every step gives, so the cached batches carry the same size conditioning (the images
    are 48x32: a crop at left 8)."""
    hard = dict(max_train_steps=4, learning_rate=5e-3, train_text_encoder=True, save_precision="fp32",
                checkpointing_steps=2, center_crop=True, random_flip=True, pivotal_tuning=True, token="<new-word>")
    for run in ("a", "b", "c"):
        flat_images(tmp_path / run / "data", size=(48, 32))
    straight = train(config(base, tmp_path / "a", **hard))
    stopped = train(config(base, tmp_path / "b", **hard), progress=lambda p: p["step"] < 2)
    assert stopped.status == "cancelled" and stopped.global_step == 2
    resumed = train(config(base, tmp_path / "b", resume_from_checkpoint="latest", **hard))
    cached = train(config(base, tmp_path / "c", cache_latents=True, **hard))
    a, b, c = ({**read_safetensors(r.lora_path)[0], **read_safetensors(r.output_dir / "embeddings.safetensors")[0]}
               for r in (straight, resumed, cached))
    assert {"clip_l", "clip_g"} <= a.keys()
    assert any(k.startswith("text_encoder_2.") for k in a)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-6, msg=key)


def test_pivotal_tuning_learns_one_vector_per_text_encoder_and_loads_alike(base, tmp_path):
    """SDXL pivotal tuning writes ``{"clip_l": [1, w1], "clip_g": [1, w2]}`` (the token in the file's metadata), which
    stock diffusers loads with one ``load_textual_inversion`` per encoder and ``load_lora`` loads from beside the
    LoRA: the three give the same images."""
    from diffusers import StableDiffusionXLPipeline

    from lora_diffusion import load_lora

    result = train(config(base, tmp_path, pivotal_tuning=True, token="<new-word>", learning_rate=5e-2,
                          save_precision="fp32"))
    out = tmp_path / "out"
    embedding, header = read_safetensors(out / "embeddings.safetensors")
    fresh = load_pipeline(base)
    assert header["token"] == "<new-word>" and sorted(embedding) == ["clip_g", "clip_l"]
    for key, encoder in (("clip_l", fresh.text_encoder), ("clip_g", fresh.text_encoder_2)):
        start = encoder.get_input_embeddings().weight.mean(0)  # where the vector started (no initializer word)
        assert embedding[key].shape == (1, start.shape[0])
        assert not torch.allclose(embedding[key][0], start), key  # it learned

    stock = StableDiffusionXLPipeline.from_pretrained(base)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(out), weight_name=outputs.LORA_NAME)
    stock.load_textual_inversion(embedding["clip_l"], token="<new-word>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(embedding["clip_g"], token="<new-word>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    load_lora(fresh, out)
    assert "<new-word>" in fresh.tokenizer.get_vocab() and "<new-word>" in fresh.tokenizer_2.get_vocab()
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    prompt = "a photo of <new-word>"
    ours = result.pipeline
    ours.unet.eval()
    images = [p(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images for p in (ours, stock, fresh)]
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images[2], images[0], rtol=1e-4, atol=1e-4)


def test_an_sdxl_single_file_checkpoint_loads_as_sdxl_and_trains_the_lora_its_folder_trains(base, tmp_path, monkeypatch):
    """(Its class told from its keys: an SDXL file loaded as StableDiffusionPipeline drops the second text encoder.)"""
    same_lora_from_a_single_file(base, tmp_path, config, monkeypatch)

"""Training data and settings without a model: image repair, captions, buckets, batch order, config files, flags."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_diffusion.training import ConfigError, DataError, TrainConfig, load_config
from lora_diffusion.training.cli import build_parser, main
from lora_diffusion.training.config import config_from_args
from lora_diffusion.training.data import (BatchPlan, Example, ImageDataset, KohyaBuckets, StepBatchSampler, compose_caption,
                                          make_buckets, scan_images)

ISSUE_FLAGS = """--pretrained_model_name_or_path --train_data_dir --output_dir --caption_extension --mode --token
--instance_prompt --class_prompt --with_prior_preservation --class_data_dir --num_class_images --prior_loss_weight --rank
--lora_alpha --lora_dropout --target_modules --train_text_encoder --learning_rate --text_encoder_lr --lr_scheduler
--lr_warmup_steps --max_train_steps --num_train_epochs --train_batch_size --gradient_accumulation_steps --resolution
--center_crop --random_flip --enable_bucket --mixed_precision --gradient_checkpointing --use_8bit_adam --snr_gamma
--noise_offset --cache_latents --checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint
--validation_prompt --validation_steps --num_validation_images --seed --config --strict --overwrite""".split()
DIFFUSERS_FLAGS = "--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay --lr_num_cycles --lr_power".split()


# ---------------------------------------------------------------------------------------------- images
def test_every_image_mode_and_size_becomes_an_rgb_tensor_of_the_training_size(tmp_path):
    red = (200, 20, 20)
    images = {
        "cmyk.jpg": Image.new("CMYK", (40, 40), (0, 230, 230, 55)),
        "gray.png": Image.new("L", (40, 40), 128),
        "gray16.png": Image.new("I;16", (40, 40), 30000),
        "alpha.png": Image.new("RGBA", (40, 40), (*red, 0)),  # fully transparent: white
        "palette.gif": Image.new("RGB", (40, 40), red).convert("P"),
        "tiny.png": Image.new("RGB", (3, 2), red),
        "huge.jpg": Image.new("RGB", (3000, 1000), red),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    examples = scan_images(tmp_path, resolution=32)
    assert sorted(e.path.name for e in examples) == sorted(images)
    dataset = ImageDataset(examples, resolution=32)
    by_name = {e.path.name: dataset[(i, 0)]["pixel_values"] for i, e in enumerate(examples)}
    for name, pixels in by_name.items():
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32, name
        assert pixels.min() >= -1 and pixels.max() <= 1, name
    assert torch.allclose(by_name["alpha.png"], torch.ones(3, 32, 32))
    assert (by_name["gray.png"][0] == by_name["gray.png"][1]).all()
    for name in ("tiny.png", "huge.jpg", "palette.gif"):
        assert by_name[name][0].mean() > 0.4 and by_name[name][1].mean() < -0.6, name  # still red


def test_huge_images_are_read_and_only_a_decompression_bomb_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for PIL's 89.5 MP: the test stays small
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "huge.png")  # over the limit, under twice it
    Image.new("RGB", (50, 50), (200, 20, 20)).save(tmp_path / "bomb.png")  # over twice the limit
    with caplog.at_level(logging.WARNING):
        found = scan_images(tmp_path, resolution=8)
    assert [e.path.name for e in found] == ["huge.png"] and found[0].size == (40, 30)
    assert ImageDataset(found, resolution=8)[(0, 0)]["pixel_values"].shape == (3, 8, 8)
    assert re.search(r"bomb.png.*2500 pixels", caplog.text) and "huge.png" not in caplog.text
    with pytest.raises(DataError, match=r"bomb.png: cannot read image \(too large to decode: .*2500 pixels"):
        scan_images(tmp_path, resolution=8, strict=True)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert scan_images(tmp_path, resolution=32)[0].size == (20, 40)


# ---------------------------------------------------------------------------------------------- captions
def test_captions_sidecar_then_metadata_then_instance_prompt_with_the_token(tmp_path):
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a red house\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "a blue car"}) + "\n"
                                             + json.dumps({"file_name": "sub/d.png", "text": "<tok> already here"}) + "\n")
    found = {e.path.name: e.caption for e in scan_images(tmp_path, token="<tok>", instance_prompt="a painting", resolution=8)}
    assert found == {
        "a.png": "a red house, in the style of <tok>",
        "b.png": "a blue car, in the style of <tok>",
        "c.png": "a painting, in the style of <tok>",  # no caption: the instance prompt
        "d.png": "<tok> already here",
    }
    subject = {e.path.name: e.caption for e in scan_images(tmp_path, mode="subject", token="sks", resolution=8)}
    assert subject["a.png"] == "sks, a red house" and subject["c.png"] == "a photo of sks"
    assert compose_caption(None, mode="style", token="") == ""
    # the token as a word of its own, not inside another ("desks" holds no "sks", "artistic" no "art")
    assert compose_caption("two desks in an office", mode="subject", token="sks") == "sks, two desks in an office"
    assert compose_caption("a painting, artistic", token="art") == "a painting, artistic, in the style of art"
    assert compose_caption("a photo of sks, smiling", mode="subject", token="sks") == "a photo of sks, smiling"


def test_caption_encodings_and_metadata_file_names(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a triangle", encoding="utf-16")  # with its BOM, as Windows' Notepad writes it
    (tmp_path / "b.txt").write_bytes("\ufeffa square".encode("utf-8"))  # a UTF-8 BOM
    (tmp_path / "metadata.jsonl").write_bytes("\ufeff".encode("utf-8") + b'{"file_name": "./c.png", "text": "a circle"}\n'
                                              + b'{"file_name": "missing.png", "text": "nothing"}\n')
    with caplog.at_level(logging.WARNING):
        found = {e.path.name: e.caption for e in scan_images(tmp_path, resolution=8)}
    assert found == {"a.png": "a triangle", "b.png": "a square", "c.png": "a circle", "d.png": ""}
    assert "1 of its 2 entries name no image" in caplog.text and "missing.png" in caplog.text
    (tmp_path / "d.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=r"d.txt:1: not UTF-8 text"):
        scan_images(tmp_path, resolution=8)


def test_a_broken_metadata_line_is_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:1"):
        scan_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"metadata.jsonl:1: not UTF-8 text \(byte 0xe9\)"):
        scan_images(tmp_path)


# ---------------------------------------------------------------------------------------------- buckets, order
def test_buckets_keep_the_area_and_fit_the_aspect_ratio(tmp_path):
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.5 for w, h in buckets)
    Image.new("RGB", (1200, 600)).save(tmp_path / "wide.png")
    Image.new("RGB", (500, 800)).save(tmp_path / "tall.png")
    dataset = ImageDataset(scan_images(tmp_path, resolution=512), resolution=512, enable_bucket=True)
    sizes = {e.path.name: dataset[(i, 0)]["pixel_values"].shape for i, e in enumerate(dataset.examples)}
    assert sizes["wide.png"][2] > sizes["wide.png"][1] and sizes["tall.png"][1] > sizes["tall.png"][2]
    for name, ratio in (("wide.png", 2.0), ("tall.png", 500 / 800)):
        _, h, w = sizes[name]
        assert abs(math.log(w / h / ratio)) < math.log(1.15), (name, w, h)  # aspect kept within 15%
        assert 0.75 * 512 * 512 <= w * h <= 512 * 512, (name, w, h)  # about the training area


# sd-scripts' BucketManager (max_reso 512x512, min 256, max 1024, steps 64) on these image sizes, run once from its
# source: (bucket, the size the image is resized to before the crop)
KOHYA_BUCKETS = {False: {(1000, 600): ((640, 384), (640, 384)), (300, 900): ((256, 832), (277, 832)),
                         (512, 512): ((512, 512), (512, 512)), (700, 500): ((576, 448), (627, 448)),
                         (200, 150): ((576, 448), (597, 448)), (3000, 1000): ((832, 256), (832, 277))},
                 True: {(1000, 600): ((640, 384), (640, 384)), (300, 900): ((256, 768), (256, 768)),
                        (512, 512): ((512, 512), (512, 512)), (700, 500): ((512, 384), (538, 384)),
                        (200, 150): ((192, 128), (200, 150)), (3000, 1000): ((768, 256), (768, 256))}}


def test_kohya_buckets_are_sd_scripts_and_no_upscale_enlarges_nothing(tmp_path):
    """kohya's bucket settings make sd-scripts' buckets and pick them as it does (its own output above); with
    --bucket_no_upscale a small image is cropped at its own size, its pixels as they are; a kohya command line gets
    kohya's buckets, ours stay ours."""
    grid = KohyaBuckets().grid(512)
    assert grid == [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    for no_upscale, cases in KOHYA_BUCKETS.items():
        examples = [Example(path=tmp_path / "x.png", caption="", size=size) for size in cases]
        dataset = ImageDataset(examples, resolution=512, enable_bucket=True, kohya_buckets=KohyaBuckets(no_upscale=no_upscale))
        got = {e.size: (dataset.buckets()[i], dataset.resized_size(i)) for i, e in enumerate(examples)}
        assert got == cases, no_upscale
    # kohya's --resolution WIDTH,HEIGHT: without buckets every image is that size; kohya's buckets hold its area
    sizes = [Example(path=tmp_path / "x.png", caption="", size=size) for size in ((1000, 600), (300, 900))]
    assert ImageDataset(sizes, resolution=512, height=768).buckets() == [(512, 768), (512, 768)]
    assert KohyaBuckets().grid(512, 768) == sorted(KohyaBuckets().grid(512, 768))
    assert max(w * h for w, h in KohyaBuckets().grid(512, 768)) <= 512 * 768 < max(w * h for w, h in KohyaBuckets().grid(640, 640))
    pixels = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "small.png")
    small = ImageDataset(scan_images(tmp_path, resolution=512), resolution=512, enable_bucket=True, center_crop=True,
                         kohya_buckets=KohyaBuckets(no_upscale=True))
    tensor = small[(0, 0)]["pixel_values"]
    assert tensor.shape == (3, 128, 192)
    crop = pixels[11:139, 4:196]  # (the centre: (150 - 128) / 2, (200 - 192) / 2)
    assert torch.equal(tensor, torch.from_numpy(crop.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))

    kohya = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--network_module", "networks.lora", "--enable_bucket"]
    config = config_from_args(build_parser().parse_args(kohya + ["--min_bucket_reso", "320", "--bucket_no_upscale"]))
    config.validate()
    assert (config.uses_kohya_buckets, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps,
            config.bucket_no_upscale) == (True, 320, 0, 64, True)  # (0: kohya's 1024)
    assert config_from_args(build_parser().parse_args(kohya)).uses_kohya_buckets
    assert not config_from_args(build_parser().parse_args(kohya[:4] + ["--enable_bucket"])).uses_kohya_buckets
    for extra, match in ((["--bucket_reso_steps", "20"], "--bucket_reso_steps must be a multiple of 8"),
                         (["--max_bucket_reso", "256", "--resolution", "512"], r"--max_bucket_reso >= --resolution \(512\)"),
                         (["--resolution", "32"], r"--resolution 32 is below --bucket_reso_steps \(64\)")):
        with pytest.raises(ConfigError, match=match):
            config_from_args(build_parser().parse_args(kohya + extra)).validate()


def test_color_aug_shifts_the_hue_or_gamma_of_a_third_of_the_samples(tmp_path):
    """kohya's --color_aug: about a third of the samples change, each by a small hue shift or gamma (the mean colour
    moves a little), the others stay the plain sample; the same (image, seed) is the same sample every time."""
    pixels = np.random.default_rng(1).integers(30, 220, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    examples = scan_images(tmp_path, resolution=32)
    plain, aug = (ImageDataset(examples, resolution=32, color_aug=c) for c in (False, True))
    changed = 0
    for seed in range(60):
        a, b = plain[(0, seed)]["pixel_values"], aug[(0, seed)]["pixel_values"]
        assert torch.equal(b, aug[(0, seed)]["pixel_values"])
        if not torch.equal(a, b):
            changed += 1
            assert 0 < (a - b).abs().mean() < 0.25, seed
    assert 10 <= changed <= 30, changed


def test_kohya_folders_repeat_their_images_and_caption_those_without_a_caption(tmp_path, caplog):
    """``10_sks dog/``: kohya's DreamBooth-style folder names give repeats per epoch and the caption of images that
    have none (a sidecar or metadata.jsonl caption wins); other folders and the root count once."""
    for rel in ("3_sks dog/a.png", "3_sks dog/b.png", "1_red things/c.png", "plain/d.png", "e.png", "0_off/f.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / rel)
    (tmp_path / "3_sks dog" / "b.txt").write_text("a dog on grass")
    with caplog.at_level(logging.INFO):
        examples = scan_images(tmp_path, token="sks", mode="subject", resolution=32)
    got = {e.path.name: (e.caption, e.repeats) for e in examples}
    assert got == {"a.png": ("sks dog", 3), "b.png": ("sks, a dog on grass", 3), "c.png": ("sks, red things", 1),
                   "d.png": ("a photo of sks", 1), "e.png": ("a photo of sks", 1), "f.png": ("sks, off", 0)}
    assert "kohya-style folder '3_sks dog': its images come 3 times per epoch" in caplog.text
    dataset = ImageDataset(examples, resolution=32)
    names = [e.path.name for e in examples]
    plan = BatchPlan(dataset.buckets(), 1, seed=5, repeats=dataset.repeats())
    assert plan.batches_per_epoch == 3 + 3 + 1 + 1 + 1
    epoch = [plan.batch(g)[0] for g in range(plan.batches_per_epoch)]
    assert sorted(names[k.index] for k in epoch) == ["a.png"] * 3 + ["b.png"] * 3 + ["c.png", "d.png", "e.png"]
    assert len({k.seed for k in epoch if names[k.index] == "a.png"}) == 3  # each repeat its own crop and flip
    # an epoch of single repeats is the plan without repeats, batch for batch and seed for seed
    once = [1] * len(names)
    assert [BatchPlan(dataset.buckets(), 2, 5, once).batch(g) for g in range(9)] == [BatchPlan(dataset.buckets(), 2, 5).batch(g) for g in range(9)]


def test_caption_shuffle_and_dropout_vary_by_sample_and_stay_reproducible(tmp_path):
    """kohya's --shuffle_caption / --keep_tokens / --caption_dropout_rate / --caption_tag_dropout_rate: a function of
    the sample's seed (resumable), the kept tags first, the same tags shuffled; all off, the caption as it is."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks, red, square, flat, plain, simple")
    examples = scan_images(tmp_path, resolution=32)
    plain = ImageDataset(examples, resolution=32)
    assert {plain.caption(0, s) for s in range(20)} == {"sks, red, square, flat, plain, simple"}
    shuffled = ImageDataset(examples, resolution=32, shuffle_caption=True, keep_tokens=1)
    captions = [shuffled.caption(0, s) for s in range(40)]
    assert captions == [shuffled.caption(0, s) for s in range(40)]  # the same seeds, the same captions
    assert len(set(captions)) > 20 and all(c.startswith("sks, ") for c in captions)
    assert all(sorted(c.split(", ")) == sorted(examples[0].caption.split(", ")) for c in captions)
    assert [shuffled.augmentation(0, s) for s in range(5)] == [plain.augmentation(0, s) for s in range(5)]  # crops unchanged
    dropped = ImageDataset(examples, resolution=32, caption_dropout_rate=0.5, caption_tag_dropout_rate=0.5, keep_tokens=1)
    captions = [dropped.caption(0, s) for s in range(200)]
    assert 60 < captions.count("") < 140
    kept = [c for c in captions if c]
    assert all(c.startswith("sks") and set(c.split(", ")) <= set(examples[0].caption.split(", ")) for c in kept)
    assert 1.5 < sum(len(c.split(", ")) - 1 for c in kept) / len(kept) < 3.5  # about half of the 5 droppable tags
    with pytest.raises(ConfigError, match=r"--caption_dropout_rate must be in \[0, 1\], got 1.5"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path), caption_dropout_rate=1.5).validate()


def test_kohyas_caption_separators_and_wildcards(tmp_path):
    """kohya's --keep_tokens_separator (tags before it fixed, after a second one a fixed suffix), --secondary_separator
    (tags joined by it move as one, then read with a comma) and --enable_wildcard (one line, one {a|b} choice; {{ }}
    literal), each a function of the sample's seed."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks, girl ||| red;;;hair, smile, sky, tree ||| masterpiece")
    examples = scan_images(tmp_path, resolution=32)
    data = ImageDataset(examples, resolution=32, shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;")
    captions = [data.caption(0, s) for s in range(40)]
    assert captions == [data.caption(0, s) for s in range(40)] and len(set(captions)) > 10
    for c in captions:
        tags = c.split(", ")
        assert tags[:2] == ["sks", "girl"] and tags[-1] == "masterpiece" and "red,hair" in tags, c
        assert sorted(tags[2:-1]) == ["red,hair", "sky", "smile", "tree"], c
    (tmp_path / "a.txt").write_text("a {red|blue} square on {{white}}\na {big|small} circle")
    wild = ImageDataset(scan_images(tmp_path, resolution=32), resolution=32, enable_wildcard=True)
    seen = {wild.caption(0, s) for s in range(60)}
    assert seen == {"a red square on {white}", "a blue square on {white}", "a big circle", "a small circle"}
    # --caption_separator: the tags split there, joined with ", "; --caption_dropout_every_n_epochs 3: epochs 3, 6 (from 1)
    (tmp_path / "a.txt").write_text("sks; red; square, flat")
    tagged = ImageDataset(scan_images(tmp_path, resolution=32), resolution=32, shuffle_caption=True, keep_tokens=1,
                          caption_separator=";", caption_dropout_every_n_epochs=3)
    shuffled = {tagged.caption(0, s) for s in range(30)}
    assert shuffled == {"sks, red, square, flat", "sks, square, flat, red"}
    assert [tagged.caption(0, 7, epoch) == "" for epoch in range(7)] == [False, False, True, False, False, True, False]


def test_kohya_dataset_config_subsets_each_with_their_settings(tmp_path):
    """kohya's --dataset_config: each subset's setting from the subset, its data set, [general], else the command
    line; its folder alone (not sub-folders), num_repeats, class_tokens where an image has no caption file, is_reg
    subsets the regularisation images; the data set's sizes become the run's. Each example varies by its own
    settings. Bad files are named with the setting's place."""
    from lora_diffusion.training.dataset_config import read_dataset_config

    for name in ("a", "b"):
        Image.new("RGB", (48, 32)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.caption").write_text("sks; red; square")
    (tmp_path / "a.txt").write_text("not this one")
    (tmp_path / "deeper").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "deeper" / "c.png")
    (tmp_path / "reg").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "reg" / "d.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
caption_extension = ".caption"
shuffle_caption = true
[[datasets]]
resolution = [64, 48]
batch_size = 2
enable_bucket = true
caption_separator = ";"
  [[datasets.subsets]]
  image_dir = '{tmp_path}'
  num_repeats = 3
  class_tokens = "sks dog"
  keep_tokens = 1
  caption_prefix = "photo"
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  is_reg = true
  class_tokens = "dog"
  shuffle_caption = false
  random_crop = true
""")
    config = TrainConfig(pretrained_model_name_or_path="m", dataset_config=str(toml), color_aug=True, center_crop=True, token="sks")
    found = read_dataset_config(toml, config)
    assert found.settings == {"resolution": 64, "resolution_height": 48, "train_batch_size": 2, "enable_bucket": True}
    config = dataclasses.replace(config, **found.settings)
    train, reg = found.scan(config)
    assert [(e.path.name, e.caption, e.repeats) for e in train] == [("a.png", "photo sks; red; square", 3), ("b.png", "photo sks dog", 3)]
    assert [(e.path.name, e.caption, e.repeats) for e in reg] == [("d.png", "dog", 1)]
    first, second = train[0].options, reg[0].options
    assert (first.shuffle_caption, first.keep_tokens, first.caption_separator, first.color_aug, first.center_crop) == (True, 1, ";", True, True)
    assert (second.shuffle_caption, second.keep_tokens, second.caption_separator, second.center_crop) == (False, 0, ";", False)
    data = ImageDataset(train + reg, resolution=64, height=48)
    assert {data.caption(0, s) for s in range(20)} == {"photo sks, red, square", "photo sks, square, red"}
    assert {data.caption(2, s) for s in range(5)} == {"dog"} and {data.augmentation(0, s)[1] for s in range(5)} == {0.5}
    assert len({data.augmentation(2, s)[1] for s in range(5)}) == 5  # (the reg subset's random crop)
    toml.write_text(toml.read_text().replace("is_reg = true", "is_reg = true\nalpha_mask = true") + f"""
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  conditioning_data_dir = '{tmp_path / "reg"}'
""")
    train, reg = read_dataset_config(toml, config).scan(config)
    assert [(e.mask, e.mask_channel) for e in reg] == [(tmp_path / "reg" / "d.png", "A")]
    assert train[-1].mask == tmp_path / "reg" / "d.png" and train[-1].mask_channel == "R" and train[0].mask is None

    def refused(text: str, match: str) -> None:
        toml.write_text(text)
        with pytest.raises(ConfigError, match=match):
            read_dataset_config(toml, config)

    subset = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n"
    refused(subset + "num_repeats = 'ten'", r"dataset.toml: datasets\[0\].subsets\[0\].num_repeats: expected a whole number, got 'ten'")
    refused(subset + "alpha_mask = true\nconditioning_data_dir = 'm'", r"datasets\[0\].subsets\[0\]: give its masks as conditioning_data_dir or alpha_mask")
    refused(subset + "face_crop_aug_range = [2.0, 4.0]", r"datasets\[0\].subsets\[0\].face_crop_aug_range: face crop augmentation")
    refused(subset + "colour_aug = true", r"datasets\[0\].subsets\[0\]: unknown setting 'colour_aug'")
    refused(subset + "caption_dropout_rate = 1.5", r"datasets\[0\].subsets\[0\]: --caption_dropout_rate must be in \[0, 1\]")
    refused(subset + "caption_extension = 'txt'", r"datasets\[0\].subsets\[0\]: --caption_extension should start with a dot")
    refused("[general]\nnetwork_multiplier = 0.5\n" + subset, r"general.network_multiplier: a data set's own LoRA strength")
    refused("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2", r"datasets\[0\].subsets\[0\]: image_dir is required")
    refused("[general]\nbatch_size = 2", "no data set: give at least one")
    refused(subset + subset.replace("[[datasets]]", "[[datasets]]\nvalidation_split = 0.1"),
            r"datasets\[1\]: its validation_split \(0.1\) is not datasets\[0\]'s \(unset\): give it once")
    # several data sets of their own sizes: each example its group; batches of one data set, at its batch size
    toml.write_text(subset.replace("[[datasets]]", "[[datasets]]\nresolution = 32\nbatch_size = 2") +
                    subset.replace("[[datasets]]", "[[datasets]]\nresolution = [48, 32]\nenable_bucket = true\nbucket_reso_steps = 16\nmin_bucket_reso = 16\nmax_bucket_reso = 64"))
    config = TrainConfig(pretrained_model_name_or_path="m", dataset_config=str(toml))
    found = read_dataset_config(toml, config)
    sizes = found.sizes(config)
    assert found.settings == {"resolution": 32, "resolution_height": 0, "train_batch_size": 2}
    assert [(s.resolution, s.height, s.enable_bucket, s.kohya_buckets is not None, s.batch_size) for s in sizes.values()] == [
        (32, None, False, False, 2), (48, 32, True, True, 1)]
    train, _ = found.scan(config)
    assert [e.group for e in train] == [0, 0, 1, 1]
    data = ImageDataset(train, resolution=32, group_sizes=sizes)
    assert data.buckets() == [(32, 32), (32, 32), (48, 32), (48, 32)]
    plan = BatchPlan(data.buckets(), {0: 2, 1: 1}, 3, data.repeats(), data.groups())
    batches = [plan.batch(g) for g in range(plan.batches_per_epoch)]
    assert sorted(len(b) for b in batches) == [1, 1, 2] and all(len({data.groups()[k.index] for k in b}) == 1 for b in batches)
    same = [BatchPlan([(32, 32)] * 5, 2, 9, groups=[0] * 5).batch(g) for g in range(6)]
    assert same == [BatchPlan([(32, 32)] * 5, 2, 9).batch(g) for g in range(6)]
    refused("[[datasets]\n", "not valid TOML")
    toml.write_text(subset.replace(str(tmp_path), str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"datasets\[0\].subsets\[0\].image_dir .*nowhere: no such folder"):
        read_dataset_config(toml, config).scan(config)


def test_loss_masks_follow_their_images_crop_and_flip(tmp_path):
    """kohya's loss masks, a same-named mask image's red channel or the image's own alpha, are cropped and flipped as
    the image is, sample by sample; an image without a mask is named."""
    from lora_diffusion.training.data import attach_masks, collate

    (tmp_path / "data").mkdir()
    (tmp_path / "masks").mkdir()
    half = Image.new("RGB", (48, 32), (255, 255, 255))
    half.paste((0, 0, 0), (0, 0, 20, 32))  # (black on the left, white on the right)
    half.save(tmp_path / "data" / "a.png")
    half.save(tmp_path / "masks" / "a.jpg")
    cut = Image.new("RGBA", (48, 32), (0, 0, 0, 255))
    cut.paste((255, 255, 255, 0), (20, 0, 48, 32))  # (opaque black on the left, transparent on the right)
    cut.save(tmp_path / "data" / "b.png")
    examples = scan_images(tmp_path / "data", resolution=32)
    masked = attach_masks(examples[:1], tmp_path / "masks", tmp_path / "data") + attach_masks(examples[1:], None, alpha=True)
    data = ImageDataset(masked, resolution=32, random_flip=True)
    seen = set()
    for s in range(12):
        for index, flip_mask in ((0, False), (1, True)):
            item = data[(index, s)]
            white, mask = item["pixel_values"][0] > 0, item["mask"][0] > 0.5
            assert torch.equal(white, ~mask if flip_mask else mask), (index, s)
            seen.add((item["flip"], int(white[0].sum())))
    assert len(seen) > 6  # (several crops, flipped and not)
    assert collate([data[(0, 0)], data[(1, 0)]])["masks"].shape == (2, 1, 32, 32)
    assert collate([ImageDataset(examples, resolution=32)[(0, 0)]])["masks"] is None
    with pytest.raises(DataError, match=r"masks: no mask for 1 image\(s\), e.g. b.png"):
        attach_masks(examples, tmp_path / "masks", tmp_path / "data")


def test_kohya_fine_tuning_metadata_names_the_images_and_their_captions(tmp_path):
    """kohya's --in_json (and a dataset config's metadata_file): .json {key: {caption, tags}} or .jsonl lines; a key is
    a path (absolute, or in the image folder) or an image's name without its extension; the caption, the separator
    and the tags; only the images it names; a key without an image, or a file that is not such metadata, is named."""
    from lora_diffusion.training.data import read_fine_tuning_metadata
    from lora_diffusion.training.dataset_config import read_dataset_config

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "unlisted.png"):
        Image.new("RGB", (32, 32)).save(images / name)
    Image.new("RGB", (32, 32)).save(tmp_path / "far.webp")
    table = {"a": {"caption": "a red square", "tags": "red, square"}, "sub/b.jpg": {"tags": "blue"},
             str(tmp_path / "far.webp"): {"caption": "far away"}}
    (tmp_path / "meta.json").write_text(json.dumps(table))
    captions = read_fine_tuning_metadata(tmp_path / "meta.json", images)
    assert captions == {images / "a.png": "a red square,red, square", images / "sub" / "b.jpg": "blue", tmp_path / "far.webp": "far away"}
    examples = scan_images(images, captions=captions, resolution=32)
    assert sorted((e.path.name, e.caption) for e in examples) == [("a.png", "a red square,red, square"), ("b.jpg", "blue"),
                                                                   ("far.webp", "far away")]
    (tmp_path / "meta.jsonl").write_text('{"image_path": "a", "caption": "x", "tags": "y"}\n\n')
    assert read_fine_tuning_metadata(tmp_path / "meta.jsonl", images, separator=" ||| ") == {images / "a.png": "x ||| y"}
    for text, match in (('{"nothing": {"caption": "x"}}', r"meta.json: no image for 'nothing'"), ("[1, 2]", "not kohya's fine-tuning metadata"),
                        ("{", "not kohya's fine-tuning metadata")):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(DataError, match=match):
            read_fine_tuning_metadata(tmp_path / "meta.json", images)
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "from the table"}}))
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}'\nmetadata_file = '{tmp_path / 'meta.json'}'\n")
    config = TrainConfig(pretrained_model_name_or_path="m", dataset_config=str(toml))
    assert [(e.path.name, e.caption) for e in read_dataset_config(toml, config).scan(config)[0]] == [("a.png", "from the table")]
    toml.write_text(toml.read_text() + "is_reg = true\n")
    with pytest.raises(ConfigError, match=r"subsets\[0\]: a fine-tuning subset \(metadata_file\) is not is_reg"):
        read_dataset_config(toml, config)


def test_resize_interpolation_as_kohya_names_it(tmp_path):
    """kohya's --resize_interpolation: area (each pixel the mean of the ones it covers), lanczos, ...; auto, kohya's
    default (a kohya command line's), area when shrinking and lanczos when enlarging; unset, bicubic."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    examples = scan_images(tmp_path, resolution=32)  # (big.png, small.png)

    def pixels(name: str, index: int) -> np.ndarray:
        tensor = ImageDataset(examples, resolution=32, center_crop=True, resize_interpolation=name)[(index, 0)]["pixel_values"]
        return np.rint((tensor.permute(1, 2, 0).numpy() + 1) * 127.5)

    big = np.asarray(Image.open(tmp_path / "big.png"), dtype=np.float64)
    means = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(pixels("area", 0) - means).max() <= 1 and np.array_equal(pixels("auto", 0), pixels("area", 0))
    lanczos = np.asarray(Image.open(tmp_path / "small.png").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    assert np.array_equal(pixels("auto", 1), lanczos) and np.array_equal(pixels("lanczos", 1), lanczos)
    assert not np.array_equal(pixels("", 0), pixels("area", 0))  # (bicubic)
    with pytest.raises(ConfigError, match="--resize_interpolation 'cubic': choose one of"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", resize_interpolation="cubic").validate()


def test_batch_order_is_a_function_of_the_seed_and_covers_each_epoch(tmp_path):
    buckets = [(32, 32)] * 5 + [(48, 16)] * 3
    plan = BatchPlan(buckets, batch_size=2, seed=7)
    assert plan.batches_per_epoch == 3 + 2
    epoch0 = [plan.batch(g) for g in range(plan.batches_per_epoch)]
    assert sorted(k.index for b in epoch0 for k in b) == list(range(8))
    assert all(len({buckets[k.index] for k in b}) == 1 for b in epoch0)  # one bucket per batch
    assert {k.epoch for b in epoch0 for k in b} == {0} and {k.epoch for k in plan.batch(plan.batches_per_epoch)} == {1}
    assert [BatchPlan(buckets, 2, 7).batch(g) for g in range(12)] == [plan.batch(g) for g in range(12)]
    assert [BatchPlan(buckets, 2, 8).batch(g) for g in range(5)] != epoch0
    # processes take interleaved batches; a sampler started at step s yields what the full one yields from s
    full = list(StepBatchSampler(plan, start=0, stop=6, accumulation=2, num_processes=2, rank=1))
    late = list(StepBatchSampler(plan, start=4, stop=6, accumulation=2, num_processes=2, rank=1))
    assert late == full[8:]
    rank0 = list(StepBatchSampler(plan, start=0, stop=6, accumulation=2, num_processes=2, rank=0))
    assert rank0[0] == plan.batch(0) and full[0] == plan.batch(1)


# ---------------------------------------------------------------------------------------------- config, flags
def test_config_files_and_flags_share_names_and_flags_win(tmp_path):
    (tmp_path / "c.toml").write_text('rank = 8\nlearning-rate = 3e-4\ntrain_text_encoder = true\nmode = "subject"\ntoken = "sks"\n')
    (tmp_path / "c.yaml").write_text("rank: 8\nlearning_rate: 3e-4\ntrain_text_encoder: true\nmode: subject\ntoken: sks\n")
    for name in ("c.toml", "c.yaml"):
        config = load_config(tmp_path / name)
        assert (config.rank, config.learning_rate, config.train_text_encoder, config.mode) == (8, 3e-4, True, "subject")
        parser = build_parser()
        args = parser.parse_args(["--config", str(tmp_path / name), "--rank", "16", "--no-train_text_encoder"])
        config = config_from_args(args)
        assert (config.rank, config.learning_rate, config.train_text_encoder) == (16, 3e-4, False)
    (tmp_path / "bad.toml").write_text("rnak = 4\n")
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("rank: four\n")
    with pytest.raises(ConfigError, match="rank must be int"):
        load_config(tmp_path / "bad.yaml")


def test_malformed_or_non_utf8_config_files_are_one_line_errors_naming_file_and_line(tmp_path):
    cases = {
        "syntax.toml": (b'rank = 4\nlearning_rate = = 1\n', r"syntax.toml: not valid TOML: .*line 2"),
        "broken.yaml": (b"rank: 4\nmode: [style\n", r"broken.yaml:\d+: not valid YAML"),
        "broken.json": (b'{"rank": 4,\n}', r"broken.json:2: not valid JSON"),
        "latin1.toml": ('rank = 4\ntoken = "caf\u00e9"\n'.encode("latin-1"), r"latin1.toml:2: not UTF-8 text \(byte 0xe9\)"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=pattern) as error:
            load_config(tmp_path / name)
        assert "\n" not in str(error.value), name
    (tmp_path / "utf16.toml").write_text('rank = 8\ntoken = "caf\u00e9"\n', encoding="utf-16")  # with its BOM
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfrank: 8\n")
    assert load_config(tmp_path / "utf16.toml").token == "caf\u00e9" and load_config(tmp_path / "bom.yaml").rank == 8


def test_output_config_writes_a_file_that_reads_back(tmp_path, capsys):
    """kohya's --output_config with --config_file: the settings given (a kohya command line's, as read) written as a
    new TOML that --config and --config_file (".toml" added) read back into the same settings; an existing file is
    never overwritten."""
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--network_module", "networks.lora",
             "--network_dim", "8", "--token", 'say "hi" \u00e9\\', "--learning_rate", "1e-05", "--shuffle_caption",
             "--resolution", "768,512", "--lr_scheduler_args", "T_max=5", "eta_min=0.0"]
    expected = config_from_args(build_parser().parse_args(flags))
    assert main(flags + ["--output_config", "--config_file", str(tmp_path / "run")]) == 0
    assert load_config(tmp_path / "run.toml") == expected
    assert config_from_args(build_parser().parse_args(["--config_file", str(tmp_path / "run")])) == expected
    before = (tmp_path / "run.toml").read_text()
    assert main(flags + ["--output_config", "--config", str(tmp_path / "run.toml")]) == 2
    assert "run.toml exists" in capsys.readouterr().err and (tmp_path / "run.toml").read_text() == before


def test_help_documents_every_flag_of_the_issue(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert re.search(rf"^\s+{re.escape(flag)}\b", text, re.M), f"{flag} is not documented in --help"


def test_every_setting_is_used_by_the_training_code():
    """A flag that does nothing is a defect: every field must be read as `config.<name>` in the loop or data code."""
    root = Path(__file__).resolve().parents[1] / "lora_diffusion" / "training"
    source = "".join((root / name).read_text() for name in ("loop.py", "data.py"))  # (data.py: DatasetSize.of)
    via_property = {"lora_alpha": "config.alpha", "text_encoder_lr": "config.te_lr", "rank_pattern": "config.patterns",
                    "alpha_pattern": "config.patterns", "optimizer_args": "config.optimizer_settings",
                    "lr_scheduler_args": "config.lr_scheduler_settings"}
    for f in dataclasses.fields(TrainConfig):
        use = via_property.get(f.name, f"config.{f.name}")
        assert re.search(rf"{re.escape(use)}\b", source), f"--{f.name} is never read by the training loop"
    config_source = (root / "config.py").read_text()
    assert "self.lora_alpha or self.rank" in config_source and "self.text_encoder_lr or self.learning_rate" in config_source
    assert 'parse_pattern(self.rank_pattern, "--rank_pattern", int), parse_pattern(self.alpha_pattern' in config_source


def test_diffusers_flag_names_and_defaults():
    """diffusers' train_dreambooth_lora.py / train_text_to_image_lora.py names and defaults for the optimizer and
    schedule; --instance_data_dir is DreamBooth's name of the data folder."""
    args = build_parser().parse_args(["--instance_data_dir", "data/dog", "--adam_beta1", "0.8", "--lr_num_cycles", "3"])
    config = config_from_args(args)
    assert config.train_data_dir == "data/dog" and config.adam_beta1 == 0.8 and config.lr_num_cycles == 3
    defaults = TrainConfig()
    assert (defaults.adam_beta1, defaults.adam_beta2, defaults.adam_epsilon, defaults.lr_num_cycles, defaults.lr_power) == (
        0.9, 0.999, 1e-08, 1, 1.0)
    assert load_config(None, instance_data_dir="d").train_data_dir == "d"
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, instance_data_dir="d", train_data_dir="e")
    text = build_parser().format_help()
    for flag in DIFFUSERS_FLAGS + ["--instance_data_dir"]:
        assert flag in text, flag
    with pytest.raises(ConfigError, match="--adam_beta2 must be in"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", adam_beta2=1.0).validate()


def test_lora_diffusion_train_is_registered():
    from lora_diffusion.cli import build_parser as top_parser

    args = top_parser().parse_args(["train", "--train_data_dir", "x", "--rank", "2"])
    assert args.command == "train" and args.rank == 2 and args.func.__module__ == "lora_diffusion.training.cli"


def test_verbose_flag_before_or_after_the_subcommand():
    from lora_diffusion.cli import build_parser as top_parser

    assert top_parser().parse_args(["train", "--rank", "2", "-v"]).verbose is True
    assert top_parser().parse_args(["-v", "train", "--rank", "2"]).verbose is True
    assert top_parser().parse_args(["train", "--rank", "2"]).verbose is False
    assert build_parser().parse_args(["-v"]).verbose is True and not hasattr(build_parser().parse_args([]), "verbose")


def test_cli_reports_bad_data_with_exit_status_2(tmp_path, capsys):
    code = main(["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path / "nothing")])
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_invalid_settings_are_named():
    base = dict(pretrained_model_name_or_path="m", train_data_dir="d")
    for bad, pattern in [({"rank": 0}, "--rank"), ({"mode": "both"}, "--mode"), ({"lora_dropout": 1.0}, "--lora_dropout"),
                         ({"pivotal_tuning": True}, "--pivotal_tuning needs --token"), ({"caption_extension": "txt"}, "dot"),
                         ({"mode": "subject"}, "--token or --instance_prompt"), ({"mixed_precision": "fp8"}, "--mixed_precision"),
                         ({"resolution": 60}, "--resolution must be a multiple of 8 (the VAE's downscaling factor), got 60; try 56 or 64"),
                         ({"resolution": 7}, "got 7; try 8"),
                         ({"adam_weight_decay": -1.0}, "--adam_weight_decay must not be negative"),
                         ({"learning_rate": float("nan")}, "--learning_rate must be a finite number, got nan"),
                         ({"max_grad_norm": float("inf")}, "--max_grad_norm must be a finite number")]:
        with pytest.raises(ConfigError, match=re.escape(pattern)):
            TrainConfig(**base, **bad).validate()


def test_kohyas_lr_schedules_follow_their_formulas(tmp_path):
    """kohya's schedules beyond diffusers' (its get_scheduler_fix): cosine_with_min_lr (half a cosine per cycle down
    to --lr_scheduler_min_lr_ratio), warmup_stable_decay (--lr_decay_steps, a share below 1), inverse_sqrt (its
    timescale the warm-up's), piecewise_constant's step_rules and a torch class by --lr_scheduler_type, each given
    --lr_scheduler_args; bad ones refused by name."""
    from lora_diffusion.training.loop import make_lr_scheduler

    def rates(steps: int = 20, **settings) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = make_lr_scheduler(TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **settings), optimizer, steps)
        out = []
        for _ in range(steps):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    def close(got: list[float], expect: list[float]) -> bool:
        return all(abs(a - b) < 1e-9 for a, b in zip(got, expect, strict=True))

    cosine = [t / 2 if t < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 18)) for t in range(20)]
    assert close(rates(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=2, lr_scheduler_min_lr_ratio=0.1), cosine)
    wsd = [0.1 + 0.9 * t / 2 if t < 2 else 1.0 if t < 15 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 15) / 5)) for t in range(20)]
    assert close(rates(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=0.25, lr_scheduler_min_lr_ratio=0.1), wsd)
    assert close(rates(lr_scheduler="inverse_sqrt", lr_warmup_steps=4), [t / 4 if t < 4 else 1 / math.sqrt(t / 4) for t in range(20)])
    steps = rates(lr_scheduler="piecewise_constant", lr_scheduler_args="step_rules='1:5,0.1:10,0.01'")
    assert close(steps, [1.0] * 5 + [0.1] * 5 + [0.01] * 10)
    assert close(rates(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args="T_max=20"),
                 [0.5 * (1 + math.cos(math.pi * t / 20)) for t in range(20)])
    for settings, match in (({"lr_scheduler_type": "mymodule.Schedule"}, "give a class of torch.optim.lr_scheduler by name"),
                            ({"lr_scheduler_type": "CosineAnnealingLR", "lr_warmup_steps": 2}, "takes no --lr_warmup_steps"),
                            ({"lr_scheduler_args": "T_max"}, "--lr_scheduler_args 'T_max': give KEY=VALUE"),
                            ({"lr_scheduler": "cosine", "lr_scheduler_args": "bogus=1"}, "--lr_scheduler cosine: .*bogus")):
        with pytest.raises(ConfigError, match=match):
            config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **settings)
            config.validate()
            rates(**settings)
    parsed = config_from_args(build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                                        "--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "0.2",
                                                        "--lr_scheduler_args", "warmup_type='linear'", "decay_type='linear'"]))
    assert (parsed.lr_decay_steps, parsed.lr_scheduler_settings()) == (0.2, {"warmup_type": "linear", "decay_type": "linear"})


def test_a_kohya_command_line_reads_as_kohya_reads_it(tmp_path):
    """kohya's sd-scripts flags: aliases (network_dim, network_alpha, min_snr_gamma, max_train_epochs, optimizer_type
    AdamW8bit, ...), unet_lr beside learning_rate, resolution 512,512, network_module (its layers and the text
    encoder's LoRA, as kohya trains them), network_args conv_dim / conv_alpha (LoCon), output_name (the kohya copy),
    the flags that change nothing; kohya's grouped TOML reads the same; what it cannot do is named."""
    kohya = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o", "--output_name", "my_style",
             "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8", "--resolution", "512,512",
             "--learning_rate", "1e-4", "--unet_lr", "2e-4", "--optimizer_type", "AdamW8bit", "--max_train_epochs", "3",
             "--min_snr_gamma", "5", "--network_args", "conv_dim=4", "conv_alpha=1", "rank_dropout=0.1", "module_dropout=0.2",
             "--xformers", "--save_model_as",
             "safetensors", "--lr_scheduler_num_cycles", "2", "--max_data_loader_n_workers", "2", "--sdpa",
             "--logging_dir", "logs", "--network_dropout", "0.1"]
    config = config_from_args(build_parser().parse_args(kohya))
    config.validate()
    got = {k: getattr(config, k) for k in ("rank", "lora_alpha", "resolution", "learning_rate", "text_encoder_lr", "optimizer",
                                           "num_train_epochs", "snr_gamma", "conv_rank", "conv_alpha", "target_modules",
                                           "text_encoder_target_modules", "train_text_encoder", "output_name", "save_kohya",
                                           "lr_num_cycles", "dataloader_num_workers", "lora_dropout", "network_dropout",
                                           "rank_dropout", "module_dropout")}
    assert got == {"rank": 16, "lora_alpha": 8.0, "resolution": 512, "learning_rate": 2e-4, "text_encoder_lr": 1e-4,
                   "optimizer": "adamw8bit", "num_train_epochs": 3, "snr_gamma": 5.0, "conv_rank": 4, "conv_alpha": 1.0,
                   "target_modules": "full", "text_encoder_target_modules": "attn-mlp", "train_text_encoder": True,
                   "output_name": "my_style", "save_kohya": True, "lr_num_cycles": 2, "dataloader_num_workers": 2,
                   "lora_dropout": 0.0, "network_dropout": 0.1, "rank_dropout": 0.1, "module_dropout": 0.2}  # (kohya's
    # network_dropout is on A x, not on the input: LoraDropout's neuron)
    more = config_from_args(build_parser().parse_args(kohya + ["--flip_aug", "--color_aug", "--cache_latents_to_disk",
                                                               "--training_comment", "hi", "--metadata_author", "me"]))
    assert (more.random_flip, more.color_aug, more.cache_latents, more.center_crop, more.training_comment,
            more.metadata_author) == (True, True, True, True, "hi", "me")  # (kohya crops the centre)
    assert not config_from_args(build_parser().parse_args(kohya + ["--random_crop"])).center_crop
    te_only = config_from_args(build_parser().parse_args(kohya + ["--network_train_text_encoder_only"]))
    assert (te_only.train_unet, te_only.train_text_encoder) == (False, True)
    ratio = config_from_args(build_parser().parse_args(kohya + ["--lr_warmup_steps", "0.1"]))
    steps = config_from_args(build_parser().parse_args(kohya + ["--lr_warmup_steps", "10"]))
    assert (ratio.lr_warmup_steps, ratio.lr_warmup_ratio, steps.lr_warmup_steps, steps.lr_warmup_ratio) == (0, 0.1, 10, 0.0)
    with pytest.raises(ConfigError, match="--color_aug changes every sample's colours: it cannot go with --cache_latents"):
        more.validate()
    unet_only = config_from_args(build_parser().parse_args(kohya[:10] + ["--network_train_unet_only"]))
    assert (unet_only.train_text_encoder, unet_only.target_modules) == (False, "attn-mlp")
    plain = config_from_args(build_parser().parse_args(kohya[:6]))  # (no kohya module: our defaults)
    assert (plain.train_text_encoder, plain.target_modules, plain.save_kohya) == (False, "attn", False)

    toml = tmp_path / "kohya.toml"  # kohya's own config file groups its settings in tables
    toml.write_text('[model_arguments]\npretrained_model_name_or_path = "m"\nv2 = false\n[additional_network_arguments]\n'
                    'network_module = "networks.lora"\nnetwork_dim = 8\nnetwork_train_unet_only = true\n'
                    '[training_arguments]\nresolution = "768,768"\noutput_name = "x.safetensors"\n'
                    '[optimizer_arguments]\noptimizer_type = "Prodigy"\n[rank_pattern_holder]\n')
    loaded = load_config(toml)
    assert (loaded.rank, loaded.resolution, loaded.optimizer, loaded.output_name, loaded.train_text_encoder) == \
        (8, 768, "prodigy", "x", False)

    wide = config_from_args(build_parser().parse_args(kohya[:6] + ["--resolution", "768,512"]))
    assert (wide.resolution, wide.resolution_height, wide.size) == (768, 512, (768, 512))
    assert config_from_args(build_parser().parse_args(kohya[:6] + ["--resolution", "512,512"])).resolution_height == 0
    assert config_from_args(build_parser().parse_args(kohya[:6] + ["--in_json", "meta.json"])).in_json == "meta.json"
    assert config_from_args(build_parser().parse_args(kohya)).resize_interpolation == "auto"  # (kohya's area / lanczos)
    assert config_from_args(build_parser().parse_args(kohya + ["--full_bf16", "--mixed_precision", "bf16"])).mixed_precision == "bf16"
    fp8 = config_from_args(build_parser().parse_args(kohya + ["--fp8_base", "--fp8_base_unet", "--mixed_precision", "fp16"]))
    assert (fp8.fp8_base, fp8.fp8_base_unet) == (True, True)
    files = config_from_args(build_parser().parse_args(kohya[:6] + ["--dataset_config", "d.toml", "--caption_separator", ";",
                                                                    "--caption_dropout_every_n_epochs", "2"]))
    assert (files.dataset_config, files.caption_separator, files.caption_dropout_every_n_epochs) == ("d.toml", ";", 2)
    for extra, match in ((["--resolution", "512,768,3"], "resolution '512,768,3': give one side"),
                         (["--resolution", "512,780"], "--resolution_height must be a multiple of 8"),
                         (["--network_args", "rank_dropout=2"], "--rank_dropout must be in"),
                         (["--full_fp16"], "full_fp16 needs --mixed_precision fp16, as kohya's"),
                         (["--full_bf16", "--mixed_precision", "fp16"], "full_bf16 needs --mixed_precision bf16"),
                         (["--face_crop_aug_range", "2.0,4.0"], "face_crop_aug_range: face crop augmentation is not built"),
                         (["--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "1"],
                          "base_weights_multiplier gives 1 weights for 2 base_weights files"),
                         (["--no_token_padding"], "no_token_padding: captions are always padded"),
                         (["--fp8_base"], "--fp8_base computes in the mixed precision: give --mixed_precision bf16"),
                         (["--fp8_base_unet"], "--fp8_base_unet computes in the mixed precision"),
                         (["--random_crop", "--center_crop"], "random_crop and center_crop contradict each other"),
                         (["--network_args", "dropout=0.1"], "network_args 'dropout=0.1': this trainer takes"),
                         (["--network_args", "module_dropout=0.1", "--use_dora"], "--use_dora takes --lora_dropout"),
                         (["--network_module", "networks.oft"], "network_module 'networks.oft'"),
                         (["--save_model_as", "ckpt"], "save_model_as 'ckpt': LoRAs are written as safetensors"),
                         (["--network_train_text_encoder_only", "--network_train_unet_only"], "contradict each other"),
                         (["--output_name", "a/b"], "--output_name 'a/b': a file name without folders")):
        with pytest.raises(ConfigError, match=match):
            config_from_args(build_parser().parse_args(kohya[:6] + extra)).validate()
    with pytest.raises(ConfigError, match="--output_name names the kohya copy: give --save_kohya too"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", output_name="x").validate()


def test_kohya_sample_prompt_files_read_as_kohya_reads_them(tmp_path):
    """kohya's three prompt-file forms: lines with options, a TOML [prompt] table whose subsets add to it, a JSON
    list of lines or tables; a bad one is named with where it is."""
    from lora_diffusion.training.samples import read_sample_prompts

    (tmp_path / "p.txt").write_text("a cat --N dark --w 64 --h 96 --d 7 --l 5.5 --s 2000 --ss k_euler\n# off\n")
    assert read_sample_prompts(tmp_path / "p.txt") == [{"prompt": "a cat", "negative_prompt": "dark", "width": 64, "height": 96,
                                                         "seed": 7, "scale": 5.5, "sample_steps": 1000, "sample_sampler": "k_euler"}]
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 64\nsample_steps = 20\n[[prompt.subset]]\nprompt = "a"\n'
                                     '[[prompt.subset]]\nprompt = "b"\nwidth = 32\n')
    assert read_sample_prompts(tmp_path / "p.toml") == [{"width": 64, "sample_steps": 20, "prompt": "a"},
                                                         {"width": 32, "sample_steps": 20, "prompt": "b"}]
    (tmp_path / "p.json").write_text('["a dog --d 3", {"prompt": "b", "scale": 4}]')
    assert read_sample_prompts(tmp_path / "p.json") == [{"prompt": "a dog", "seed": 3}, {"prompt": "b", "scale": 4}]
    for name, text, match in (("q.json", '[{"prompt": "b", "cfg": 4}]', r"q.json: prompt 1: unknown key\(s\) \['cfg'\]"),
                              ("w.json", '[{"prompt": "b", "width": "wide"}]', r"w.json: prompt 1: width 'wide': not a whole number"),
                              ("q.toml", "prompt = 1", r"q.toml: not a kohya prompt file"),
                              ("q.txt", "# nothing\n", r"q.txt: no prompt in the file"),
                              ("q.yaml", "a", r"q.yaml: use a .txt, .toml or .json file")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=match):
            read_sample_prompts(tmp_path / name)

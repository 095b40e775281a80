"""Training invariants on a tiny offline pipeline: it learns, only LoRA changes, resume is exact, multi-process
runs stay in sync, v-prediction targets, bad input fails early and clearly, files are written atomically."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_diffusion.formats import our_metadata, read_lora_file, read_safetensors
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.training import ConfigError, DataError, TrainConfig, train
from lora_diffusion.training import loop as loop_module
from lora_diffusion.training import outputs
from lora_diffusion.training.loop import condition, diffusion_target, load_pipeline

from conftest import compile_pipeline
from training_support import PROMPT, RED, base_state, denoising_loss, flat_images, same_lora_from_a_single_file


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_pipeline(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def compile_base(tmp_path_factory) -> str:
    """A model folder with the compile tests' one-block UNet (``compile_pipeline``: half the trace time)."""
    path = tmp_path_factory.mktemp("compile_base") / "small"
    compile_pipeline(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_v(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base_v") / "tiny_v"
    tiny_pipeline(0, v_prediction=True).save_pretrained(path)
    return str(path)


def config(base: str, tmp_path: Path, **overrides) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists() and "train_data_dir" not in overrides:
        flat_images(data)
    values = dict(pretrained_model_name_or_path=base, train_data_dir=str(data), output_dir=str(tmp_path / "out"),
                  resolution=32, max_train_steps=4, seed=0, token="<s>", num_validation_images=0, checkpointing_steps=0)
    return TrainConfig(**{**values, **overrides})


def generated_distance(pipe) -> float:
    """Mean squared distance of generated latents (fixed seed) to the latent of the training colour."""
    pixels = (torch.tensor(RED, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.no_grad():
        target = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        out = pipe(PROMPT, num_inference_steps=4, height=32, width=32, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    return (out - target).pow(2).mean().item()


def lora_tensors(path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


# ---------------------------------------------------------------------------------------------- it learns
@pytest.mark.parametrize("v_prediction", [False, True], ids=["epsilon", "v_prediction"])
def test_training_moves_the_model_toward_the_training_images(base, base_v, tmp_path, v_prediction):
    path = base_v if v_prediction else base
    before = load_pipeline(path)
    loss0, dist0 = denoising_loss(before), generated_distance(before)
    result = train(config(path, tmp_path, max_train_steps=15, learning_rate=1e-2, train_batch_size=2,
                          target_modules="full", max_grad_norm=0.0))
    assert result.status == "completed" and result.global_step == 15
    loss1, dist1 = denoising_loss(result.pipeline), generated_distance(result.pipeline)
    assert loss1 < 0.6 * loss0, (loss0, loss1)  # measured: 1.09 -> 0.48 (epsilon), 0.56 -> 0.27 (v)
    assert dist1 < 0.7 * dist0, (dist0, dist1)  # measured: 20.9 -> 9.2 (epsilon), 0.79 -> 0.26 (v)


def test_target_follows_the_scheduler_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    expected = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * noise - (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * latents
    torch.testing.assert_close(diffusion_target(v, latents, noise, t), expected)
    assert torch.equal(diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t), latents)


# ---------------------------------------------------------------------------------------------- only LoRA changes
def test_only_lora_parameters_change_and_the_file_loads_in_diffusers(base, tmp_path):
    """... and ``save_kohya``'s copy, named after the output folder, holds the same factors and alphas in kohya's
    format (what A1111 and ComfyUI read in full), with kohya's ``ss_*`` training keys (A1111's card, Civitai)."""
    result = train(config(base, tmp_path, train_text_encoder=True, learning_rate=1e-2, max_train_steps=3,
                          save_precision="fp32", save_kohya=True))
    assert result.kohya_path == result.output_dir / "out.safetensors" and str(result.kohya_path) in result.message
    kohya, kohya_header = read_lora_file(result.kohya_path)
    diffusers = read_lora_file(result.lora_path)[0]
    assert kohya_header["_format"] == "kohya" and kohya.keys() == diffusers.keys()
    card = json.loads((result.output_dir / "out.json").read_text())  # A1111's card: the trigger goes in with the tag
    assert card["activation text"] == "<s>" and card["sd version"] == "Unknown" and "3 steps on 4 images" in card["description"]
    assert json.loads(kohya_header["ss_tag_frequency"]) == {"data": {"an image in the style of <s>": 4}}
    assert json.loads(kohya_header["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 4}}
    assert {k: kohya_header[k] for k in ("ss_num_train_images", "ss_learning_rate", "ss_resolution", "ss_seed", "ss_steps",
                                         "ss_clip_skip", "ss_batch_size_per_device")} == {
        "ss_num_train_images": "4", "ss_learning_rate": "0.01", "ss_resolution": "(32, 32)", "ss_seed": "0", "ss_steps": "3",
        "ss_clip_skip": "1", "ss_batch_size_per_device": "1"}
    assert all(torch.equal(kohya[k].A, w.A) and torch.equal(kohya[k].B, w.B) and kohya[k].alpha == w.alpha for k, w in diffusers.items())
    fresh = load_pipeline(base)
    for name in ("unet", "vae", "text_encoder"):
        trained, original = base_state(getattr(result.pipeline, name)), getattr(fresh, name).state_dict()
        assert trained.keys() == original.keys(), name
        for key, value in original.items():
            assert torch.equal(trained[key], value), f"{name}.{key} changed"
    lora, header = read_lora_file(result.lora_path)
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)
    assert any(w.B.abs().max() > 0 for w in lora.values()), "LoRA B stayed zero: nothing was trained"
    meta = our_metadata(header)
    assert meta["trigger_words"] == ["<s>"] and meta["base_model"] == base and meta["steps"] == 3
    assert meta["training"]["rank"] == 4 and meta["training"]["train_text_encoder"] is True

    # stock diffusers reads the output folder and gives what our in-memory adapter gives
    ours = result.pipeline
    ours.unet.eval()
    stock = load_pipeline(base)
    stock.load_lora_weights(str(result.output_dir), weight_name=outputs.LORA_NAME)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    a = ours(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = stock(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_clip_skip_conditions_on_an_earlier_layer(base, tmp_path):
    """``--clip_skip N`` (kohya's / A1111's count) conditions as the text encoder with its last N-1 layers removed
    does (and so as diffusers' ``encode_prompt(clip_skip=N-1)``, which transformers >= 5.6 breaks); trained
    with it, the text encoder's layers after the one used get no gradient (their LoRA B stays zero) and the others
    learn; the setting is recorded; SDXL and more layers than the encoder has are refused before training."""
    from lora_diffusion.prompts import encode_text

    pipe = load_pipeline(base)
    captions = [PROMPT, "a blue square"]
    layers = pipe.text_encoder.config.num_hidden_layers
    with torch.no_grad():
        for n in (2, 3):
            got = encode_text(pipe.tokenizer, pipe.text_encoder, captions, "cpu", clip_skip=n)
            short = copy.deepcopy(pipe.text_encoder)
            stack = dict(short.named_modules())["encoder" if "encoder" in dict(short.named_children()) else "text_model.encoder"]
            stack.layers = stack.layers[: layers - n + 1]
            expect = encode_text(pipe.tokenizer, short, captions, "cpu")
            assert torch.equal(got, expect), n
        assert not torch.equal(encode_text(pipe.tokenizer, pipe.text_encoder, captions, "cpu", clip_skip=2),
                                encode_text(pipe.tokenizer, pipe.text_encoder, captions, "cpu"))
    result = train(config(base, tmp_path, clip_skip=2, train_text_encoder=True, learning_rate=1e-2, max_train_steps=2,
                          save_precision="fp32", num_validation_images=1, validation_inference_steps=1, save_kohya=True))
    preview = result.output_dir / "out.preview.png"  # A1111's card preview: the last sample grid
    assert preview.read_bytes() == Path(result.sample_paths[-1]).read_bytes()
    lora, header = read_lora_file(result.lora_path)
    last = [w for k, w in lora.items() if f"encoder.layers.{layers - 1}." in k]
    earlier = [w for k, w in lora.items() if k.startswith("text_encoder.") and f"encoder.layers.{layers - 1}." not in k]
    assert last and all(not w.B.any() for w in last) and any(w.B.any() for w in earlier)
    assert our_metadata(header)["training"]["clip_skip"] == 2
    with pytest.raises(ConfigError, match=rf"--clip_skip {layers + 1}: the text encoder has {layers} layers"):
        train(config(base, tmp_path / "deep", clip_skip=layers + 1))
    with pytest.raises(ConfigError, match="--clip_skip must be at least 1"):
        config(base, tmp_path / "zero", clip_skip=0).validate()
    from lora_diffusion.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(0).save_pretrained(tmp_path / "xl")
    with pytest.raises(ConfigError, match="--clip_skip 2: SDXL always conditions on both text encoders' penultimate"):
        train(config(str(tmp_path / "xl"), tmp_path / "xl_run", clip_skip=2))


def test_a_kohya_style_data_folder_trains_its_repeats_per_epoch(base, tmp_path):
    """``2_<text>/`` folders (kohya's repeats): one epoch of 2 images repeated twice and 1 image once is 5 steps at
    batch 1; the folder's text captions the images without one."""
    flat_images(tmp_path / "data" / "2_red square", n=2)
    flat_images(tmp_path / "data" / "other", n=1)
    result = train(config(base, tmp_path, max_train_steps=0, num_train_epochs=1, train_batch_size=1, token=""))
    assert result.status == "completed" and result.global_step == 5


# ---------------------------------------------------------------------------------------------- resume
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(base, tmp_path):
    hard = dict(max_train_steps=6, learning_rate=5e-3, lr_scheduler="cosine", lr_warmup_steps=2, random_flip=True,
                lora_dropout=0.1, network_dropout=0.1, rank_dropout=0.2, module_dropout=0.1, gradient_accumulation_steps=2,
                train_batch_size=2, noise_offset=0.05,
                train_text_encoder=True, save_precision="fp32", checkpointing_steps=3, snr_gamma=5.0)
    straight = train(config(base, tmp_path / "a", **hard))
    flat_images(tmp_path / "b" / "data")
    cancel_at_3 = train(config(base, tmp_path / "b", **hard), progress=lambda p: p["step"] < 3)
    assert cancel_at_3.status == "cancelled" and cancel_at_3.global_step == 3
    assert not (tmp_path / "b" / "out" / outputs.LORA_NAME).exists()
    resumed = train(config(base, tmp_path / "b", resume_from_checkpoint="latest", **hard))
    assert resumed.status == "completed" and resumed.global_step == 6
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical: every random draw is keyed by (seed, step)
    log = outputs.read_log(tmp_path / "b" / "out" / "log.csv")
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[3]["elapsed_s"] >= log[2]["elapsed_s"]  # the run's time goes on across the resume


def test_prodigy_trains_and_resumes_exactly(base, tmp_path):
    """``--optimizer prodigy`` (prodigyopt, kohya's users' favourite): it learns, a resumed run is bit for bit the
    uninterrupted one (its d and moments are in the checkpoint), and kohya's ss_optimizer names it with its
    --optimizer_args (kohya's), which take effect."""
    pytest.importorskip("prodigyopt")
    hard = dict(max_train_steps=4, learning_rate=1.0, optimizer="prodigy", checkpointing_steps=2, save_precision="fp32",
                save_kohya=True, optimizer_args="d_coef=2 decouple=True betas=0.9,0.99")
    straight = train(config(base, tmp_path / "a", **hard))
    flat_images(tmp_path / "b" / "data")
    assert train(config(base, tmp_path / "b", **hard), progress=lambda p: p["step"] < 2).status == "cancelled"
    resumed = train(config(base, tmp_path / "b", resume_from_checkpoint="latest", **hard))
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k) and all(torch.isfinite(t).all() for t in a.values())
    assert read_lora_file(straight.kohya_path)[1]["ss_optimizer"] == "prodigyopt.prodigy.Prodigy(d_coef=2,decouple=True,betas=(0.9, 0.99))"
    plain = train(config(base, tmp_path / "p", **{**hard, "optimizer_args": ""}))
    assert not torch.equal(lora_tensors(plain.lora_path)[next(iter(a))], a[next(iter(a))])  # (d_coef=2 took effect)
    with pytest.raises(ConfigError, match=r"--optimizer_args d_coef: AdamW does not take it; it takes .*weight_decay"):
        train(config(base, tmp_path / "q", optimizer_args="d_coef=2"))
    with pytest.raises(ConfigError, match=r"--optimizer_args 'betas=\(0.9': give KEY=VALUE, the value a Python literal"):
        config(base, tmp_path / "q", optimizer_args="betas=(0.9 ,0.99)").validate()
    with pytest.raises(ConfigError, match="--use_8bit_adam is --optimizer adamw8bit; it does not go with --optimizer prodigy"):
        config(base, tmp_path / "c", use_8bit_adam=True, optimizer="prodigy").validate()


def test_resume_refuses_a_changed_lora_shape_and_applies_a_changed_learning_rate(base, tmp_path, monkeypatch):
    first = train(config(base, tmp_path, max_train_steps=2, learning_rate=1e-4, lr_scheduler="cosine"))
    assert first.checkpoint.name == "checkpoint-2"
    monkeypatch.setattr(loop_module, "load_pipeline", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(ConfigError, match=r"--lora_alpha 64.0 differs from 4.0 in .*checkpoint-2"):
        train(config(base, tmp_path, max_train_steps=4, lora_alpha=64, resume_from_checkpoint="latest"))
    with pytest.raises(ConfigError, match=r"--train_text_encoder True differs from False"):
        train(config(base, tmp_path, max_train_steps=4, train_text_encoder=True, resume_from_checkpoint="latest"))
    for flag, value in (("conv_rank", 2), ("rank_pattern", "attn2.to_k=2"), ("alpha_pattern", "to_q=1")):  # per-layer shapes
        with pytest.raises(ConfigError, match=rf"--{flag} {value!r} differs from"):
            train(config(base, tmp_path, max_train_steps=4, resume_from_checkpoint="latest", **{flag: value}))
    with pytest.raises(ConfigError, match="checkpoint-2 is at step 2, not before --max_train_steps 2: nothing to train"):
        train(config(base, tmp_path, max_train_steps=2, lr_scheduler="cosine", resume_from_checkpoint="latest"))
    monkeypatch.undo()
    resumed = train(config(base, tmp_path, max_train_steps=4, learning_rate=1e-2, lr_scheduler="cosine",
                           resume_from_checkpoint="latest"))
    lrs = [r["lr"] for r in outputs.read_log(tmp_path / "out" / "log.csv")]
    assert lrs[1] < 1e-4 and lrs[2] > 1e-3  # the schedule goes on at the new base rate (cosine at 3/4: x0.146)
    assert lrs[2] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-6)
    training = our_metadata(read_lora_file(resumed.lora_path)[1])["training"]
    assert training["learning_rate"] == 1e-2
    assert training["resumed"] == [{"step": 2, "changed": {"learning_rate": [1e-4, 1e-2], "max_train_steps": [2, 4]}}]


def test_resume_latest_without_a_checkpoint_starts_afresh_over_a_stopped_run(base, tmp_path, caplog):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "log.csv").write_text("step,epoch,loss,lr,elapsed_s\n1,0,0.5,0.0001,0.1\n2,0,0.4,0.0001,0.2\n")
    (out / "samples" / "step-000002.png").write_bytes(b"old")
    with caplog.at_level(logging.WARNING):
        result = train(config(base, tmp_path, max_train_steps=1, resume_from_checkpoint="latest"))
    assert result.status == "completed" and caplog.text.count("no checkpoint") == 1 and "replacing" in caplog.text
    assert [r["step"] for r in outputs.read_log(out / "log.csv")] == [1] and not (out / "samples").exists()
    shutil.rmtree(out / "checkpoints")  # a finished LoRA without checkpoints is not replaced unasked
    with pytest.raises(ConfigError, match="holds a finished LoRA but no checkpoint"):
        train(config(base, tmp_path, max_train_steps=1, resume_from_checkpoint="latest"))


def test_checkpoints_total_limit_and_cancel_event(base, tmp_path):
    import threading

    stop = threading.Event()
    result = train(config(base, tmp_path, max_train_steps=20, checkpointing_steps=1, checkpoints_total_limit=2),
                   progress=lambda p: stop.set() if p["step"] == 5 else None, cancel=stop)
    assert result.status == "cancelled" and result.global_step == 5
    assert [p.name for p in outputs.list_checkpoints(tmp_path / "out")] == ["checkpoint-4", "checkpoint-5"]
    assert result.checkpoint.name == "checkpoint-5"
    from lora_diffusion import load_lora

    assert load_lora(tiny_pipeline(0), result.checkpoint) == "checkpoint-5"  # the checkpoint's LoRA is usable


def test_ctrl_c_saves_a_checkpoint_at_the_current_step_and_exits_130(base, tmp_path, monkeypatch, capsys):
    import signal

    from lora_diffusion.training.cli import main

    real, calls = loop_module.diffusion_loss, {"n": 0}

    def ctrl_c_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler runs in the main thread
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "diffusion_loss", ctrl_c_in_step_3)
    # Python's own handler, as a `lora-diffusion train` started in a terminal has it (the trainer takes over only
    # that one). A suite started in the background by a shell without job control (`.ci/run &`) inherits SIGINT
    # ignored, which Python keeps and the trainer respects: the press would go unnoticed (measured: exit 0).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    data = flat_images(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["--pretrained_model_name_or_path", base, "--train_data_dir", str(data), "--output_dir", str(out),
                 "--resolution", "32", "--max_train_steps", "8", "--checkpointing_steps", "2", "--num_validation_images", "0"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert [p.name for p in outputs.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert "cancelled at step 3" in err.splitlines()[-1] and "checkpoint-3" in err.splitlines()[-1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = train(config(base, tmp_path, max_train_steps=8, checkpointing_steps=2, resume_from_checkpoint="latest"))
    assert resumed.status == "completed" and [r["step"] for r in outputs.read_log(out / "log.csv")] == list(range(1, 9))


# ---------------------------------------------------------------------------------------------- multi-process
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate import PartialState
    from lora_diffusion.inject import lora_parameters
    from lora_diffusion.training import TrainConfig, train

    base, data, out, report = sys.argv[1:5]
    writes = []

    def audit(event, args):
        if event in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink", "shutil.rmtree"):
            path = str(args[0]) if args and isinstance(args[0], (str, bytes, os.PathLike)) else ""
            mode = args[1] if event == "open" and len(args) > 1 else None
            flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
            writing = event != "open" or (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and os.path.abspath(path).startswith(os.path.abspath(out)):
                writes.append(f"{event} {path}")

    sys.addaudithook(audit)
    config = TrainConfig(pretrained_model_name_or_path=base, train_data_dir=data, output_dir=out, resolution=32,
                         max_train_steps=3, seed=0, checkpointing_steps=2, learning_rate=1e-2, train_text_encoder=True,
                         num_validation_images=1, validation_steps=2, validation_inference_steps=1)
    result = train(config)
    rank = PartialState().process_index
    flat = torch.cat([p.detach().reshape(-1) for p in lora_parameters(result.pipeline.unet) + lora_parameters(result.pipeline.text_encoder)])
    torch.save(flat, os.path.join(report, f"weights{rank}.pt"))
    with open(os.path.join(report, f"writes{rank}.json"), "w") as f:
        json.dump({"writes": writes, "status": result.status}, f)
    """
)


def test_accelerate_launch_two_processes(base, tmp_path):
    data = flat_images(tmp_path / "data", n=5)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    report = tmp_path / "report"
    report.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    # on a CPU-only machine `--multi_gpu` makes accelerate spawn the processes (torchrun); train() then uses gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), base, str(data), str(out), str(report)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = torch.load(report / "weights0.pt"), torch.load(report / "weights1.pt")
    assert w0.abs().sum() > 0 and torch.equal(w0, w1), "ranks ended with different LoRA weights"
    r0, r1 = (json.loads((report / f"writes{r}.json").read_text()) for r in (0, 1))
    assert r0["status"] == r1["status"] == "completed"
    assert r1["writes"] == [], f"rank 1 wrote files: {r1['writes'][:5]}"
    assert r0["writes"], "the audit hook saw no writes at all on rank 0"
    meta = our_metadata(read_lora_file(out / outputs.LORA_NAME)[1])
    assert meta["num_processes"] == 2
    assert (out / "samples" / "step-000002.png").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()


def test_a_second_sigint_aborts_only_when_it_is_a_second_press(monkeypatch):
    """The launcher's forwarded copy of a Ctrl-C (within ``SAME_PRESS_S``) is the same press; a later one aborts."""
    clock = {"now": 100.0}
    monkeypatch.setattr(loop_module.time, "monotonic", lambda: clock["now"])
    ctrl_c = loop_module._CtrlC()
    try:
        ctrl_c._handle(2, None)
        clock["now"] += 0.05
        ctrl_c._handle(2, None)  # torchrun forwarding the terminal's SIGINT: no abort
        assert ctrl_c.pressed
        clock["now"] += loop_module._CtrlC.SAME_PRESS_S
        with pytest.raises(KeyboardInterrupt):
            ctrl_c._handle(2, None)
    finally:
        ctrl_c.restore()


CTRL_C_WORKER = textwrap.dedent(
    """
    import json, os, pathlib, sys
    from accelerate import PartialState
    from lora_diffusion.training import TrainConfig, train

    base, data, out, report = sys.argv[1:5]

    def progress(p):  # (main process only) tell the test that steps are running
        if p["step"] == 3:
            pathlib.Path(report, "running").touch()

    config = TrainConfig(pretrained_model_name_or_path=base, train_data_dir=data, output_dir=out, resolution=32,
                         max_train_steps=100_000, seed=0, num_validation_images=0, checkpointing_steps=0,
                         dataloader_num_workers=2)
    result = train(config, progress=progress)
    with open(os.path.join(report, f"result{PartialState().process_index}.json"), "w") as f:
        json.dump({"status": result.status, "step": result.global_step}, f)
    """
)


def test_ctrl_c_under_accelerate_launch_with_loader_workers_saves_a_checkpoint(base, tmp_path):
    """A terminal's Ctrl-C reaches the launcher, both ranks and their data-loader workers, and torchrun forwards it
    to the ranks once more: the workers stay up (they leave SIGINT to the rank), the forwarded copy counts as the same
    press, and both ranks stop after the same step with a checkpoint of it."""
    import signal

    data = flat_images(tmp_path / "data", n=4)
    worker = tmp_path / "worker.py"
    worker.write_text(CTRL_C_WORKER)
    report, out = tmp_path / "report", tmp_path / "out"
    report.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), base, str(data), str(out), str(report)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (report / "running").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "exited unexpectedly" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    r0, r1 = (json.loads((report / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["status"] == "cancelled" and r0["step"] >= 3, (r0, r1)
    assert [p.name for p in outputs.list_checkpoints(out)] == [f"checkpoint-{r0['step']}"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(loop_module, "load_pipeline", refuse)


@pytest.mark.parametrize("case", ["missing", "empty", "only_text", "all_broken"])
def test_bad_data_folder_fails_before_any_model_is_loaded(base, tmp_path, no_model, case):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "only_text":
        (data / "a.txt").write_text("a caption")
    if case == "all_broken":
        (data / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=str(data)):
        train(config(base, tmp_path, train_data_dir=str(data)))


def test_settings_that_cannot_work_fail_before_any_model_is_loaded(base, tmp_path, no_model):
    with pytest.raises(ConfigError, match="no such file"):
        train(config("./no/such/model", tmp_path))
    with pytest.raises(ConfigError, match="class_prompt"):
        train(config(base, tmp_path, with_prior_preservation=True, class_data_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="lr_scheduler"):
        train(config(base, tmp_path, lr_scheduler="sometimes"))
    flat_images(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log.csv").write_text("step\n")
    with pytest.raises(ConfigError, match="previous run"):
        train(config(base, tmp_path))


@pytest.mark.parametrize("flags, message", [
    ({"target_modules": "to_qq"}, "--target_modules 'to_qq' matches no Linear or Conv2d layer of the UNet2DConditionModel"),
    ({"train_text_encoder": True, "text_encoder_target_modules": "nothing.*here"},
     "--text_encoder_target_modules 'nothing.*here' matches no Linear or Conv2d layer of the CLIPTextModel"),
])
def test_targets_that_match_no_layer_are_a_settings_error_naming_the_flag(base, tmp_path, flags, message):
    """(was a bare ValueError from inject_lora: a traceback from the command line instead of its one-line error)"""
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(config(base, tmp_path, **flags))
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_an_sdxl_model_that_loads_as_sd_is_refused_before_training(tmp_path):
    """An SDXL folder whose model_index.json names StableDiffusionPipeline loads as one without a word (the second
    text encoder left out); training would fail at the first step's shapes. (SDXL folders train: test_training_sdxl.)"""
    from lora_diffusion.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(0).save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match=r"xl: an SDXL UNet without SDXL's second text encoder"):
        train(config(str(tmp_path / "xl"), tmp_path))


def test_a_model_that_does_not_load_is_one_line_and_exit_2(base, tmp_path, monkeypatch, capsys):
    from lora_diffusion.training.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    with pytest.raises(ConfigError, match=rf"^{broken}: cannot load the unet \("):
        train(config(str(broken), tmp_path))
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="x.ckpt: cannot load it as a single-file"):
        train(config(str(tmp_path / "x.ckpt"), tmp_path))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop_module, "load_pipeline", lambda *a: pytest.fail("models/sd15 was taken for a hub id"))
    with pytest.raises(ConfigError, match="models/sd15: no such file or folder"):
        train(config("models/sd15", tmp_path))
    monkeypatch.undo()
    code = main(["--pretrained_model_name_or_path", str(broken), "--train_data_dir", str(tmp_path / "data"),
                 "--output_dir", str(tmp_path / "out"), "--resolution", "32"])
    err = capsys.readouterr().err  # diffusers' loading bar, then our line
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {broken}: cannot load the unet (")


def test_bad_images_are_skipped_with_a_warning_or_refused_when_strict(base, tmp_path, caplog):
    data = flat_images(tmp_path / "data", n=2)
    good = (data / "0.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "garbage.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with caplog.at_level(logging.WARNING):
        result = train(config(base, tmp_path, max_train_steps=1))
    assert result.status == "completed"
    assert "truncated.png" in caplog.text and "garbage.jpg" in caplog.text
    with pytest.raises(DataError, match="truncated.png|garbage.jpg"):
        train(config(base, tmp_path, strict=True, overwrite=True))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    real = loop_module.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop_module, "diffusion_loss", poisoned)
    result = train(config(base, tmp_path, max_train_steps=6, checkpointing_steps=2))
    assert result.status == "diverged" and result.global_step == 3
    assert "nan" in result.message and "checkpoint-2" in result.message
    assert [p.name for p in outputs.list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / outputs.LORA_NAME).exists()
    assert all(torch.isfinite(t).all() for t in lora_tensors(result.checkpoint / outputs.LORA_NAME).values())


def test_output_folder_is_not_overwritten_unless_asked(base, tmp_path):
    first = train(config(base, tmp_path, max_train_steps=1, save_kohya=True))
    before = (first.lora_path).read_bytes()
    first.lora_path.rename(tmp_path / "moved.safetensors")  # (the kohya copy alone marks the folder as a run's)
    with pytest.raises(ConfigError, match=r"previous run \(checkpoints, log.csv, loss.png, out.safetensors, out.json\)"):
        train(config(base, tmp_path, max_train_steps=1, learning_rate=1e-2))
    (tmp_path / "moved.safetensors").rename(first.lora_path)
    assert first.lora_path.read_bytes() == before
    again = train(config(base, tmp_path, max_train_steps=2, overwrite=True))
    assert again.global_step == 2 and [p.name for p in outputs.list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert not first.kohya_path.exists(), "the previous run's kohya copy outlived it"
    assert not (tmp_path / "out" / "out.json").exists(), "the previous run's A1111 card outlived it"


def fake_previous_run(out: Path) -> dict[str, bytes]:
    """An output folder holding a previous run's files (no training needed); returns {relative path: bytes}."""
    for name, data in {outputs.LORA_NAME: b"old lora", "log.csv": b"step\n1\n", "checkpoints/checkpoint-1/"
                       + outputs.STATE_NAME: b"old state", "samples/step-000001.png": b"old png"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_overwrite_keeps_the_previous_run_until_the_new_one_writes(base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = fake_previous_run(out)
    files = lambda: {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refuse(*args, **kwargs):  # a model that does not load (a typo in its name, a broken folder)
        raise ConfigError("cannot load the model")

    monkeypatch.setattr(loop_module, "load_pipeline", refuse)
    with pytest.raises(ConfigError, match="cannot load"):
        train(config(base, tmp_path, overwrite=True))
    assert files() == old
    monkeypatch.undo()

    def crash(*args, **kwargs):  # a failure in the first step, before anything is written
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loop_module, "diffusion_loss", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config(base, tmp_path, overwrite=True))
    assert files() == old and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()

    def nan(*args, **kwargs):  # a run that diverges after writing its log: no checkpoint, no LoRA
        return torch.full((), float("nan"), requires_grad=True)

    monkeypatch.setattr(loop_module, "diffusion_loss", nan)
    assert train(config(base, tmp_path, overwrite=True, max_train_steps=12)).status == "diverged"
    assert files() == old and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    result = train(config(base, tmp_path, overwrite=True, max_train_steps=1))
    assert result.status == "completed" and outputs.read_log(out / "log.csv")[0]["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.LORA_NAME, "checkpoints", "log.csv", "loss.png"])


def test_resuming_an_earlier_checkpoint_keeps_later_ones_aside(base, tmp_path):
    """Resuming at step 2 of a 6-step run abandons checkpoints 4 and 6: they are kept in checkpoints/superseded-1,
    so the new run's checkpoints are the ones `latest` finds and `--checkpoints_total_limit` prunes."""
    out = tmp_path / "out"
    train(config(base, tmp_path, max_train_steps=6, checkpointing_steps=2))
    cancelled = train(config(base, tmp_path, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1,
                             resume_from_checkpoint="checkpoint-2"), progress=lambda p: p["step"] < 3)
    assert cancelled.status == "cancelled" and cancelled.checkpoint.name == "checkpoint-3"
    assert [p.name for p in outputs.list_checkpoints(out)] == ["checkpoint-3"]
    assert sorted(p.name for p in (out / "checkpoints" / "superseded-1").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    resumed = train(config(base, tmp_path, max_train_steps=6, checkpointing_steps=2, resume_from_checkpoint="latest"))
    assert resumed.status == "completed" and resumed.global_step == 6


def test_a_run_stopped_between_its_last_checkpoint_and_its_lora_can_be_finished(base, tmp_path):
    out = tmp_path / "out"
    done = train(config(base, tmp_path, max_train_steps=3, checkpointing_steps=3, save_precision="fp32"))
    lora = read_safetensors(done.lora_path)[0]
    done.lora_path.unlink()  # killed after checkpoint-3, before the LoRA
    finished = train(config(base, tmp_path, max_train_steps=3, checkpointing_steps=3, save_precision="fp32",
                            resume_from_checkpoint="latest"))
    assert finished.status == "completed" and finished.global_step == 3
    again = read_safetensors(out / outputs.LORA_NAME)[0]
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(config(base, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))


def test_a_failed_save_leaves_the_previous_checkpoint_and_files_intact(base, tmp_path, monkeypatch):
    result = train(config(base, tmp_path, max_train_steps=2, checkpointing_steps=1))
    ckpt = result.checkpoint
    snapshot = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def killed(folder, state):
        (folder / outputs.STATE_NAME).write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(outputs, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_checkpoint(tmp_path / "out", 2, lambda folder: outputs.save_state(folder, {}))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == snapshot
    assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.startswith(".")]
    log = (tmp_path / "out" / "log.csv").read_text()
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(tmp_path / "out" / "log.csv") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert (tmp_path / "out" / "log.csv").read_text() == log
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        outputs.write_log(tmp_path / "log.csv", [{"step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-4, "elapsed_s": 0.1}])
        outputs.plot_loss(tmp_path / "loss.png", [])

        def fill(folder):
            outputs.save_state(folder, {"step": 1})
            (folder / outputs.LORA_NAME).write_bytes(b"x")
            os.chmod(folder / outputs.LORA_NAME, 0o600)  # as safetensors' save_file leaves it

        ckpt = outputs.write_checkpoint(tmp_path, 1, fill)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"log.csv": 0o644, "loss.png": 0o644, "checkpoints": 0o755, "checkpoints/checkpoint-1": 0o755,
                     f"checkpoints/checkpoint-1/{outputs.STATE_NAME}": 0o644, f"checkpoints/checkpoint-1/{outputs.LORA_NAME}": 0o644}
    assert ckpt.name == "checkpoint-1"


# ---------------------------------------------------------------------------------------------- features
def test_prior_preservation_generates_missing_class_images(base, tmp_path):
    class_dir = tmp_path / "class"
    flat_images(class_dir, n=1, colour=(30, 30, 220))
    result = train(config(base, tmp_path, mode="subject", token="sks", with_prior_preservation=True, class_prompt="a photo of a dog",
                          class_data_dir=str(class_dir), num_class_images=3, validation_inference_steps=1, max_train_steps=2))
    assert result.status == "completed"
    assert sorted(p.name for p in class_dir.iterdir()) == ["0.png", "class-00001.png", "class-00002.png"]


def test_class_images_are_topped_up_under_new_names(base, tmp_path):
    from types import SimpleNamespace

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in (0, 2, 4):  # class-00001 and class-00003 of an earlier run were deleted by the user
        Image.new("RGB", (32, 32), (30, 30, 10 * i)).save(class_dir / f"class-{i:05d}.png")
    (class_dir / "class-00006.png").write_bytes(b"")  # unreadable: not one of the images there
    before = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"), wait_for_everyone=lambda: None)
    cfg = config(base, tmp_path, with_prior_preservation=True, class_prompt="a photo of a dog", mode="subject",
                 token="sks", class_data_dir=str(class_dir), num_class_images=5, validation_inference_steps=1)
    found = loop_module._class_examples(load_pipeline(base), cfg, accelerator, seed=0)
    assert len(found) == 5 and sorted(p.name for p in class_dir.iterdir()) == [f"class-{i:05d}.png" for i in (0, 2, 3, 4, 5, 6)]
    assert all((class_dir / name).read_bytes() == data for name, data in before.items())


def test_buckets_cache_latents_pivotal_tuning_and_samples(base, tmp_path):
    data = tmp_path / "data"
    flat_images(data, n=2, size=(64, 32))
    flat_images(data / "tall", n=2, size=(24, 48))
    progress = []
    result = train(config(base, tmp_path, enable_bucket=True, cache_latents=True, pivotal_tuning=True, token="<new-word>",
                          train_batch_size=2, max_train_steps=3, learning_rate=1e-2, num_validation_images=2,
                          validation_steps=2, validation_inference_steps=1), progress=progress.append)
    assert result.status == "completed"
    assert [p["step"] for p in progress] == [1, 2, 3] and progress[1]["sample_paths"]
    assert {"loss", "lr", "eta_s", "max_steps"} <= progress[0].keys()
    assert [p.name for p in result.sample_paths] == ["step-000002.png", "step-000003.png"]
    assert Image.open(result.sample_paths[0]).size == (64, 32)  # a 2x1 grid of 32px images
    out = tmp_path / "out"
    assert (out / "loss.png").is_file() and (out / "log.csv").read_text().startswith("step,epoch,loss,lr")
    embedding = read_safetensors(out / "embeddings.safetensors")[0]
    assert list(embedding) == ["<new-word>"]
    stock = load_pipeline(base)
    stock.load_textual_inversion(str(out / "embeddings.safetensors"))
    assert "<new-word>" in stock.tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------- GPU-path flags on CPU
def test_gradient_checkpointing_gives_the_same_weights(base, tmp_path):
    common = dict(max_train_steps=2, learning_rate=1e-2, train_text_encoder=True, save_precision="fp32")
    plain = train(config(base, tmp_path / "a", **common))
    flat_images(tmp_path / "b" / "data")
    ckpt = train(config(base, tmp_path / "b", gradient_checkpointing=True, **common))
    assert ckpt.pipeline.unet.is_gradient_checkpointing and not plain.pipeline.unet.is_gradient_checkpointing
    a, b = lora_tensors(plain.lora_path), lora_tensors(ckpt.lora_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("backend", [
    "aot_eager",  # traces forward and backward through dynamo + AOTAutograd, runs aten ops (~15 s): bit-exact
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("LORA_TEST_INDUCTOR"),
                                                      reason="generates C++ kernels: ~2 min on 2 cores; LORA_TEST_INDUCTOR=1")),
])
def test_compiled_training_matches_eager(compile_base, tmp_path, backend):
    """--compile: the UNet step under torch.compile learns the same LoRA as eager; only the step is compiled
    (the pipeline returned, the samples and the files use the eager module)."""
    # the dense backward, as on a GPU (on a CPU the default is the low-rank one, compiled in test_compile.py)
    common = dict(max_train_steps=3, learning_rate=1e-2, save_precision="fp32", lora_backward="dense")
    eager = train(config(compile_base, tmp_path / "eager", **common))
    flat_images(tmp_path / "compiled" / "data")
    compiled = train(config(compile_base, tmp_path / "compiled", compile="default", compile_backend=backend, **common))
    assert not hasattr(compiled.pipeline.unet, "_orig_mod")  # the module itself stays eager
    a, b = lora_tensors(eager.lora_path), lora_tensors(compiled.lora_path)
    assert a.keys() == b.keys() and max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    # inductor fuses and reorders float ops; Adam (lr 1e-2) turns a rounding flip of a near-zero gradient into
    # an lr-sized step, so its bound is a fraction of the learning rate
    atol = 0.0 if backend == "aot_eager" else 2e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


def test_dense_backward_trains_the_same_lora(base, tmp_path):
    """--lora_backward dense (the default on CUDA) against lowrank (PEFT's ops), UNet and text encoder, with
    gradient checkpointing (the dense forward is recomputed there)."""
    common = dict(max_train_steps=3, learning_rate=1e-2, train_text_encoder=True, gradient_checkpointing=True,
                  save_precision="fp32")
    lowrank = train(config(base, tmp_path / "a", lora_backward="lowrank", **common))
    flat_images(tmp_path / "b" / "data")
    dense = train(config(base, tmp_path / "b", lora_backward="dense", **common))
    layers = [layer for model in (dense.pipeline.unet, dense.pipeline.text_encoder) for _, layer in lora_layers(model)]
    assert layers and all(layer.backward_mode == "dense" for layer in layers)
    a, b = lora_tensors(lowrank.lora_path), lora_tensors(dense.lora_path)
    assert a.keys() == b.keys() and any("text_encoder" in k for k in a)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    for key in a:  # rounding differs; Adam magnifies that up to ~lr on tiny gradients
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-3, msg=key)


def test_channels_last_trains_the_same_lora(base, tmp_path):
    common = dict(max_train_steps=3, learning_rate=1e-2, save_precision="fp32")
    plain = lora_tensors(train(config(base, tmp_path / "a", **common)).lora_path)
    flat_images(tmp_path / "b" / "data")
    result = train(config(base, tmp_path / "b", channels_last=True, **common))
    conv = result.pipeline.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    other = lora_tensors(result.lora_path)
    for key in plain:  # other conv algorithms round differently; Adam magnifies that up to ~lr on tiny gradients
        torch.testing.assert_close(other[key], plain[key], rtol=0, atol=1e-3, msg=key)


def test_fp8_base_trains_against_the_fp8_rounded_model(base, tmp_path, monkeypatch):
    """kohya's --fp8_base: during the run the frozen Linear / Conv2d weights are float8 (the UNet's and the text
    encoder's; --fp8_base_unet: the UNet's), their biases, norms and embeddings and the LoRA are not; the run
    trains a LoRA in the bf16 run's direction, and the pipeline it returns holds the fp8 values in bf16 again."""
    seen = []
    real = loop_module.condition

    def spy(pipe, *args, **kwargs):  # (each step conditions on the captions first)
        seen.append([sorted({str(p.dtype) for p in model.parameters()}) for model in (pipe.unet, pipe.text_encoder)])
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(loop_module, "condition", spy)
    common = dict(max_train_steps=2, mixed_precision="bf16", train_text_encoder=True, save_precision="fp32", learning_rate=1e-3)
    plain = train(config(base, tmp_path / "a", **common))
    bf16, fp8 = ["torch.bfloat16", "torch.float32"], ["torch.bfloat16", "torch.float32", "torch.float8_e4m3fn"]
    assert seen == [[bf16, bf16]] * 2
    seen.clear()
    runs = {}
    for name, flag in (("fp8", {"fp8_base": True}), ("unet", {"fp8_base_unet": True})):
        flat_images(tmp_path / name / "data")
        runs[name] = train(config(base, tmp_path / name, **common, **flag, save_kohya=True))
        assert seen == [[fp8, fp8 if name == "fp8" else bf16]] * 2, name
        seen.clear()
        header = read_lora_file(runs[name].kohya_path)[1]  # (kohya's keys, as kohya writes them)
        assert (header["ss_fp8_base"], header["ss_fp8_base_unet"]) == (str(name == "fp8"), str(name == "unet"))
    rounded = 0
    for name, run in runs.items():
        for part in ("unet", "text_encoder"):
            theirs, ours = base_state(getattr(plain.pipeline, part)), base_state(getattr(run.pipeline, part))
            linear = {f"{path}.weight" for path, m in getattr(plain.pipeline, part).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            linear = {k.replace(".base_layer", "") for k in linear}
            assert linear and linear <= theirs.keys() and ours.keys() == theirs.keys()
            for key, value in theirs.items():
                expected = value.to(torch.float8_e4m3fn).to(value.dtype) if key in linear and (part == "unet" or name == "fp8") else value
                assert ours[key].dtype == value.dtype and torch.equal(ours[key], expected), (name, part, key)
                rounded += not torch.equal(expected, value)
        modules = [m for part in ("unet", "text_encoder") for m in getattr(run.pipeline, part).modules()]
        assert not any(type(m).__name__.startswith("Fp8") or hasattr(m, "fp8_compute_dtype") for m in modules)  # (restored)
        trained, reference = lora_tensors(run.lora_path), lora_tensors(plain.lora_path)
        assert trained.keys() == reference.keys() and any(not torch.equal(trained[k], reference[k]) for k in trained)
        # the same training direction: Adam's first steps move each B entry by ~lr along the gradient's sign, and
        # 90 % of the signs agree with the bf16 run's (the fp8-rounded model's gradients differ a little)
        signs = [(trained[k].sign(), reference[k].sign()) for k in trained if "lora_B" in k]
        assert all(ours.abs().min() == 1 for ours, _ in signs)  # (every entry trained)
        assert torch.cat([(ours == theirs).flatten() for ours, theirs in signs]).float().mean() > 0.85, name
    assert rounded > 100


def test_fp8_base_is_refused_without_mixed_precision_or_past_fp8s_range(base, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--fp8_base_unet computes in the mixed precision: give --mixed_precision bf16"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", fp8_base_unet=True).validate()

    def model_with_a_large_weight(*args):
        pipe = load_pipeline(*args)
        with torch.no_grad():
            pipe.unet.conv_in.weight[0, 0, 0, 0] = 500.0
        return pipe

    monkeypatch.setattr(loop_module, "load_pipeline", model_with_a_large_weight)
    with pytest.raises(ConfigError, match=r"--fp8_base: unet.conv_in.weight holds 500, past float8_e4m3fn's range \(\+-448\); "
                                          "train without it"):
        train(config(base, tmp_path, mixed_precision="bf16", fp8_base=True))


def test_optimizer_and_schedule_get_the_adam_and_schedule_flags(monkeypatch, tmp_path):
    """The flags reach torch's AdamW and diffusers' get_scheduler (spied; the run stops at the first step; the
    settings' check before the model loads makes one too, on a stand-in optimizer)."""
    import diffusers.optimization

    seen = {}
    real = diffusers.optimization.get_scheduler

    def spy(name, optimizer, **kwargs):
        group = optimizer.param_groups[0]
        if "betas" not in group:  # (the check's SGD)
            return real(name, optimizer, **kwargs)
        seen.update(kwargs, betas=group["betas"], eps=group["eps"])
        raise KeyboardInterrupt  # enough: stop before training

    monkeypatch.setattr(diffusers.optimization, "get_scheduler", spy)
    monkeypatch.setattr(loop_module, "load_pipeline", lambda *a: tiny_pipeline(0))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    config = TrainConfig(pretrained_model_name_or_path=str(tmp_path), train_data_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                         resolution=8, max_train_steps=1, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6,
                         lr_scheduler="cosine_with_restarts", lr_num_cycles=3, lr_power=2.0, num_validation_images=0)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert seen["betas"] == (0.8, 0.99) and seen["eps"] == 1e-6 and seen["num_cycles"] == 3 and seen["power"] == 2.0


def test_compile_settings_are_checked_before_any_model_is_loaded(base, tmp_path, no_model):
    with pytest.raises(ConfigError, match="--compile_backend 'nope'"):
        train(config(base, tmp_path, compile="default", compile_backend="nope"))
    with pytest.raises(ConfigError, match="--compile 'fast'"):
        train(config(base, tmp_path, compile="fast"))


def test_cli_with_config_file_bf16_and_flags(base, tmp_path, capsys):
    from lora_diffusion.training.cli import main

    data = flat_images(tmp_path / "data")
    toml = tmp_path / "style.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{base}"\ntrain_data_dir = "{data}"\nresolution = 32\n'
                    f'max_train_steps = 2\nnum_validation_images = 0\ntoken = "<s>"\nrank = 8\n')
    out = tmp_path / "out"
    code = main(["--config", str(toml), "--output_dir", str(out), "--mixed_precision", "bf16", "--rank", "2", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    lora, header = read_lora_file(out / outputs.LORA_NAME)
    assert {w.rank for w in lora.values()} == {2}  # the flag beat the file
    assert next(iter(read_safetensors(out / outputs.LORA_NAME)[0].values())).dtype == torch.float16
    training = our_metadata(header)["training"]
    assert training["mixed_precision"] == "bf16" and training["seed"] == 1 and training["resolution"] == 32
    assert (out / "log.csv").is_file() and (out / "loss.png").is_file()
    assert main(["--config", str(toml), "--output_dir", str(out)]) == 2  # a previous run is there
    assert "previous run" in capsys.readouterr().err


def test_a_single_file_checkpoint_trains_the_lora_its_folder_trains(base, tmp_path, monkeypatch):
    same_lora_from_a_single_file(base, tmp_path, config, monkeypatch)
    monkeypatch.undo()
    single = str(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="--single_file_config .*: only for a single-file"):
        train(config(base, tmp_path / "a", single_file_config=base))
    with pytest.raises(ConfigError, match="--single_file_config ./nowhere: no such file or folder"):
        train(config(single, tmp_path / "b", single_file_config="./nowhere"))


def _expected_shape(key: str, w, rank: int, alpha: float, conv: tuple[int, float], pattern: dict[str, tuple[int, float]]):
    """The (rank, alpha) a module of a run with --conv_rank / --rank_pattern should have: a pattern's, a 3x3 conv's,
    else the run's."""
    tail = next((v for k, v in pattern.items() if key.endswith(k)), None)
    if tail is not None:
        return tail
    return conv if w.A.dim() == 4 and w.A.shape[-1] == 3 else (rank, alpha)


def test_conv_rank_and_patterns_shape_each_layer_and_the_file_loads_in_stock_diffusers(base, tmp_path):
    """kohya's ``conv_dim`` / ``conv_alpha`` (``--conv_rank`` / ``--conv_alpha``) and PEFT's ``rank_pattern`` /
    ``alpha_pattern``: each layer trains at its own rank and alpha; stock diffusers gives our output from the file;
    the kohya copy records conv_dim and holds the same factors. ``--dim_from_weights`` continues such a file."""
    from diffusers import StableDiffusionPipeline

    from lora_diffusion import load_lora

    shapes = dict(target_modules="full", rank=4, lora_alpha=2, conv_rank=2, conv_alpha=1, rank_pattern="attn2.to_k=3,q_proj=5",
                  alpha_pattern="attn2.to_k=6", train_text_encoder=True)
    run = train(config(base, tmp_path / "a", learning_rate=1e-2, max_train_steps=2, save_precision="fp32", save_kohya=True, **shapes))
    lora, _ = read_lora_file(run.lora_path)
    pattern = {"attn2.to_k": (3, 6.0), "q_proj": (5, 2.0)}
    got = {key: (w.rank, w.alpha) for key, w in lora.items()}
    assert got == {key: _expected_shape(key, w, 4, 2.0, (2, 1.0), pattern) for key, w in lora.items()}
    assert {(2, 1.0), (3, 6.0), (5, 2.0), (4, 2.0)} == set(got.values())  # (each kind is there)
    kohya, meta = read_lora_file(run.kohya_path)
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2" and json.loads(meta["ss_network_args"])["conv_alpha"] == "1.0"
    for key, w in lora.items():
        assert (kohya[key].rank, kohya[key].alpha) == (w.rank, w.alpha) and torch.equal(kohya[key].B, w.B), key

    ours = StableDiffusionPipeline.from_pretrained(base)
    stock = StableDiffusionPipeline.from_pretrained(base)
    load_lora(ours, run.lora_path)
    stock.load_lora_weights(str(run.lora_path))
    ids = ours.tokenizer(PROMPT, padding="max_length", max_length=ours.tokenizer.model_max_length, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        for pipe in (ours, stock):
            pipe.out = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    torch.testing.assert_close(ours.out, stock.out, rtol=1e-5, atol=1e-6)

    # continuing it: its own ranks and alphas (whatever --rank says); at learning rate 0 the same factors come out
    again = train(config(base, tmp_path / "b", learning_rate=0.0, max_train_steps=1, save_precision="fp32", init_lora=str(run.kohya_path),
                         dim_from_weights=True, target_modules="full", train_text_encoder=True, rank=8))
    continued, _ = read_lora_file(again.lora_path)
    assert continued.keys() == lora.keys()
    for key, w in lora.items():
        assert (continued[key].rank, continued[key].alpha) == (w.rank, w.alpha) and torch.equal(continued[key].B, w.B), key
    with pytest.raises(ConfigError, match=r"\.conv\S* has rank 2, alpha 1 .* --rank 2 --lora_alpha 1, or --dim_from_weights"):
        train(config(base, tmp_path / "c", init_lora=str(run.lora_path), target_modules="full", train_text_encoder=True,
                     rank=4, lora_alpha=2, rank_pattern="attn2.to_k=3,q_proj=5", alpha_pattern="attn2.to_k=6"))


@pytest.mark.parametrize("flag, value, match", [
    ("rank_pattern", "attn2.to_k", "'attn2.to_k' is not REGEX=VALUE"),
    ("rank_pattern", "to_k=0", "to_k='0': the value must be a positive integer"),
    ("rank_pattern", "to_k=2.5", "the value must be a positive integer"),
    ("rank_pattern", "(to_k=2", "'\\(to_k' is not a valid regex"),
    ("alpha_pattern", "to_k=inf", "the value must be a positive number"),
    ("rank_pattern", "{\"to_k\": true}", "the value must be a positive integer"),
    ("rank_pattern", "{[", "not a JSON object"),
    ("conv_rank", -1, "must not be negative"),
    ("dim_from_weights", True, "takes the ranks of --init_lora's file"),
])
def test_bad_layer_shapes_are_refused_naming_the_flag(base, tmp_path, flag, value, match):
    with pytest.raises(ConfigError, match=re.escape(f"--{flag}") + ".*" + match):
        config(base, tmp_path, **{flag: value}).validate()


def test_a_config_file_gives_patterns_as_tables(tmp_path):
    from lora_diffusion.training import load_config

    path = tmp_path / "run.yaml"
    path.write_text("rank_pattern:\n  attn2.to_k: 8\n  up_blocks.*: 2\nalpha_pattern: {to_v: 0.5}\n")
    assert load_config(path).patterns() == ({"attn2.to_k": 8, "up_blocks.*": 2}, {"to_v": 0.5})


def test_init_lora_starts_the_run_from_a_files_factors(base, tmp_path):
    """``--init_lora`` (kohya's ``--network_weights``): at learning rate 0 the run saves the very factors it started
    from (here from a kohya copy of an earlier run); modules the file lacks start afresh; a file that does not fit
    the run is refused, naming the module and what to pass."""
    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.tools import convert_lora

    settings = dict(train_text_encoder=True, max_train_steps=2, save_precision="fp32", rank=4, lora_alpha=2)
    first = train(config(base, tmp_path / "a", learning_rate=1e-2, **settings))
    start = tmp_path / "start_kohya.safetensors"
    convert_lora(first.lora_path, start, to="kohya", dtype=torch.float32)
    again = train(config(base, tmp_path / "b", learning_rate=0.0, init_lora=str(start), **settings))
    started, saved = read_lora_file(first.lora_path)[0], read_lora_file(again.lora_path)[0]
    assert saved.keys() == started.keys() and any(w.B.abs().max() > 0 for w in started.values())
    for key, w in started.items():
        assert torch.equal(saved[key].A, w.A) and torch.equal(saved[key].B, w.B) and saved[key].alpha == w.alpha, key
    unet_only = tmp_path / "unet_only.safetensors"  # (the text encoder's modules, missing from it, start afresh: B = 0)
    write_lora_file(unet_only, {k: w for k, w in started.items() if k.startswith("unet.")}, dtype=torch.float32)
    partial = read_lora_file(train(config(base, tmp_path / "c", learning_rate=0.0, init_lora=str(unet_only), **settings)).lora_path)[0]
    assert partial.keys() == started.keys() and all(not w.B.any() for k, w in partial.items() if k.startswith("text_encoder."))
    assert all(torch.equal(partial[k].B, w.B) for k, w in started.items() if k.startswith("unet."))
    for overrides, match in (({"rank": 8}, r"has rank 4, alpha 2 .*; this run trains rank 8, alpha 2 .*: pass --rank 4 --lora_alpha 2"),
                             ({"train_text_encoder": False}, r"\d+ of its \d+ modules are not trained by this run .* or pass --train_text_encoder"),
                             ({"use_dora": True}, "is not DoRA; --use_dora must match it")):
        with pytest.raises(ConfigError, match=match):
            train(config(base, tmp_path / "d", learning_rate=0.0, init_lora=str(start), overwrite=True, **{**settings, **overrides}))
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # an (IA)^3 module: no factors
    save_file({f"{name}.weight": torch.ones(64), f"{name}.on_input": torch.tensor(0)}, str(tmp_path / "ia3.safetensors"))
    with pytest.raises(ConfigError, match=r"to_q is an \(IA\)\^3 module; a run starts from LoRA factors only"):
        train(config(base, tmp_path / "e", init_lora=str(tmp_path / "ia3.safetensors"), **settings))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="--init_lora: .*junk.safetensors"):
        train(config(base, tmp_path / "e", init_lora=str(tmp_path / "junk.safetensors"), **settings))
    with pytest.raises(ConfigError, match="--init_lora .*nothing.safetensors: no such file"):
        train(config(base, tmp_path / "e", init_lora=str(tmp_path / "nothing.safetensors"), **settings))


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records what it is given and predicts zeros (the l2 loss is then the target's power)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, encoder_hidden_states, **kwargs):
        self.calls.append((noisy.clone(), timesteps.clone()))
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()


def test_kohyas_noise_and_timestep_options(base, tmp_path):
    """kohya's multires noise (unit variance, coarser: neighbours correlate), input perturbation (the input gets extra
    noise, the target keeps the noise), and the timestep range; a run with them all records them as kohya does."""
    from diffusers import DDPMScheduler

    from lora_diffusion.training.loop import diffusion_loss, pyramid_noise

    white = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = pyramid_noise(white, torch.Generator().manual_seed(1), 6, 0.3)
    again = pyramid_noise(white, torch.Generator().manual_seed(1), 6, 0.3)
    assert torch.equal(pyramid, again) and abs(float(pyramid.std()) - 1) < 1e-5

    def neighbours(x):
        return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])

    coarse = pyramid_noise(white, torch.Generator().manual_seed(1), 6, 0.8)  # (level 0 is white noise of weight 1)
    assert neighbours(white) < 0.01 < neighbours(pyramid) < 0.1 < 0.2 < neighbours(coarse)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, cond = torch.randn(8, 4, 8, 8), torch.randn(8, 7, 32)
    losses, inputs = {}, {}
    for gamma in (0.0, 0.5):
        unet = _Recorder()
        settings = config(base, tmp_path, ip_noise_gamma=gamma, min_timestep=100, max_timestep=300)
        losses[gamma] = diffusion_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(3), settings)
        (inputs[gamma], timesteps), = unet.calls
        assert 100 <= int(timesteps.min()) and int(timesteps.max()) < 300
    assert torch.equal(losses[0.0], losses[0.5])  # the target is the same noise
    assert not torch.allclose(inputs[0.0], inputs[0.5])  # the UNet's input is not
    with pytest.raises(ConfigError, match="the scheduler has 1000 timesteps"):
        diffusion_loss(_Recorder(), scheduler, latents, cond, torch.Generator(), config(base, tmp_path, max_timestep=2000))
    with pytest.raises(ConfigError, match="the scheduler has 1000 timesteps"):  # (a run: before its first step)
        train(config(base, tmp_path / "past", max_timestep=2000))
    assert not (tmp_path / "past" / "out" / "log.csv").exists()

    run = train(config(base, tmp_path / "run", multires_noise_iterations=6, multires_noise_discount=0.4, ip_noise_gamma=0.1,
                       min_timestep=100, max_timestep=900, loss_type="huber", huber_schedule="exponential", max_train_steps=2,
                       save_kohya=True))
    assert math.isfinite(run.final_loss)
    meta = read_lora_file(run.kohya_path)[1]
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"], meta["ss_ip_noise_gamma"],
            meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("6", "0.4", "0.1", "huber", "exponential", "0.1")


def test_kohyas_loss_types():
    """l2 is MSE and l1 the absolute error; huber is ~d^2 well inside its threshold c and ~2c|d| far outside it,
    smooth_l1 ~d^2/c and ~2|d|; the thresholds follow kohya's schedules (snr: nearly 1 at t = 0, down toward huber_c;
    exponential: huber_scale at t = 0, huber_c * huber_scale at t = T; constant: huber_c * huber_scale)."""
    from diffusers import DDPMScheduler

    from lora_diffusion.training.loop import elementwise_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    target = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([0, 500, 999])

    def loss(kind, d, **kw):
        return elementwise_loss(torch.full((3, 1, 1, 1), d), target, TrainConfig(loss_type=kind, **kw), scheduler, t).flatten()

    assert torch.equal(loss("l2", 0.3), torch.full((3,), 0.3) ** 2) and torch.equal(loss("l1", -0.3), torch.full((3,), 0.3))
    c = 0.2
    assert torch.allclose(loss("huber", 1e-3, huber_schedule="constant", huber_c=c), torch.full((3,), 1e-6), rtol=1e-3)
    assert torch.allclose(loss("huber", 100.0, huber_schedule="constant", huber_c=c), torch.full((3,), 2 * c * 100), rtol=1e-2)
    assert torch.allclose(loss("smooth_l1", 1e-3, huber_schedule="constant", huber_c=c), torch.full((3,), 1e-6 / c), rtol=1e-3)
    assert torch.allclose(loss("smooth_l1", 100.0, huber_schedule="constant", huber_c=c), torch.full((3,), 200.0), rtol=1e-2)

    def threshold(schedule, **kw):  # huber at a large d is ~2c|d|: c, per timestep
        return loss("huber", 1e4, huber_schedule=schedule, **kw) / 2e4

    snr = threshold("snr", huber_c=0.1)
    assert 0.95 < float(snr[0]) <= 1 and snr[0] > snr[1] > snr[2] and abs(float(snr[2]) - 0.1) < 0.01
    exp = threshold("exponential", huber_c=0.1, huber_scale=2.0)
    assert torch.allclose(exp[[0, 2]], torch.tensor([2.0, 0.2]), rtol=1e-2) and exp[0] > exp[1] > exp[2]
    assert torch.allclose(threshold("constant", huber_c=0.1, huber_scale=3.0), torch.full((3,), 0.3), rtol=1e-3)


@pytest.mark.parametrize("overrides, match", [
    ({"multires_noise_discount": 1.5}, "--multires_noise_discount must be in"),
    ({"min_timestep": 500, "max_timestep": 400}, "--min_timestep 500 must be below --max_timestep 400"),
    ({"loss_type": "huber", "huber_c": 0.0}, "--huber_c must be in \\(0, 1\\]"),
    ({"loss_type": "hinge"}, "--loss_type 'hinge': choose one of l2, l1, huber, smooth_l1"),
    ({"ip_noise_gamma": -0.1}, "--ip_noise_gamma must not be negative"),
])
def test_bad_noise_and_loss_settings_are_refused(base, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(base, tmp_path, **overrides).validate()


def test_a_validation_split_holds_images_out_and_measures_their_loss_without_touching_training(base, tmp_path):
    """kohya's --validation_split: the held-out images are not trained on; their loss is logged at every
    --validate_every_n_steps and at the end, from the same noise each time (at learning rate 0 it does not move);
    validating more often changes no trained weight; the kohya copy records the split."""
    data = tmp_path / "data"
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]):
        flat_images(data / f"c{i}", n=1, colour=colour)
    settings = dict(train_data_dir=str(data), validation_split=0.4, max_train_steps=4, save_precision="fp32")
    every = train(config(base, tmp_path / "a", validate_every_n_steps=1, learning_rate=1e-2, save_kohya=True, **settings))
    end = train(config(base, tmp_path / "b", validate_every_n_steps=0, validation_steps=0, learning_rate=1e-2, **settings))
    rows = outputs.read_log(every.log_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3, 4] and every.val_loss == rows[-1]["val_loss"]
    assert [r["step"] for r in outputs.read_log(end.log_path) if "val_loss" in r] == [4]
    assert end.val_loss == every.val_loss  # the same weights, the same held-out noise
    a, b = read_lora_file(every.lora_path)[0], read_lora_file(end.lora_path)[0]
    assert all(torch.equal(a[k].B, b[k].B) for k in a) and any(w.B.abs().max() > 0 for w in a.values())
    meta = read_lora_file(every.kohya_path)[1]
    assert meta["ss_validation_split"] == "0.4" and meta["ss_num_train_images"] == "3"  # (2 of the 5 held out)
    still = train(config(base, tmp_path / "c", validate_every_n_steps=2, learning_rate=0.0, **settings))
    vals = [r["val_loss"] for r in outputs.read_log(still.log_path) if "val_loss" in r]
    assert len(vals) == 2 and vals[0] == vals[1] and math.isfinite(vals[0])
    with pytest.raises(ConfigError, match="--validation_split must be in"):
        config(base, tmp_path / "d", validation_split=1.0).validate()
    flat_images(tmp_path / "one", n=1)
    with pytest.raises(ConfigError, match="--validation_split 0.5: 1 image; holding one out needs at least 2"):
        train(config(base, tmp_path / "d", train_data_dir=str(tmp_path / "one"), validation_split=0.5))


def test_save_every_n_steps_and_epochs_write_the_lora_as_it_was(base, tmp_path):
    """kohya's --save_every_n_steps / --save_every_n_epochs: named files beside the final LoRA, each equal to the
    checkpoint of its step; an --overwrite run sets the old ones aside with the rest of the previous run. kohya's
    --save_last_n_steps (in steps) and --save_last_n_epochs (in saves) delete the older ones as kohya does, and
    --save_state writes a checkpoint with each save, deleted as kohya deletes its states (--save_last_n_steps_state /
    --save_last_n_epochs_state, by default the two above)."""
    settings = dict(max_train_steps=10, train_batch_size=1, save_precision="fp32", checkpointing_steps=1)
    run = train(config(base, tmp_path, save_every_n_steps=3, save_every_n_epochs=1, **settings))  # 4 images: 4 steps an epoch
    out = run.output_dir
    names = sorted(p.name for p in out.glob("out-*.safetensors"))
    assert names == ["out-000001.safetensors", "out-000002.safetensors", "out-step00000003.safetensors",
                     "out-step00000006.safetensors", "out-step00000009.safetensors"]
    for name, step in (("out-step00000006.safetensors", 6), ("out-000002.safetensors", 8)):
        snapshot, meta = read_lora_file(out / name)
        checkpoint, _ = read_lora_file(out / "checkpoints" / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
        assert snapshot.keys() == checkpoint.keys() and our_metadata(meta)["steps"] == step
        assert all(torch.equal(snapshot[k].A, w.A) and torch.equal(snapshot[k].B, w.B) for k, w in checkpoint.items())
    kohya = dict(save_every_n_steps=2, save_last_n_steps=3, save_every_n_epochs=1, save_last_n_epochs=1, save_state=True)
    again = train(config(base, tmp_path, save_kohya=True, overwrite=True, **{**settings, "checkpointing_steps": 0}, **kohya))
    # steps 2, 4, 6, 8 saved; at 6 the step 2 one goes (6 - 3 - 1 = 2), at 8 the step 4 one; epoch 1 goes at epoch 2
    assert sorted(p.name for p in again.output_dir.glob("out-*.safetensors")) == [
        "out-000002.safetensors", "out-step00000006.safetensors", "out-step00000008.safetensors"]
    # --save_state's checkpoints go as kohya's states go (by the same rules: --save_last_n_*_state unset): the step 2 one
    # at 6; the one at 4 (step 4, epoch 1) at 8; the end's (10) stays
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{n}" for n in (10, 6, 8)]
    # --save_last_n_steps_state / _epochs_state in their place: step states within 5 steps, 2 epoch states; and the
    # --checkpointing_steps checkpoints are never theirs to delete
    states = dict(save_last_n_steps_state=5, save_last_n_epochs_state=2, checkpointing_steps=3)
    third = train(config(base, tmp_path, save_kohya=True, overwrite=True, **{**settings, **kohya, **states}))
    # states at 2, 4 (epoch 1 too), 6, 8 (epoch 2 too); at 8 the step 2 one goes (8 - 5 - 1 = 2); epochs 1 and 2 stay
    assert sorted(p.name for p in (third.output_dir / "checkpoints").iterdir()) == [
        f"checkpoint-{n}" for n in (10, 3, 4, 6, 8, 9)]
    assert read_lora_file(out / "out-step00000008.safetensors")[1]["ss_output_name"] == "out-step00000008"  # kohya's
    # kohya's --save_n_epoch_ratio 2 over a 2-epoch run: every (2 // 2) epoch, over --save_every_n_epochs 5
    ratio = train(config(base, tmp_path / "ratio", max_train_steps=8, save_every_n_epochs=5, save_n_epoch_ratio=2))
    assert sorted(p.name for p in ratio.output_dir.glob("out-*.safetensors")) == ["out-000001.safetensors"]


def test_scale_weight_norms_caps_every_layers_change(base, tmp_path):
    """kohya's --scale_weight_norms: after each step no layer's alpha/r * B A has a Frobenius norm past the cap (both
    factors scaled by the square root of cap / norm); the layers scaled and the largest norm are logged, and a
    change within the cap is left alone."""
    from lora_diffusion.training.loop import scale_weight_norms

    cap = 0.02
    run = train(config(base, tmp_path, learning_rate=5e-2, max_train_steps=3, scale_weight_norms=cap, save_precision="fp32",
                       save_kohya=True))
    lora, _ = read_lora_file(run.lora_path)
    norms = [float((w.B.flatten(1) @ w.A.flatten(1)).norm()) * w.alpha / w.rank for w in lora.values()]
    assert max(norms) <= cap * (1 + 1e-5) and max(norms) > cap * 0.99  # (the large steps reached the cap)
    rows = outputs.read_log(run.log_path)
    assert all(r["keys_scaled"] > 0 and r["max_key_norm"] <= cap * (1 + 1e-5) for r in rows)
    assert read_lora_file(run.kohya_path)[1]["ss_scale_weight_norms"] == str(cap)
    unet = run.pipeline.unet
    before = {n: (layer.lora_A["default"].clone(), layer.lora_B["default"].clone()) for n, layer in lora_layers(unet)}
    count, mean, largest = scale_weight_norms([unet], 1.0)  # (a cap none reaches)
    assert count == 0 and largest <= cap * (1 + 1e-5) and 0 < mean <= largest
    assert all(torch.equal(layer.lora_A["default"], before[n][0]) for n, layer in lora_layers(unet))


def test_kohyas_snr_weightings_and_zero_terminal_snr(base, base_v, tmp_path):
    """kohya's --debiased_estimation_loss (1/sqrt(SNR); v-prediction 1/(SNR+1)) and --scale_v_pred_loss_like_noise_pred
    (SNR/(SNR+1)), SNR capped at 1000, after Min-SNR; --zero_terminal_snr's schedule (sqrt(alpha_bar) shifted to 0 at
    the end and scaled back to its start); the combinations a prediction type cannot take are refused before a step."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from lora_diffusion.training.loop import diffusion_loss, training_scheduler

    latents, cond = torch.randn(6, 4, 8, 8), torch.randn(6, 7, 32)
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)

        def per_sample(**kw):  # (each sample's loss: batches of one, same generator)
            out, steps = [], []
            for i in range(6):
                unet = _Recorder()
                out.append(diffusion_loss(unet, scheduler, latents[i:i + 1], cond[i:i + 1], torch.Generator().manual_seed(i),
                                          config(base, tmp_path, **kw)))
                steps.append(unet.calls[0][1])
            return torch.stack(out), torch.cat(steps)

        plain, t = per_sample()
        snr = compute_snr(scheduler, t).clamp(max=1000)
        debiased, _ = per_sample(debiased_estimation_loss=True)
        expect = 1 / (snr + 1) if kind == "v_prediction" else 1 / snr.sqrt()
        torch.testing.assert_close(debiased, plain * expect)
        both, _ = per_sample(debiased_estimation_loss=True, snr_gamma=5.0)
        min_snr = compute_snr(scheduler, t).clamp(max=5.0) / (compute_snr(scheduler, t) + (kind == "v_prediction"))
        torch.testing.assert_close(both, plain * min_snr * expect)
        if kind == "v_prediction":
            scaled, _ = per_sample(scale_v_pred_loss_like_noise_pred=True)
            torch.testing.assert_close(scaled, plain * snr / (snr + 1))
        else:  # --v_pred_like_loss: loss + loss / (SNR/(SNR+1)) * v, before the debiased weight
            vlike, _ = per_sample(v_pred_like_loss=0.1, debiased_estimation_loss=True)
            torch.testing.assert_close(vlike, (plain + plain / (snr / (snr + 1)) * 0.1) * expect)

    plain = training_scheduler(DDPMScheduler(prediction_type="v_prediction").config, config(base, tmp_path))
    ztsnr = training_scheduler(DDPMScheduler(prediction_type="v_prediction").config, config(base, tmp_path, zero_terminal_snr=True))
    before, after = plain.alphas_cumprod.sqrt(), ztsnr.alphas_cumprod.sqrt()
    assert float(after[-1]) == 0 and float(before[-1]) > 0
    torch.testing.assert_close(after, (before - before[-1]) * before[0] / (before[0] - before[-1]))

    with pytest.raises(ConfigError, match="--zero_terminal_snr leaves an SNR of 0 at the last timestep"):
        train(config(base, tmp_path / "eps", zero_terminal_snr=True, snr_gamma=5.0))
    with pytest.raises(ConfigError, match="--scale_v_pred_loss_like_noise_pred is for v-prediction models; this one predicts epsilon"):
        train(config(base, tmp_path / "eps2", scale_v_pred_loss_like_noise_pred=True))
    with pytest.raises(ConfigError, match="--v_pred_like_loss adds a v-prediction-like loss to an epsilon model's"):
        train(config(base_v, tmp_path / "v2", v_pred_like_loss=0.1))
    with pytest.raises(ConfigError, match="--zero_terminal_snr leaves an SNR of 0 at the last timestep, by which --v_pred_like_loss"):
        train(config(base, tmp_path / "eps3", v_pred_like_loss=0.1, zero_terminal_snr=True))
    run = train(config(base_v, tmp_path / "v", zero_terminal_snr=True, debiased_estimation_loss=True, snr_gamma=5.0,
                       max_train_steps=2, save_kohya=True))
    assert math.isfinite(run.final_loss)
    meta = read_lora_file(run.kohya_path)[1]
    assert (meta["ss_zero_terminal_snr"], meta["ss_debiased_estimation"], meta["ss_scale_v_pred_loss_like_noise_pred"]) == \
        ("True", "True", "False")


def test_max_token_length_reads_long_captions_in_kohyas_chunks(base, tmp_path):
    """kohya's --max_token_length: ids in chunks of 75 between the first and last tokens (SD 2 / SDXL's padding rules
    too), each chunk encoded alone and joined to 1 + 75n + 1 states; a short caption keeps its first 76 states, a
    long one is read past token 75 (cut at 75 it is not); SD and SDXL runs train with it and record it."""
    from lora_diffusion.prompts import encode_text, token_ids

    pipe = tiny_pipeline(0)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    words = [f"w{i}" for i in range(200)]
    long, head = " ".join(words[:90]), " ".join(words[:30])  # (262 and 82 tokens)
    tail_a, tail_b = " ".join(words[100:110]), " ".join(words[110:120])  # (40 tokens each: past 75, within 150)
    full = tokenizer(long).input_ids  # (no cut)
    ids = token_ids(tokenizer, [long], "cpu", 150)
    assert ids.shape == (1, 2, 77) and len(full) > 150
    assert ids[0, 0, 1:76].tolist() == full[1:76] and ids[0, 1, 1:76].tolist() == full[76:151]
    assert ids[0, :, 0].tolist() == [full[0]] * 2 and ids[0, 0, -1] == ids[0, 1, -1]
    with torch.no_grad():
        short = [encode_text(tokenizer, encoder, ["a red circle"], "cpu", 1, n) for n in (None, 150, 225)]
        assert [s.shape[1] for s in short] == [77, 152, 227]
        assert torch.equal(short[1][:, :76], short[0][:, :76]) and torch.equal(short[2][:, :76], short[0][:, :76])
        a, b = ([encode_text(tokenizer, encoder, [head + " " + tail], "cpu", 2, n) for n in (None, 150)] for tail in (tail_a, tail_b))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # (cut at 75 the tails are lost; read to 150 they count)

    padded = copy.deepcopy(tokenizer)  # SD 2 / SDXL's second tokenizer: its padding is not its end token
    padded.pad_token = "!"
    ids = token_ids(padded, ["a red circle", long], "cpu", 150)
    pad, end = padded.pad_token_id, padded.eos_token_id
    assert pad != end and ids[0, 1, 1] == end and ids[0, 1, 2] == pad  # an empty chunk starts with the end token
    assert ids[1, 0, -2] not in (pad, end) and ids[1, 0, -1] == end  # a chunk cut mid-text ends with it

    for name, model in (("sd", base), ("sdxl", None)):
        if model is None:
            model = str(tmp_path / "xl")
            from lora_diffusion.testing import tiny_sdxl_pipeline

            tiny_sdxl_pipeline(0).save_pretrained(model)
        data = tmp_path / f"{name}-data"
        flat_images(data)
        for image in data.glob("*.png"):
            image.with_suffix(".txt").write_text("(w0:1.3) " + long)
        run = train(config(model, tmp_path / name, train_data_dir=str(data), max_token_length=225, max_train_steps=1,
                           save_kohya=True, weighted_captions=True))
        assert math.isfinite(run.final_loss) and read_lora_file(run.kohya_path)[1]["ss_max_token_length"] == "225"
    with pytest.raises(ConfigError, match="--max_token_length 100: choose one of 75, 150, 225"):
        config(base, tmp_path, max_token_length=100).validate()


def test_weighted_captions_weigh_the_states_as_kohya_does(base, tmp_path):
    """kohya's --weighted_captions, its steps written out: each emphasis fragment tokenized alone, the ids padded,
    the encoder's states (clip_skip's layer) times each token's weight, no mean restored; past 75 tokens the weights
    follow the chunks; a caption without emphasis conditions as it does unweighted."""
    from lora_diffusion.prompts import encode_text, token_ids, weighted_token_ids

    pipe = tiny_pipeline(0)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens, weights = [], []
    for fragment, weight in (("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("blurry", 1 / 1.1), (" sky", 1.1)):
        piece = tokenizer(fragment).input_ids[1:-1]
        tokens, weights = tokens + piece, weights + [weight] * len(piece)
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(tokens))
    scale = torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights)))
    with torch.no_grad():
        for clip_skip in (1, 2):
            states = encoder(torch.tensor([ids]), output_hidden_states=True)
            states = states[0] if clip_skip == 1 else encoder.text_model.final_layer_norm(states.hidden_states[-2]) \
                if hasattr(encoder, "text_model") else encoder.final_layer_norm(states.hidden_states[-2])
            got, _ = condition(pipe, ["a (red:1.5) cat, [blurry] (sky"], None, "cpu", torch.float32, clip_skip, weighted=True)
            assert torch.equal(got, states * scale[None, :, None]), clip_skip
        plain = encode_text(tokenizer, encoder, ["a red cat"], "cpu")
        assert torch.equal(condition(pipe, ["a red cat"], None, "cpu", torch.float32, weighted=True)[0], plain)
        text = " ".join(["a"] * 80) + " red cat"  # (token 81, "red", in the second chunk)
        ids, scale = weighted_token_ids(tokenizer, [text.replace("red", "(red:2)")], "cpu", 150)
        assert torch.equal(ids, token_ids(tokenizer, [text], "cpu", 150)) and scale.shape == (1, 2, 77)
        red = len(tokenizer("red").input_ids) - 2  # (its tokens follow the 80 "a"s: chunk 1 from its 6th place)
        assert scale[0, 1, 6 : 6 + red].tolist() == [2.0] * red and (scale == 1).sum() == 2 * 77 - red
        expect = encode_text(tokenizer, encoder, [text], "cpu", 1, 150)
        expect[:, 81 : 81 + red] *= 2
        assert torch.equal(condition(pipe, [text.replace("red", "(red:2)")], None, "cpu", torch.float32, 1, 150, True)[0], expect)


def test_a_kohya_command_trains_as_kohya_would(base, tmp_path):
    """A kohya command line (networks.lora, output_name, network_args conv_dim) trains the UNet's attention, MLP and
    convolutions and the text encoder, and writes <output_name>.safetensors in kohya's format; --v_parameterization
    trains an epsilon-configured model as a v-prediction one. kohya's module dropout leaves layers out of the step
    (their B stays zero), and its dropouts are written where kohya writes them."""
    from lora_diffusion.training.cli import main

    data = tmp_path / "data"
    flat_images(data)
    out = tmp_path / "out"
    command = ["--pretrained_model_name_or_path", base, "--train_data_dir", str(data),
                 "--output_name", "my_style", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
                 "--network_args", "conv_dim=2", "conv_alpha=1", "rank_dropout=0.25", "module_dropout=0.5",
                 "--network_dropout", "0.1", "--resolution", "32,32", "--max_train_steps", "1", "--enable_bucket",
                 "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "16", "--bucket_no_upscale",
                 "--flip_aug", "--color_aug", "--training_comment", "first try", "--metadata_author", "me", "--metadata_tags", "a,b",
                 "--optimizer_type", "AdamW", "--xformers", "--save_model_as", "safetensors", "--num_validation_images", "0",
                 "--v_parameterization", "--seed", "0"]
    assert main(command + ["--output_dir", str(out)]) == 0
    state, meta = read_safetensors(out / "my_style.safetensors")
    keys = set(state)
    assert any(k.startswith("lora_te_") for k in keys) and any("_ff_net_" in k for k in keys)
    assert any("resnets" in k and "conv1" in k for k in keys)  # (LoCon: the ResNet convolutions)
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "my_style"
    assert (meta["ss_training_comment"], meta["modelspec.author"], meta["modelspec.tags"], meta["modelspec.title"]) == (
        "first try", "me", "a,b", "my_style")
    assert meta["ss_network_dropout"] == "0.1" and json.loads(meta["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "1.0", "rank_dropout": "0.25", "module_dropout": "0.5"}
    ups = [t for k, t in state.items() if k.endswith("lora_up.weight")]
    untouched = sum(not t.any() for t in ups)  # (one step: a layer the module dropout left out learned nothing)
    assert 0.25 * len(ups) < untouched < 0.75 * len(ups), (untouched, len(ups))
    assert our_metadata(read_safetensors(out / "pytorch_lora_weights.safetensors")[1])["prediction_type"] == "v_prediction"
    # --no_metadata: kohya's minimum (the network's shape and arguments) and the model card; no settings, data, comment
    assert main(command + ["--output_dir", str(tmp_path / "bare"), "--no_metadata"]) == 0
    bare = read_safetensors(tmp_path / "bare" / "my_style.safetensors")[1]
    assert {k: bare[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.author")} == \
        {k: meta[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.author")}
    for key in ("ss_training_comment", "ss_learning_rate", "ss_tag_frequency", "ss_dataset_dirs", "ss_sd_model_name", "ss_seed"):
        assert key in meta and key not in bare, key
    ours = our_metadata(read_safetensors(tmp_path / "bare" / "pytorch_lora_weights.safetensors")[1])
    assert "base_model" not in ours and "dataset" not in ours and str(data) not in json.dumps(ours)


def test_kohya_sample_prompts_are_written_where_and_when_kohya_writes_them(base, tmp_path):
    """--sample_prompts with kohya's options: at the first step (--sample_at_first) and each epoch's end
    (--sample_every_n_epochs wins over --sample_every_n_steps), one image a prompt in sample/, named as kohya names
    them; the first sample, before any training, is the base model's image with the prompt's sampler, seed, size,
    steps, guidance and negative prompt."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    flat_images(tmp_path / "data", n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's sample prompts\na red square --n blue --w 48 --h 32 --d 5 --l 3 --s 2 --ss euler_a\n\n"
                       "a circle --s 2\na (red:1.6) square --n blue --w 48 --h 32 --d 5 --l 3 --s 2 --ss euler_a\n")
    result = train(config(base, tmp_path, sample_prompts=str(prompts), sample_at_first=True, sample_every_n_epochs=1,
                          sample_every_n_steps=3, output_name="mine", save_kohya=True, train_batch_size=1,
                          resolution_height=48))  # (kohya's --resolution 32,48: a prompt without --w/--h is that size)
    assert result.status == "completed"
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    pattern = r"mine_(000000|e000001|e000002)_0([012])_\d{14}(_5)?\.png"
    assert len(names) == 9 and all(re.fullmatch(pattern, n) for n in names), names
    assert [re.fullmatch(pattern, n).group(1, 2) for n in names] == [
        (when, i) for when in ("000000", "e000001", "e000002") for i in "012"]
    assert all(n.endswith("_5.png") == (n.split("_")[2] != "01") for n in names)  # (the seed only where given)
    weighted = Image.open(tmp_path / "out" / "sample" / names[2])  # (kohya's samples read (word:1.6) weights)
    first = Image.open(tmp_path / "out" / "sample" / names[0])
    assert first.size == (48, 32) and Image.open(tmp_path / "out" / "sample" / names[1]).size == (32, 48)
    assert read_lora_file(result.kohya_path)[1]["ss_resolution"] == "(32, 48)"
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expect = pipe("a red square", negative_prompt="blue", width=48, height=32, num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(expect))
    assert not np.array_equal(np.asarray(first), np.asarray(weighted))
    later = Image.open(tmp_path / "out" / "sample" / names[6])
    assert not np.array_equal(np.asarray(later), np.asarray(expect))  # (trained: the LoRA changes the image)

    bad = tmp_path / "bad.txt"
    for text, match in (("a cat --x 3", r"bad.txt:1: unknown option --x"), ("\na cat --s many", r"bad.txt:2: --s many: not a whole number"),
                        ("a cat --ss fast", r"--ss fast: unknown sampler")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            config(base, tmp_path, sample_prompts=str(bad)).validate()
    with pytest.raises(ConfigError, match="sample the prompts of --sample_prompts: give that file"):
        config(base, tmp_path, sample_every_n_steps=2).validate()


@pytest.mark.parametrize("optimizer_args", ["", "foreach=True"])  # (foreach: the user's choice, not fused over it)
def test_each_sample_shows_the_lora_of_its_step(base, tmp_path, optimizer_args):
    """A sample made during training is the image the LoRA saved at that step makes. The layers keep the stacked
    factors while their version counters stand, and torch's fused AdamW (ours on CUDA and on the CPU) and
    bitsandbytes' write the factors without counting one: the loop counts it, or every later sample would show
    the first sample's LoRA."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from lora_diffusion import load_lora

    flat_images(tmp_path / "data", n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --s 2 --d 5 --ss euler_a\n")
    result = train(config(base, tmp_path, sample_prompts=str(prompts), sample_at_first=True, sample_every_n_epochs=1,
                          train_batch_size=1, learning_rate=1e-2, save_precision="fp32", optimizer_args=optimizer_args))
    samples = sorted((tmp_path / "out" / "sample").iterdir())
    assert len(samples) == 3  # before training, after epoch 1 (step 2) and after epoch 2 (step 4, the saved LoRA)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_lora(pipe, result.lora_path)
    expect = pipe("a red square", num_inference_steps=2, width=32, height=32, generator=torch.Generator().manual_seed(5)).images[0]
    middle, last = (np.asarray(Image.open(p)) for p in samples[1:])
    assert np.array_equal(last, np.asarray(expect)) and not np.array_equal(middle, last)


def test_kohya_dataset_config_trains_the_lora_its_flags_train(base, tmp_path, monkeypatch):
    """kohya's --dataset_config: a file giving the images, the regularisation images, the batch size and the caption
    settings trains the LoRA that --train_data_dir / --reg_data_dir and the same flags train, bit for bit."""
    data, reg = flat_images(tmp_path / "data"), flat_images(tmp_path / "reg", n=2, colour=(30, 30, 220))
    for i in range(4):
        (data / f"{i}.txt").write_text(f"<s>, red, square {i}, flat")
        image = Image.open(data / f"{i}.png")
        image.paste((0, 0, 0), (0, 0, 12, 32))  # (a flip shows)
        image.save(data / f"{i}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]\nshuffle_caption = true\nkeep_tokens = 1\nflip_aug = true\n[[datasets]]\nbatch_size = 2
[[datasets.subsets]]\nimage_dir = '{data}'\n[[datasets.subsets]]\nimage_dir = '{reg}'\nis_reg = true\nclass_tokens = "dog"\n""")
    seen = []
    real = loop_module.condition
    monkeypatch.setattr(loop_module, "condition", lambda pipe, captions, *a, **k: (seen.extend(captions), real(pipe, captions, *a, **k))[1])
    flags = train(config(base, tmp_path / "a", train_data_dir=str(data), reg_data_dir=str(reg), class_prompt="dog",
                         train_batch_size=2, shuffle_caption=True, keep_tokens=1, random_flip=True, max_train_steps=3))
    assert "dog" in seen and len({c for c in seen if c != "dog"}) > 2  # (shuffled)
    from_file = train(config(base, tmp_path / "b", train_data_dir="", dataset_config=str(toml), max_train_steps=3))
    a, b = lora_tensors(flags.lora_path), lora_tensors(from_file.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # kohya's fine-tuning metadata (--in_json): the captions a table gives train what the same sidecar captions train
    table = tmp_path / "meta.json"
    table.write_text(json.dumps({f"{i}": {"caption": "<s>, red", "tags": f"square {i}, flat"} for i in range(4)}))
    bare = tmp_path / "bare"  # (the images alone: no sidecar captions)
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("*.txt"))
    runs = [train(config(base, tmp_path / name, max_train_steps=2, **extra)) for name, extra in
            (("c", {"train_data_dir": str(bare), "in_json": str(table), "caption_separator": ", "}), ("d", {"train_data_dir": str(data)}))]
    c, d = (lora_tensors(r.lora_path) for r in runs)
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)
    # two data sets side by side, each at its resolution and batch size: a batch holds one data set's images
    wide = flat_images(tmp_path / "wide", n=2, size=(48, 32))
    two = tmp_path / "two.toml"
    two.write_text(f"[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{data}'\n"
                   f"[[datasets]]\nresolution = [48, 32]\n[[datasets.subsets]]\nimage_dir = '{wide}'\nnum_repeats = 2\n")
    shapes = []
    real_loss = loop_module.diffusion_loss
    monkeypatch.setattr(loop_module, "diffusion_loss", lambda unet, s, latents, *a, **k: (shapes.append(tuple(latents.shape)),
                                                                                          real_loss(unet, s, latents, *a, **k))[1])
    sides = train(config(base, tmp_path / "sides", train_data_dir="", dataset_config=str(two), max_train_steps=4))
    assert math.isfinite(sides.final_loss) and set(shapes) == {(2, 4, 16, 16), (1, 4, 16, 24)}  # (the VAE halves the sides)
    with pytest.raises(ConfigError, match="dataset.toml: its is_reg subsets are the regularisation images"):
        train(config(base, tmp_path / "c", dataset_config=str(toml), with_prior_preservation=True, class_data_dir=str(reg),
                     class_prompt="a dog"))


def test_kohya_masked_loss_weighs_each_pixel_by_its_mask(base, tmp_path, monkeypatch):
    """kohya's --masked_loss / --alpha_mask: the loss is weighed by the mask, area-averaged to the latents' size
    (kohya's apply_masked_loss); all-1 masks (opaque images, white mask images) train the LoRA a run without masks
    trains, bit for bit; all-0 ones train nothing; masks without --masked_loss, and --masked_loss without masks, are
    refused before a model loads."""
    from diffusers import DDPMScheduler

    from lora_diffusion.training.loop import diffusion_loss

    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    mask = torch.rand(2, 1, 64, 64)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    plain = diffusion_loss(_Recorder(), scheduler, latents, cond, torch.Generator().manual_seed(0), config(base, tmp_path))
    masked = diffusion_loss(_Recorder(), scheduler, latents, cond, torch.Generator().manual_seed(0), config(base, tmp_path), mask=mask)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))  # (the noise the loss drew first;
    per_pixel = target**2 * torch.nn.functional.interpolate(mask, size=(8, 8), mode="area")  # the stand-in predicts 0)
    torch.testing.assert_close(masked, per_pixel.mean())
    assert not torch.equal(masked, plain)

    data = tmp_path / "data"
    flat_images(data)
    for image in data.glob("*.png"):
        Image.open(image).convert("RGBA").save(image)  # (opaque)
    white = tmp_path / "masks"
    flat_images(white, colour=(255, 255, 255))
    settings = dict(max_train_steps=2, save_precision="fp32")
    runs = [train(config(base, tmp_path / name, **settings, **extra)) for name, extra in
            (("plain", {}), ("alpha", {"alpha_mask": True}), ("white", {"masked_loss": True, "conditioning_data_dir": str(white)}))]
    files = [lora_tensors(r.lora_path) for r in runs]
    assert all(f.keys() == files[0].keys() and all(torch.equal(f[k], files[0][k]) for k in f) for f in files[1:])
    clear = tmp_path / "clear"
    flat_images(clear)
    for image in clear.glob("*.png"):
        Image.new("RGBA", (32, 32), (220, 30, 30, 0)).save(image)
    nothing = lora_tensors(train(config(base, tmp_path / "none", train_data_dir=str(clear), alpha_mask=True, **settings)).lora_path)
    ups = [k for k in nothing if "lora_B" in k or "lora_up" in k or "lora.up" in k]
    assert ups and all(not nothing[k].any() for k in ups) and any(files[0][k].any() for k in ups)

    monkeypatch.setattr(loop_module, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="--masked_loss: no training image has a mask"):
        train(config(base, tmp_path / "a", masked_loss=True))
    with pytest.raises(ConfigError, match="give --masked_loss too"):
        train(config(base, tmp_path / "b", conditioning_data_dir=str(white)))
    (white / "0.png").unlink()
    with pytest.raises(DataError, match=r"masks: no mask for 1 image\(s\), e.g. 0.png"):
        train(config(base, tmp_path / "c", masked_loss=True, conditioning_data_dir=str(white)))


def test_kohya_reg_data_dir_trains_its_images_with_their_own_captions(base, tmp_path, monkeypatch):
    """kohya's --reg_data_dir: its images (a <repeats>_<class> folder, a sidecar caption) are trained beside each
    batch with their own captions, no trigger token, none generated; at --prior_loss_weight 0 the LoRA is the one
    trained without them, bit for bit."""
    reg = tmp_path / "reg"
    flat_images(reg / "1_dog", n=2, colour=(30, 30, 220))
    (reg / "1_dog" / "0.txt").write_text("a brown dog")
    before = sorted(p.name for p in (reg / "1_dog").iterdir())
    seen = []
    real = loop_module.condition
    monkeypatch.setattr(loop_module, "condition", lambda pipe, captions, *a, **k: (seen.extend(captions), real(pipe, captions, *a, **k))[1])
    settings = dict(mode="subject", token="sks", max_train_steps=3, save_precision="fp32")
    with_reg = train(config(base, tmp_path / "a", reg_data_dir=str(reg), **settings))
    assert {"a brown dog", "dog"} <= set(seen) and all("sks" in c for c in set(seen) - {"a brown dog", "dog"})
    assert sorted(p.name for p in (reg / "1_dog").iterdir()) == before
    plain = train(config(base, tmp_path / "b", **settings))
    unweighted = train(config(base, tmp_path / "c", reg_data_dir=str(reg), prior_loss_weight=0.0, **settings))
    a, b, c = (lora_tensors(r.lora_path) for r in (with_reg, plain, unweighted))
    assert all(torch.equal(b[k], c[k]) for k in b) and not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="give --reg_data_dir .* or --with_prior_preservation"):
        config(base, tmp_path, reg_data_dir=str(reg), with_prior_preservation=True, class_data_dir=str(reg),
               class_prompt="a dog").validate()
    monkeypatch.setattr(loop_module, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DataError, match="--reg_data_dir .*nowhere: no such folder"):
        train(config(base, tmp_path / "d", reg_data_dir=str(tmp_path / "nowhere"), **settings))


def test_kohyas_noise_offset_options_noise_as_kohya_does(tmp_path):
    """--noise_offset_random_strength, --adaptive_noise_scale and --ip_noise_gamma_random_strength: the UNet gets
    kohya's noisy latents (custom_train_functions.apply_noise_offset, get_noise_noisy_latents_and_timesteps written out
    below, the same draws in the same order)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 8, 8) + torch.tensor([0.5, -1.0, 0.0, 2.0])[None, :, None, None]
    seen = {}

    def unet(noisy, timesteps, states):
        seen["noisy"] = noisy
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    cfg = TrainConfig(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05, ip_noise_gamma=0.1,
                      ip_noise_gamma_random_strength=True)
    loop_module.diffusion_loss(unet, scheduler, latents, None, torch.Generator().manual_seed(3), cfg)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.rand(1, generator=g) * 0.1
    offset = torch.clamp(offset + 0.05 * torch.abs(latents.mean(dim=(2, 3), keepdim=True)), 0.0, None)
    noise = noise + offset * torch.randn((2, 4, 1, 1), generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    expect = scheduler.add_noise(latents, noise + strength * torch.randn(latents.shape, generator=g), timesteps)
    assert torch.equal(seen["noisy"], expect)
    with pytest.raises(ConfigError, match="--adaptive_noise_scale adds to --noise_offset"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", adaptive_noise_scale=0.1).validate()


def test_caption_prefix_and_suffix_frame_every_caption_and_a_warmup_share_warms_up(base, tmp_path, monkeypatch):
    """kohya's --caption_prefix / --caption_suffix: every caption trained on is framed by them; kohya's
    --lr_warmup_steps 0.5 warms up over half the run's steps (truncated, as kohya)."""
    seen = []
    real = loop_module.condition
    monkeypatch.setattr(loop_module, "condition", lambda pipe, captions, *a, **k: (seen.extend(captions), real(pipe, captions, *a, **k))[1])
    train(config(base, tmp_path, caption_prefix="masterpiece,", caption_suffix="(best)", max_train_steps=5,
                 lr_scheduler="constant_with_warmup", lr_warmup_ratio=0.5, learning_rate=1e-3))
    assert seen and all(c.startswith("masterpiece, ") and c.endswith(" (best)") and "<s>" in c for c in seen), seen
    lrs = [r["lr"] for r in outputs.read_log(tmp_path / "out" / "log.csv")]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])  # (int(0.5 x 5) = 2 warm-up steps)


def test_a_vae_file_or_folder_trains_as_a_model_with_that_vae(base, tmp_path):
    """kohya's --vae: an original-layout VAE file (a VAE alone) or a diffusers folder in place of the model's VAE
    trains the LoRA a model holding that VAE trains, bit for bit; what is not such a VAE is named."""
    from safetensors.torch import save_file

    from lora_diffusion.tools import to_ldm_checkpoint

    other = tiny_pipeline(5)
    vae_file = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in to_ldm_checkpoint(other).items()
               if k.startswith("first_stage_model.")}, vae_file)
    with_vae = tiny_pipeline(0)
    with_vae.vae = other.vae
    with_vae.save_pretrained(tmp_path / "model_with_vae")
    settings = dict(max_train_steps=1, save_precision="fp32")
    ref = lora_tensors(train(config(str(tmp_path / "model_with_vae"), tmp_path / "ref", **settings)).lora_path)
    for i, vae in enumerate((vae_file, tmp_path / "model_with_vae")):
        got = lora_tensors(train(config(base, tmp_path / f"run{i}", vae=str(vae), **settings)).lora_path)
        assert all(torch.equal(ref[k], got[k]) for k in ref), vae
    plain = lora_tensors(train(config(base, tmp_path / "plain", **settings)).lora_path)
    assert not all(torch.equal(ref[k], plain[k]) for k in ref)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, lora)
    with pytest.raises(ConfigError, match=r"--vae: VAE .*lora.safetensors: no VAE weights in the file"):
        train(config(base, tmp_path / "bad", vae=str(lora), **settings))
    with pytest.raises(ConfigError, match=r"--vae .*nowhere: no such file or folder"):
        train(config(base, tmp_path / "bad2", vae=str(tmp_path / "nowhere"), **settings))


def test_a_kohya_ss_gui_command_runs_as_pasted(base, tmp_path):
    """The command kohya_ss's GUI prints (its flags in --flag=value form, quoted values, buckets, sample prompts, epoch
    saves, optimizer arguments, a warm-up share) trains here as pasted and writes kohya's files."""
    import shlex

    from lora_diffusion.training.cli import main

    flat_images(tmp_path / "img" / "2_red thing", n=2)
    (tmp_path / "prompts.txt").write_text("a red thing --w 32 --h 32 --s 2 --d 1\n")
    command = (f'--enable_bucket --min_bucket_reso=16 --max_bucket_reso=64 --pretrained_model_name_or_path="{base}" '
               f'--train_data_dir="{tmp_path / "img"}" --resolution="32,32" --output_dir="{tmp_path / "model"}" '
               f'--logging_dir="{tmp_path / "log"}" --network_alpha="1" --save_model_as=safetensors --network_module=networks.lora '
               '--text_encoder_lr=5e-05 --unet_lr=0.0001 --network_dim=4 --output_name="last" --lr_scheduler_num_cycles="1" '
               '--no_half_vae --learning_rate="0.0001" --lr_scheduler="cosine" --lr_warmup_steps="0.1" --train_batch_size="1" '
               '--max_train_steps="8" --save_every_n_epochs="1" --save_last_n_epochs="1" --mixed_precision="no" '
               '--save_precision="fp16" --seed="42" --caption_extension=".txt" --cache_latents --cache_latents_to_disk '
               '--optimizer_type="AdamW" --optimizer_args "weight_decay=0.05" --max_data_loader_n_workers="0" '
               '--bucket_reso_steps=16 --xformers --bucket_no_upscale --noise_offset=0.05 --keep_tokens=1 --shuffle_caption '
               '--max_grad_norm=1 --persistent_data_loader_workers --flip_aug --min_snr_gamma=5 '
               f'--sample_sampler=euler_a --sample_prompts="{tmp_path / "prompts.txt"}" --sample_every_n_epochs="1"')
    assert main(shlex.split(command)) == 0
    out = tmp_path / "model"
    assert sorted(p.name for p in out.glob("last*.safetensors")) == ["last-000001.safetensors", "last.safetensors"]
    assert len(list((out / "sample").glob("last_e00000[12]_00_*_1.png"))) == 2  # (an epoch: 2 repeats x 2 images)
    meta = read_safetensors(out / "last.safetensors")[1]
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.05)" and meta["ss_network_dim"] == "4"


def test_the_text_encoders_lora_trains_alone(base, tmp_path):
    """--no-train_unet --train_text_encoder (kohya's --network_train_text_encoder_only): the file holds the text
    encoder's LoRA alone, which learned, and loads in stock diffusers."""
    from diffusers import StableDiffusionPipeline

    result = train(config(base, tmp_path, train_unet=False, train_text_encoder=True, max_train_steps=2, learning_rate=1e-2))
    tensors = lora_tensors(result.lora_path)
    assert tensors and all(k.startswith("text_encoder.") for k in tensors), sorted(tensors)[:3]
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    ids = pipe.tokenizer(["an image in the style of <s>"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(result.lora_path))
        assert not torch.allclose(pipe.text_encoder(ids)[0], before)  # (stock diffusers applies it)
    with pytest.raises(ConfigError, match="--no-train_unet trains the text encoder's LoRA alone: give --train_text_encoder"):
        config(base, tmp_path, train_unet=False).validate()


def test_base_weights_train_on_the_model_with_those_loras_fused_in(base, tmp_path):
    """kohya's --base_weights / --base_weights_multiplier: the LoRA trains on the model with those files fused in,
    bit for bit the LoRA trained on that model baked (``lora-diffusion bake``); a bad entry is named first."""
    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.testing import random_lora
    from lora_diffusion.tools import bake
    from lora_diffusion.training.cli import build_parser
    from lora_diffusion.training.config import config_from_args

    lora = tmp_path / "under.safetensors"
    write_lora_file(lora, random_lora(tiny_pipeline(0), seed=4, rank=2, std=0.3), dtype=torch.float32)
    bake(base, {str(lora): 0.7}, tmp_path / "baked")
    settings = dict(max_train_steps=2, save_precision="fp32", train_text_encoder=True)
    ref = lora_tensors(train(config(str(tmp_path / "baked"), tmp_path / "ref", **settings)).lora_path)
    got = lora_tensors(train(config(base, tmp_path / "got", base_weights=f"{lora}:0.7", **settings)).lora_path)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    plain = lora_tensors(train(config(base, tmp_path / "plain", **settings)).lora_path)
    assert not all(torch.equal(ref[k], plain[k]) for k in ref)
    args = build_parser().parse_args(["--pretrained_model_name_or_path", base, "--train_data_dir", "d", "--base_weights",
                                      str(lora), str(lora), "--base_weights_multiplier", "0.7", "0.2"])
    assert config_from_args(args).base_weights == f"{lora}:0.7\n{lora}:0.2"
    with pytest.raises(ConfigError, match=r"--base_weights .*nowhere.safetensors: no such file"):
        train(config(base, tmp_path / "bad", base_weights=str(tmp_path / "nowhere.safetensors"), **settings))

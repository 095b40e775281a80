"""The launched Gradio app, driven through ``gradio_client`` (and raw HTTP for auth): one app per module."""

from __future__ import annotations

import argparse
import re
import socket
import threading

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason="the UI needs gradio: pip install -e '.[ui]'")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from gradio_client import Client, handle_file  # noqa: E402

from ui.app import MAX_SLOTS, build_demo, launch  # noqa: E402
from ui.cli import add_arguments, launch_kwargs  # noqa: E402
from ui.handlers import Backend  # noqa: E402
from ui_support import SIZE, STEPS, free_port, make_foreign_lora, make_images, make_lora, pixels, tiny_model_dir  # noqa: E402


def cli_kwargs(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return launch_kwargs(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_app")
    lib = root / "loras"
    lib.mkdir()
    make_lora(lib / "style.safetensors", 1)
    make_lora(lib / "ink.safetensors", 2, rank=2)
    make_foreign_lora(lib / "foreign.safetensors")
    make_images(root / "data" / "squares", 3, corrupt=1)
    backend = Backend(tiny_model_dir(root / "model"), lib, root / "data")
    demo = build_demo(backend)
    assert backend._pipe is None  # building the app does no model work
    kwargs = cli_kwargs("--port", str(free_port()), "--lora-dir", str(lib))
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = launch(demo, **kwargs)
    client = Client(url, verbose=False)
    yield backend, url, client
    demo.close()


def generate(client, backend, blend: dict, prompt="a red circle", seed=0, extra=()):
    """Call /generate with the Generate tab's slots: ``blend`` = {name: (weight, te weight or None)}; ``extra``: the
    sampler, schedule type and A1111-syntax inputs after the slots."""
    names = backend.library.names()[:MAX_SLOTS]
    use = [n in blend for n in names] + [False] * (MAX_SLOTS - len(names))
    weights = [blend[n][0] if n in blend else 1.0 for n in names] + [1.0] * (MAX_SLOTS - len(names))
    te = [str(blend[n][1]) if n in blend and blend[n][1] is not None else "" for n in names] + [""] * (MAX_SLOTS - len(names))
    out = client.predict(prompt, "", "all blocks", False, seed, STEPS, 5.0, SIZE, SIZE, 1, *use, *weights, *te, *extra,
                         api_name="/generate")
    gallery, info, snippet = out[0], out[-2], out[-1]
    return pixels(gallery[0]["image"]), gallery[0]["caption"], info, snippet


def test_sampler_prompt_syntax_hires_and_img2img_come_after_the_slots(served, tmp_path):
    from PIL import Image

    backend, _, client = served
    own, caption, _, _ = generate(client, backend, {}, prompt="a (red:1.5) circle")
    euler, caption, _, snippet = generate(client, backend, {}, prompt="a (red:1.5) circle", extra=("Euler a", "Automatic", True))
    assert "Euler a" in caption and "EulerAncestralDiscreteScheduler" in snippet and np.abs(own - euler).mean() > 1.0
    literal, _, _, snippet = generate(client, backend, {}, prompt="a (red:1.5) circle", extra=("the model's own", "Automatic", False))
    assert np.abs(own - literal).mean() > 1.0 and "scheduled_prompt_kwargs" not in snippet
    hires, caption, _, snippet = generate(client, backend, {}, prompt="a (red:1.5) circle",
                                          extra=("the model's own", "Automatic", True, 1.5, "Lanczos", 2, 0.6))
    assert hires.shape[:2] == (48, 48) and "hires 48x48 (Lanczos 1.5x, 2 steps, denoise 0.6)" in caption
    assert "StableDiffusionImg2ImgPipeline" in snippet
    guided, _, info, snippet = generate(client, backend, {}, prompt="a (red:1.5) circle", extra=(  # (the last input)
        "the model's own", "Automatic", True, 1.5, "Lanczos", 2, 0.6, None, 1, "Nothing", "", "Nothing", "", None, 4,
        False, 32, "original", "Inpaint masked", "Nothing", "", 0, 0.0, 2.5, "Zero Terminal SNR"))
    assert "Zero Terminal SNR, hires 48x48 (Lanczos 1.5x, 2 steps, denoise 0.6, cfg 2.5)" in info and "guidance_scale=2.5" in snippet
    assert "pipe.scheduler = zero_terminal_snr(pipe.scheduler)" in snippet
    assert not np.array_equal(guided, hires)  # (the second pass guided otherwise; exact: test_ui_handlers)
    sampled, _, info, snippet = generate(client, backend, {}, prompt="a (red:1.5) circle", extra=(  # (the last inputs)
        "the model's own", "Automatic", True, 1.5, "Lanczos", 4, 0.6, None, 1, "Nothing", "", "Nothing", "", None, 4,
        False, 32, "original", "Inpaint masked", "Nothing", "", 0, 0.0, 2.5, "Zero Terminal SNR", "Euler a", "Use same",
        "a blue square", "", 48, 40))
    assert "hires sampler Euler a Automatic, hires prompt" in info and "img2img.scheduler = hires_scheduler" in snippet
    assert sampled.shape[:2] == (40, 48) and "hires 48x40 (Lanczos to 48x40, 4 steps" in info
    assert "texts_hires = scheduled_prompt_kwargs(pipe, \"a blue square\"" in snippet and not np.array_equal(sampled, guided)
    start = tmp_path / "start.png"
    Image.fromarray(own.astype(np.uint8)).save(start)
    moved, caption, _, snippet = generate(client, backend, {}, prompt="a blue square", extra=(
        "the model's own", "Automatic", True, 1, "Latent", 0, 0.5, handle_file(str(start))))
    assert moved.shape[:2] == (SIZE, SIZE) and "img2img, denoise 0.5" in caption and "init = Image.open(" in snippet
    mask = tmp_path / "mask.png"
    Image.new("L", (SIZE, SIZE), 255).save(mask)  # (inpainting after the X/Y plot's inputs)
    patched, caption, _, snippet = generate(client, backend, {}, prompt="a blue square", extra=(
        "the model's own", "Automatic", True, 1, "Latent", 0, 0.5, handle_file(str(start)), 1, "Nothing", "", "Nothing", "",
        handle_file(str(mask)), 3))
    assert "inpaint, denoise 0.5, mask blur 3" in caption and "StableDiffusionInpaintPipeline" in snippet
    filled, caption, _, snippet = generate(client, backend, {}, prompt="a blue square", extra=(  # (then its settings)
        "the model's own", "Automatic", True, 1, "Latent", 0, 0.5, handle_file(str(start)), 1, "Nothing", "", "Nothing", "",
        handle_file(str(mask)), 3, False, 32, "fill", "Inpaint not masked"))
    assert "mask blur 3, inpaint not masked, masked content fill" in caption and "masked_content='fill'" in snippet
    assert np.abs(filled - patched).mean() > 1.0


def test_batch_count_makes_one_image_per_seed_in_order(served):
    backend, _, client = served
    slots = [False] * MAX_SLOTS + [1.0] * MAX_SLOTS + [""] * MAX_SLOTS
    out = client.predict("a red circle", "", "all blocks", False, 5, STEPS, 5.0, SIZE, SIZE, 1, *slots,
                         "the model's own", "Automatic", True, 1, "Latent", 0, 0.7, None, 3, api_name="/generate")
    gallery = out[0]
    assert [g["caption"].split("| seed ")[1].split(",")[0] for g in gallery[:3]] == ["5", "6", "7"]
    assert len({pixels(g["image"]).tobytes() for g in gallery[:3]}) == 3
    for i, seed in enumerate((5, 6, 7)):  # each the image one click with that seed makes
        assert np.array_equal(pixels(gallery[i]["image"]), generate(client, backend, {}, seed=seed)[0])
    with pytest.raises(Exception, match="17 is greater than maximum value 16"):  # (the slider's own check)
        client.predict("a red circle", "", "all blocks", False, 5, STEPS, 5.0, SIZE, SIZE, 1, *slots,
                       "the model's own", "Automatic", True, 1, "Latent", 0, 0.7, None, 17, api_name="/generate")


def test_an_xy_plot_shows_its_grid_then_each_cell_as_one_click_makes_it(served):
    """A1111's X/Y plot on the Generate tab: Prompt S/R over a LoRA tag by seeds; each cell equals the image one
    click with its prompt and seed makes; the grid holds them, row by row, under its labels."""
    backend, _, client = served
    slots = [False] * MAX_SLOTS + [1.0] * MAX_SLOTS + [""] * MAX_SLOTS
    after = ("the model's own", "Automatic", True, 1, "Latent", 0, 0.7, None, 1)
    out = client.predict("a red circle <lora:style:1>", "", "all blocks", False, 5, STEPS, 5.0, SIZE, SIZE, 1, *slots, *after,
                         "Prompt S/R", "<lora:style:1>, <lora:style:0>", "Seed", "5, 6", api_name="/generate")
    gallery = out[0]
    assert gallery[0]["caption"] == "X/Y plot, 2 Prompt S/R by 2 Seed"
    cells = [pixels(g["image"]) for g in gallery[1:5]]
    for cell, (weight, seed) in zip(cells, [(1, 5), (0, 5), (1, 6), (0, 6)]):  # row by row
        assert np.array_equal(cell, generate(client, backend, {}, prompt=f"a red circle <lora:style:{weight}>", seed=seed)[0])
    assert not np.array_equal(cells[0], cells[1])  # the weight shows
    grid = pixels(gallery[0]["image"])
    top, left = grid.shape[0] - 2 * SIZE, grid.shape[1] - 2 * SIZE
    assert top > 0 and left > 0 and np.array_equal(grid[top + SIZE:, left + SIZE:], cells[3])
    # a Z axis (after the mask's inputs): one X/Y grid per value, side by side; its cells grid after grid
    out = client.predict("a red circle <lora:style:1>", "", "all blocks", False, 5, STEPS, 5.0, SIZE, SIZE, 1, *slots, *after,
                         "Seed", "5, 6", "Nothing", "", None, 4, False, 32, "original", "Inpaint masked",
                         "Prompt S/R", "<lora:style:1>, <lora:style:0>", api_name="/generate")
    gallery = out[0]
    assert gallery[0]["caption"] == "X/Y/Z plot, 2 Seed by 2 Prompt S/R"
    assert [pixels(g["image"]).tobytes() for g in gallery[1:5]] == [cells[i].tobytes() for i in (0, 2, 1, 3)]
    grid = pixels(gallery[0]["image"])
    assert grid.shape[1] == 2 * 2 * SIZE and np.array_equal(grid[-SIZE:, -SIZE:], cells[3])
    for x, y, message in (("Prompt S/R", "<lora:ink:1>, <lora:ink:0>", "Prompt S/R did not find '<lora:ink:1>'"),
                          ("Steps", "1-100", "X/Y plot: 100 images; at most 64"),
                          ("Checkpoint name", "a, b", "Checkpoint name is not in the list of choices")):  # (the CLI's)
        with pytest.raises(Exception, match=message):
            client.predict("a red circle <lora:style:1>", "", "all blocks", False, 5, STEPS, 5.0, SIZE, SIZE, 1, *slots, *after,
                           x, y, "Nothing", "", api_name="/generate")


def test_png_info_fills_the_generate_inputs(served, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    _, _, client = served
    info = PngInfo()
    info.add_text("parameters", "a (red:1.2) fox <lora:style:0.5>\nNegative prompt: ugly\nSteps: 12, Sampler: DPM++ 2M Karras, "
                                "CFG scale: 6.5, Seed: 42, Size: 40x48, Clip skip: 2")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    out = client.predict(handle_file(str(tmp_path / "a.png")), api_name="/png_info")
    assert list(out)[:16] == ["a (red:1.2) fox <lora:style:0.5>", "ugly", 42, 12, 6.5, 40, 48, 2, "DPM++ 2M", "Karras", True,
                              1.0, "Latent", 0, 0.7, "settings taken"]
    info = PngInfo()  # an inpainting's settings go to its inputs too
    info.add_text("parameters", "a fox\nSteps: 12, Seed: 42, Size: 40x48, Denoising strength: 0.6, Mask mode: Inpaint not "
                                "masked, Mask blur: 2, Inpaint area: Only masked, Masked area padding: 16, Masked content: "
                                "latent noise")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png", pnginfo=info)
    out = client.predict(handle_file(str(tmp_path / "b.png")), api_name="/png_info")
    assert out[14] == 0.6 and "it was inpainted" in out[15]
    assert list(out)[16:21] == [2, True, 16, "latent noise", "Inpaint not masked"]
    assert list(out)[21:27] == ["Nothing", "", "Nothing", "", "Nothing", ""]  # (not a grid: Generate makes one image)
    assert list(out)[27:] == [0, 0.0, 0.0, "Default", "Use same", "Use same", "", "", 0, 0]  # (none of the variation
    # seed, Hires CFG Scale, Noise Schedule, Hires sampler, schedule type, prompt, negative prompt and resize)
    info = PngInfo()  # an X/Y/Z grid's axes go to the plot's inputs
    info.add_text("parameters", 'a fox\nSteps: 12, Seed: 42, Size: 40x48, Script: X/Y/Z plot, X Type: Seed, X Values: '
                                '"1, -1", Fixed X Values: "1, 77", Z Type: Checkpoint name, Z Values: "a, b", '
                                'Variation seed: 9, Variation seed strength: 0.25, Hires CFG Scale: 4, '
                                'Noise Schedule: Zero Terminal SNR, Hires sampler: DPM++ 2M Karras, Hires prompt: "a cat, '
                                'tall", Hires negative prompt: dark, Hires resize: 64x48')
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png", pnginfo=info)
    out = client.predict(handle_file(str(tmp_path / "c.png")), api_name="/png_info")
    assert list(out)[21:] == ["Seed", "1, 77", "Nothing", "", "Nothing", "", 9, 0.25, 4.0, "Zero Terminal SNR", "DPM++ 2M",
                              "Karras", "a cat, tall", "dark", 64, 48]
    assert "Z type 'Checkpoint name' is not one of the UI's: that axis is left out" in out[15]


def test_binds_to_loopback_only(served):
    _, url, _ = served
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    assert host == "127.0.0.1"
    socket.create_connection((host, int(port)), timeout=2).close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this machine's outward address (nothing is sent)
        try:
            s.connect(("10.255.255.255", 1))
            outward = s.getsockname()[0]
        except OSError:
            outward = "127.0.0.1"
    if outward.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to check against")
    with pytest.raises(OSError):
        socket.create_connection((outward, int(port)), timeout=2).close()


def test_generate_with_two_loras_follows_the_weights(served):
    backend, _, client = served
    a, caption_a, info, snippet = generate(client, backend, {"style": (1.0, None), "ink": (0.5, None)})
    b, caption_b, _, _ = generate(client, backend, {"style": (1.0, None), "ink": (-1.0, 0.0)})
    again, _, _, _ = generate(client, backend, {"style": (1.0, None), "ink": (0.5, None)})
    base, caption_base, _, _ = generate(client, backend, {})
    assert caption_a.startswith("ink 0.5 + style 1 |") and caption_b.startswith("ink -1 (te 0) + style 1 |")
    assert caption_base.startswith("no LoRA")
    assert "ink 0.5 + style 1" in info
    assert 'adapter_name="style"' in snippet and "set_adapters(['ink', 'style'], adapter_weights=[0.5, 1.0])" in snippet
    assert np.array_equal(a, again)
    assert np.abs(a - b).mean() > 1.0 and np.abs(a - base).mean() > 1.0
    # A1111 tags in the prompt do the same as the sliders
    tagged, _, _, _ = generate(client, backend, {}, prompt="a red circle <lora:style:1> <lora:ink:0.5>")
    assert np.array_equal(tagged, a)


def test_a_lora_for_another_model_shows_the_loaders_message(served):
    backend, _, client = served
    with pytest.raises(Exception) as err:
        generate(client, backend, {"foreign": (1.0, None)})
    msg = str(err.value)
    assert "match no layer" in msg and "SD 1.x" in msg and "Traceback" not in msg


def test_upload_and_delete_through_the_app(served, tmp_path):
    backend, _, client = served
    good = make_lora(tmp_path / "fresh.safetensors", 7)
    msg = client.predict(handle_file(str(good)), "", api_name="/upload_lora")
    assert "added **fresh**" in msg and "fresh" in backend.library.names()
    with pytest.raises(Exception, match="invalid LoRA name"):
        client.predict(handle_file(str(good)), "../../escaped", api_name="/upload_lora")
    with pytest.raises(Exception, match="already exists"):
        client.predict(handle_file(str(good)), "", api_name="/upload_lora")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(Exception):
        client.predict(handle_file(str(ckpt)), "", api_name="/upload_lora")
    assert not list(tmp_path.parent.glob("escaped*")) and sorted(backend.library.names()) == ["foreign", "fresh", "ink", "style"]
    assert "deleted **fresh**" in client.predict("fresh", api_name="/delete_lora")
    assert "fresh" not in backend.library.names()


def test_oversize_uploads_are_refused(tmp_path):
    backend = Backend(None, tmp_path / "loras", max_upload_mb=0.01)
    demo = build_demo(backend)
    kwargs = cli_kwargs("--port", str(free_port()), "--max-upload-mb", "0.01")
    _, url, _ = launch(demo, prevent_thread_lock=True, quiet=True, **kwargs)
    try:
        big = make_lora(tmp_path / "big.safetensors", 3)  # ~40 kB
        with pytest.raises(Exception) as err:
            Client(url, verbose=False).predict(handle_file(str(big)), "", api_name="/upload_lora")
        assert "big" not in backend.library.names()
        assert "limit" in str(err.value).lower() or "large" in str(err.value).lower() or "size" in str(err.value).lower()
    finally:
        demo.close()


def test_two_clients_generating_at_once_each_get_their_own_blend(served):
    backend, url, _ = served
    blends = [{"style": (1.5, None)}, {"ink": (1.5, 0.0), "style": (-0.5, None)}]
    clients = [Client(url, verbose=False) for _ in blends]
    reference = [generate(clients[0], backend, b, seed=5)[0] for b in blends]
    assert not np.array_equal(reference[0], reference[1])
    results: list[list] = [[], []]
    errors = []

    def run(i):
        try:
            for _ in range(3):
                results[i].append(generate(clients[i], backend, blends[i], seed=5)[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 3 and all(np.array_equal(r, reference[i]) for r in results[i])


def test_merge_two_loras_into_a_new_file(served):
    backend, _, client = served
    table = {"headers": ["use", "LoRA", "weight"], "data": [[True, "style", 0.7], [True, "ink", 0.5], [False, "foreign", 1.0]]}
    report, file = client.predict(table, "svd", 4, "diffusers", "merged_svd", api_name="/merge")
    assert "merged_svd" in backend.library.names() and "merged_svd" in report
    assert "error" in report.lower()
    assert file and file.endswith(".safetensors")
    report, _ = client.predict(table, "concat", 0, "kohya", "merged_kohya", api_name="/merge")
    assert backend.library.info("merged_kohya").format == "kohya"
    img, caption, _, _ = generate(client, backend, {"merged_svd": (1.0, None)})
    assert caption.startswith("merged_svd 1")


def test_train_a_few_steps_then_use_the_lora(served, tmp_path):
    backend, _, client = served
    images = make_images(tmp_path / "up", 3, corrupt=1)
    table = {"headers": ["file", "caption"], "data": [[p.name, "a square"] for p in images]}
    out = client.predict([handle_file(str(p)) for p in images], None, table, "trained", "style", "", 2, 3, 1e-3, 5e-5,
                         False, True, SIZE, "", 0, "kohya", 2, True, 1, 0.0,  # (DoRA: its file loads as the exact dense change)
                         None, "full", 1, 0.5,  # LoCon, its 3x3 convolutions at their own rank and alpha
                         0.05, 4, 5.0, "huber", 0.5,  # kohya's noise and loss options, a validation split
                         150, True, api_name="/train")  # long captions, debiased estimation
    progress, status = out[0], out[1]
    assert '<progress value="3" max="3"' in progress
    assert "done" in status and "broken0.png" in status, status
    assert "trained" in backend.library.names()
    from lora_diffusion.formats import read_lora_file

    lora, header = read_lora_file(backend.library.path_for("trained"))
    assert lora and all(w.magnitude is not None for w in lora.values())  # the DoRA switch reached the training
    conv = {k for k, w in lora.items() if w.A.dim() == 4 and w.A.shape[-1] == 3}
    assert conv and {(w.rank, w.alpha) for k, w in lora.items() if k in conv} == {(1, 0.5)}
    assert {(w.rank, w.alpha) for k, w in lora.items() if k not in conv} == {(2, 2.0)} and any("ff.net" in k for k in lora)
    # so did the format: kohya names, DoRA as LyCORIS writes it (dora_scale), A1111's alias
    assert header["_format"] == "lycoris" and header["ss_network_module"] == "lycoris.kohya"
    assert header["ss_output_name"] == "trained"
    assert (header["ss_clip_skip"], header["ss_shuffle_caption"], header["ss_keep_tokens"]) == ("2", "True", "1")  # kohya options
    assert (header["ss_noise_offset"], header["ss_multires_noise_iterations"], header["ss_min_snr_gamma"],
            header["ss_loss_type"], header["ss_validation_split"]) == ("0.05", "4", "5.0", "huber", "0.5")
    assert (header["ss_max_token_length"], header["ss_debiased_estimation"]) == ("150", "True")
    job = max(backend.queue.jobs.values(), key=lambda j: j.id)  # the loss plot's validation series
    assert [s for s, _ in job.val_losses] == [1, 2, 3] and header["ss_num_train_images"] == "1"  # (1 of the 2 readable held out)
    img, caption, _, _ = generate(client, backend, {"trained": (1.0, None)})
    assert caption.startswith("trained 1")
    # continue training it (at learning rate 0: the same factors, ranks and DoRA magnitudes come out)
    out = client.predict([handle_file(str(p)) for p in images[:1]], None, table, "trained_more", "style", "", 8, 1, 0.0, 0.0,
                         False, False, SIZE, "", 0, "kohya", 1, False, 0, 0.0, "trained", api_name="/train")
    assert "done" in out[1], out[1]
    more, _ = read_lora_file(backend.library.path_for("trained_more"))
    assert more.keys() == lora.keys() and all(
        torch.equal(more[k].A, w.A) and torch.equal(more[k].B, w.B) and torch.equal(more[k].magnitude, w.magnitude)
        for k, w in lora.items())


def test_empty_or_non_number_boxes_show_a_message(served, tmp_path):
    backend, _, client = served
    images = make_images(tmp_path / "up", 1)
    table = {"headers": ["file", "caption"], "data": [[images[0].name, "a square"]]}
    for lr, te_lr, message in ((None, 5e-5, "the learning rate is empty"), (1e-4, None, "text-encoder learning rate is empty")):
        with pytest.raises(Exception, match=message):
            client.predict([handle_file(str(images[0]))], None, table, "never", "style", "", 2, 3, lr, te_lr,
                           False, False, SIZE, "", 0, "diffusers", 1, False, 0, 0.0, api_name="/train")
    with pytest.raises(Exception, match="the rank is empty"):  # (it silently became 4)
        client.predict([handle_file(str(images[0]))], None, table, "never", "style", "", None, 3, 1e-4, 5e-5,
                       False, False, SIZE, "", 0, "diffusers", 1, False, 0, 0.0, api_name="/train")
    assert "never" not in backend.library.names() and not backend.queue.active_names()
    merge_table = {"headers": ["use", "LoRA", "weight"], "data": [[True, "style", "abc"], [True, "ink", 0.5]]}
    with pytest.raises(Exception, match="the weight of style must be a number, got 'abc'"):
        client.predict(merge_table, "concat", 0, "diffusers", "never_merged", api_name="/merge")
    assert "never_merged" not in backend.library.names()


def test_auth_protects_every_route(tmp_path):
    backend = Backend(tiny_model_dir(tmp_path / "model"), tmp_path / "loras")
    make_lora(tmp_path / "loras" / "style.safetensors", 1)
    demo = build_demo(backend)
    app, url, _ = launch(demo, prevent_thread_lock=True, quiet=True,
                         **cli_kwargs("--port", str(free_port()), "--auth", "alice:s3cret:x"))
    public = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt",
              "/manifest.json",
              "/gradio_api/startup-events"}  # loopback only: gradio's launch calls it on itself
    try:
        routes = []
        for r in app.router.routes:
            for c in getattr(r, "_effective_candidates", None) or [r]:
                methods = getattr(getattr(c, "original_route", c), "methods", None) or {"GET"}
                routes += [(getattr(c, "path", ""), m) for m in methods if m != "HEAD"]
        assert len(routes) > 40
        anon = httpx.Client(base_url=url, timeout=5)
        checked = 0
        for path, method in routes:
            if path in public or path.startswith(("/assets/", "/static/", "/svelte/", "/pwa_icon")):
                continue
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            with anon.stream(method, concrete) as resp:
                assert resp.status_code == 401, (method, path, resp.status_code)
            checked += 1
        assert checked > 40
        assert anon.get("/config").status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
        client = Client(url, auth=("alice", "s3cret:x"), verbose=False)
        out = client.predict("ok", "", "all blocks", False, 0, 1, 1.0, SIZE, SIZE, 1, True, *[False] * (MAX_SLOTS - 1),
                             *[1.0] * MAX_SLOTS, *[""] * MAX_SLOTS, api_name="/generate")
        assert out[0][0]["caption"].startswith("style 1")
    finally:
        demo.close()


def test_python_dash_m_ui_serves_on_loopback(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "ui", "--port", str(port), "--lora-dir", str(tmp_path / "loras")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        else:
            pytest.fail("python -m ui did not start within 60 s")
        assert (tmp_path / "loras").is_dir()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}" in out and "gradio.live" not in out


def test_a_row_whose_lora_changes_starts_unticked_and_the_lora_folder_is_served(tmp_path, monkeypatch):
    """After a delete (or an upload that sorts first), the LoRA in a Generate row changes: its tick and weights
    must not carry over to the new LoRA. And gradio serves the library's files wherever --lora-dir is."""
    lib = tmp_path / "loras"
    lib.mkdir()
    for name, seed in (("b", 1), ("c", 2)):
        make_lora(lib / f"{name}.safetensors", seed)
    demo = build_demo(Backend(tiny_model_dir(tmp_path / "model"), lib))
    refresh = next(f.fn for f in demo.fns.values() if f.api_name == "library")
    explicit = lambda update: update._constructor_args[0] if hasattr(update, "_constructor_args") else update  # noqa: E731
    out = refresh(["a", "c"])  # row 0 held "a" (now deleted: "b" moves in), row 1 still "c"
    assert out[0] == ["b", "c"]
    box0, box1 = (explicit(out[2 + MAX_SLOTS + i]) for i in (0, 1))
    slider0, slider1 = (explicit(out[2 + 2 * MAX_SLOTS + i]) for i in (0, 1))
    assert box0 == {"label": "b", "value": False} and box1 == {"label": "c"}
    assert slider0 == {"value": 1.0} and slider1 == {"__type__": "update"}
    seen = {}
    monkeypatch.setattr(type(demo), "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setattr(type(demo), "queue", lambda self, **kw: self)
    launch(demo, server_port=free_port())
    assert seen["allowed_paths"] == [str(lib.resolve())]

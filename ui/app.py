"""The Gradio app: ``build_demo(backend) -> gr.Blocks``. Widgets and wiring only; the work is in ``ui.handlers``.

Nothing here loads a model: the backend loads it on the first generation.

Example:
    >>> from ui.handlers import Backend
    >>> demo = build_demo(Backend(lora_dir="loras"))
    >>> demo.queue().launch(server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_diffusion.formats import LoraFormatError
from lora_diffusion.generate import (HIRES_UPSCALERS, MASKED_CONTENT, MAX_MASK_BLUR, MAX_MASKED_PADDING, NOISE_SCHEDULES,
                                     SAMPLERS, SCHEDULE_TYPES)

from .handlers import (BLOCK_PRESETS, PLOT_AXES, Backend, GenerateRequest, TrainRequest, finite_number, job_status,
                       png_info)
from .library import TABLE_HEADERS, UIError

logger = logging.getLogger(__name__)

__all__ = ["build_demo", "launch", "LoginRequired", "MAX_SLOTS"]

MAX_SLOTS = 8  # LoRA rows on the Generate tab; more can be used through <lora:name:w> tags
HISTORY = 24  # images kept in a session's gallery
MAX_BATCH = 16  # images one Generate click makes (A1111's batch count)
POLL_S = 0.5
TRAIN_LAYERS = [("attention (q, k, v, out)", "attn"), ("attention + MLP (kohya's LoRA)", "attn-mlp"),
                ("LoCon: + ResNet convolutions", "full")]  # the Train tab's choice of --target_modules presets


def _user_errors(fn):
    """Show ``UIError``/``LoraFormatError`` messages in the UI (a toast) instead of a generic error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UIError, LoraFormatError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


def _positional_signature(names: list[str], defaults: dict) -> inspect.Signature:
    """A signature of positional parameters ``names`` then ``defaults``' (with their defaults), for gradio to read
    from a function that takes ``*args``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind) for n in names] +
                             [inspect.Parameter(n, kind, default=d) for n, d in defaults.items()])


def _file_path(f) -> str:
    return f if isinstance(f, str) else getattr(f, "name", None) or f["path"]


def _rows(table) -> list[list]:
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        return table.values.tolist()
    if isinstance(table, dict):
        return table.get("data") or []
    return list(table)


MODEL_SAMPLER = "the model's own"  # the sampler choice that keeps the model's scheduler
SAME = "Use same"  # A1111's hires sampler / schedule type choice: the first pass's
NO_AXIS = "Nothing"  # an X/Y plot axis left out (A1111's name)
MASK_MODES = ("Inpaint masked", "Inpaint not masked")  # A1111's Mask mode (the second: the mask inverted)


def build_demo(backend: Backend, *, max_slots: int = MAX_SLOTS) -> gr.Blocks:
    """The four-tab app (Generate, Train, Merge, Library) over ``backend``."""
    with gr.Blocks(title="lora-diffusion") as demo:
        gr.Markdown(f"## lora-diffusion &nbsp;·&nbsp; model `{backend.model_label}` &nbsp;·&nbsp; library `{backend.library_label}`")
        slot_names = gr.State([])
        history = gr.State([])
        job_id = gr.State(None)

        # ------------------------------------------------------------------ Generate
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value="a red circle", elem_id="prompt",
                                        placeholder="a red circle <lora:name:0.8>  (A1111 tags work)")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    no_loras = gr.Markdown("*The library is empty: train, merge or upload a LoRA.*", visible=True)
                    slot_rows, checks, weights, te_weights = [], [], [], []
                    for i in range(max_slots):
                        with gr.Row(visible=False, equal_height=True) as row:
                            checks.append(gr.Checkbox(label=f"LoRA {i}", value=False, elem_id=f"lora-use-{i}", min_width=120))
                            weights.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", elem_id=f"lora-weight-{i}", scale=3))
                            te_weights.append(gr.Textbox(value="", label="text-encoder weight", placeholder="same",
                                                         elem_id=f"lora-te-{i}", min_width=100, scale=1))
                        slot_rows.append(row)
                    with gr.Row():
                        preset = gr.Dropdown(list(BLOCK_PRESETS), value="all blocks", label="Per-block preset (UNet)")
                        fuse = gr.Checkbox(False, label="Fuse (bake the blend into the weights while generating)")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0)
                        batch_count = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch count (seed, seed + 1, ...)")
                    with gr.Accordion("Variation seed (A1111's Extra): the starting noise part of the way to another seed's",
                                      open=False):
                        with gr.Row():
                            subseed = gr.Number(0, label="Variation seed", precision=0)
                            subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength (0: off)")
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance")
                    with gr.Row():
                        width = gr.Number(0, label="Width (0: model default)", precision=0)
                        height = gr.Number(0, label="Height (0: model default)", precision=0)
                        gen_clip_skip = gr.Number(1, label="CLIP skip (A1111's; 2 for anime SD 1.x models)", precision=0)
                    with gr.Row():
                        sampler = gr.Dropdown([MODEL_SAMPLER, *SAMPLERS], value=MODEL_SAMPLER, label="Sampler (A1111's names)",
                                              elem_id="sampler")
                        schedule = gr.Dropdown(list(SCHEDULE_TYPES), value="Automatic", label="Schedule type")
                        noise_schedule = gr.Dropdown(list(NOISE_SCHEDULES), value="Default", label="Noise schedule "
                                                     "(A1111's; Zero Terminal SNR for models trained with it)")
                        emphasis = gr.Checkbox(True, label="A1111 prompt syntax: (word:1.2), [word], long prompts, BREAK")
                    with gr.Accordion("Hires. fix (A1111's): upscale, then denoise again", open=False):
                        with gr.Row():
                            hr_scale = gr.Slider(1, 4, value=1, step=0.05, label="Upscale by (1 and no resize: off)", elem_id="hr-scale")
                            hr_upscaler = gr.Dropdown(list(HIRES_UPSCALERS), value="Latent", label="Upscaler")
                        with gr.Row():  # (A1111's: the upscale covers the size, its middle kept)
                            hr_resize_x = gr.Number(0, label="Resize width to (0: by Upscale by)", precision=0)
                            hr_resize_y = gr.Number(0, label="Resize height to (0: by Upscale by)", precision=0)
                        with gr.Row():
                            hr_steps = gr.Slider(0, 100, value=0, step=1, label="Hires steps (0: as many as Steps)")
                            hr_cfg = gr.Slider(0, 30, value=0, step=0.5, label="Hires CFG Scale (0: as Guidance)")
                        with gr.Row():
                            hr_sampler = gr.Dropdown([SAME, *SAMPLERS], value=SAME, label="Hires sampling method")
                            hr_schedule = gr.Dropdown([SAME, *SCHEDULE_TYPES], value=SAME, label="Hires schedule type")
                        with gr.Row():
                            hr_prompt = gr.Textbox(label="Hires prompt (empty: the prompt)", lines=1, elem_id="hr-prompt")
                            hr_negative = gr.Textbox(label="Hires negative prompt (empty: the negative prompt)", lines=1)
                    with gr.Accordion("img2img: start from an image", open=False):
                        with gr.Row():
                            init_image = gr.Image(type="filepath", label="Init image (resized to Width x Height; 0: its own size)",
                                                  elem_id="init-image", sources=["upload", "clipboard"], height=200)
                            mask_image = gr.Image(type="filepath", label="Inpaint mask (white: repaint; blank: img2img)",
                                                  elem_id="mask-image", sources=["upload", "clipboard"], height=200)
                        with gr.Row():
                            mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur (px)")
                            only_masked = gr.Checkbox(False, label="Only masked (A1111's inpaint area: the mask's surroundings at full size)")
                            masked_padding = gr.Slider(0, MAX_MASKED_PADDING, value=32, step=4, label="Only masked padding (px)")
                        with gr.Row():
                            masked_content = gr.Radio(list(MASKED_CONTENT), value="original", label="Masked content")
                            mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode")
                    denoise = gr.Slider(0.01, 1, value=0.7, step=0.01, label="Denoising strength (Hires. fix and img2img)")
                    with gr.Accordion("X/Y/Z plot (A1111's): one image per combination of values, in a labelled grid",
                                      open=False):
                        with gr.Row():
                            x_type = gr.Dropdown([NO_AXIS, *PLOT_AXES], value=NO_AXIS, label="X type", scale=1)
                            x_values = gr.Textbox(label="X values", placeholder="<lora:style:1>, <lora:style:0.5>  or  1-4 (+1)",
                                                  elem_id="x-values", scale=3)
                        with gr.Row():
                            y_type = gr.Dropdown([NO_AXIS, *PLOT_AXES], value=NO_AXIS, label="Y type", scale=1)
                            y_values = gr.Textbox(label="Y values", placeholder="1, 2, 3  or  5-9 [3]", elem_id="y-values", scale=3)
                        with gr.Row():  # (one X/Y grid per Z value, side by side)
                            z_type = gr.Dropdown([NO_AXIS, *PLOT_AXES], value=NO_AXIS, label="Z type", scale=1)
                            z_values = gr.Textbox(label="Z values", placeholder="Euler a, DPM++ 2M", elem_id="z-values", scale=3)
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Images", elem_id="gallery", format="png", columns=3, height=420,
                                         object_fit="contain")
                    image_info = gr.Markdown(elem_id="image-info")
                    snippet = gr.Code(language="python", label="diffusers code that reproduces the selected image",
                                      elem_id="snippet", buttons=["copy"], wrap_lines=True)
                    with gr.Accordion("PNG Info: settings from an A1111 / Civitai image", open=False):
                        png_file = gr.File(file_types=["image"], label="An image with A1111's infotext", elem_id="png-info")
                        png_note = gr.Markdown()

        # ------------------------------------------------------------------ Train
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column():
                    train_files = gr.File(file_count="multiple", file_types=["image"], label="Training images",
                                          elem_id="train-files")
                    folder = gr.Dropdown(choices=[], value=None, label="…or a folder under --data-root",
                                         visible=backend.data_root is not None, allow_custom_value=False)
                    captions = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], column_count=2,
                                            interactive=True, type="array", static_columns=[0], label="Captions (editable)")
                with gr.Column():
                    with gr.Row():
                        train_name = gr.Textbox(label="LoRA name", placeholder="my_style")
                        mode = gr.Radio(["style", "subject"], value="style", label="Mode")
                        token = gr.Textbox(label="Trigger word", placeholder="<s1> or sks")
                    with gr.Row():
                        rank = gr.Number(4, label="Rank", precision=0)
                        max_steps = gr.Number(200, label="Steps", precision=0)
                        lr = gr.Number(1e-4, label="Learning rate")
                        te_lr = gr.Number(5e-5, label="Text-encoder learning rate")
                    with gr.Row():
                        train_te = gr.Checkbox(False, label="Train the text encoder")
                        use_dora = gr.Checkbox(False, label="DoRA (also a magnitude per output row)")
                        resolution = gr.Number(0, label="Resolution (0: the model's own)", precision=0)
                        train_seed = gr.Number(0, label="Seed", precision=0)
                    with gr.Row():
                        val_prompt = gr.Textbox(label="Validation prompt (samples while training)", scale=3)
                        train_format = gr.Radio(["diffusers", "kohya"], value="diffusers", scale=2,
                                                label="Save as (kohya: also loads in A1111 and ComfyUI)")
                    with gr.Accordion("kohya options", open=False):
                        with gr.Row():
                            clip_skip = gr.Number(1, label="CLIP skip (2: models trained so, e.g. anime SD 1.x)", precision=0)
                            shuffle_caption = gr.Checkbox(False, label="Shuffle caption tags")
                            keep_tokens = gr.Number(0, label="Keep first N tags in place", precision=0)
                            caption_dropout = gr.Number(0.0, label="Caption dropout rate")
                        with gr.Row():
                            layers = gr.Dropdown(TRAIN_LAYERS, value="attn", label="Layers", elem_id="train-layers")
                            conv_rank = gr.Number(0, label="Conv rank (kohya's conv_dim; 0: the rank)", precision=0)
                            conv_alpha = gr.Number(0.0, label="Conv alpha (0: the conv rank)")
                        with gr.Row():
                            noise_offset = gr.Number(0.0, label="Noise offset (e.g. 0.05)")
                            multires = gr.Number(0, label="Multires noise iterations (e.g. 6; 0: off)", precision=0)
                            snr_gamma = gr.Number(0.0, label="Min-SNR gamma (e.g. 5; 0: off)")
                            loss_type = gr.Dropdown(["l2", "l1", "huber", "smooth_l1"], value="l2", label="Loss")
                            val_split = gr.Number(0.0, label="Validation split (held-out share; 0: none)")
                        with gr.Row():
                            max_tokens = gr.Dropdown([75, 150, 225], value=75, label="Caption tokens (kohya's "
                                                     "max_token_length: long tag captions in chunks)")
                            debiased = gr.Checkbox(False, label="Debiased estimation loss (kohya's)")
                        extra_args = gr.Textbox(label="Additional parameters (lora-diffusion train / kohya flags, over the "
                                                      "settings above, e.g. --network_dropout 0.1 --color_aug)",
                                                elem_id="train-extra-args")
                        continue_from = gr.Dropdown(choices=[], value=None, allow_custom_value=True, elem_id="continue-from",
                                                    label="Continue training a library LoRA (kohya's --network_weights: "
                                                          "its modules, rank, alpha and DoRA; blank: a new LoRA)")
                    with gr.Row():
                        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                    train_progress = gr.HTML(elem_id="train-progress")
                    train_status = gr.Markdown(elem_id="train-status")
                    loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", label="Loss", height=220)
                    train_samples = gr.Gallery(label="Validation samples", columns=4, height="auto")

        # ------------------------------------------------------------------ Merge
        with gr.Tab("Merge", id="merge"):
            merge_table = gr.Dataframe(headers=["use", "LoRA", "weight", "blocks (LBW preset or vector; blank: all)"],
                                       datatype=["bool", "str", "number", "str"], column_count=4, interactive=True,
                                       type="array", static_columns=[1], label="LoRAs to merge (tick and weight them)")
            with gr.Row():
                merge_mode = gr.Radio(["concat", "svd"], value="concat", label="Method (concat is exact; SVD approximates)")
                merge_rank = gr.Number(8, label="SVD rank", precision=0)
                merge_format = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Output format")
                merge_name = gr.Textbox(label="Output name", placeholder="merged")
            merge_btn = gr.Button("Merge", variant="primary")
            merge_report = gr.Markdown(elem_id="merge-report")
            merge_file = gr.File(label="Merged file", interactive=False)

        # ------------------------------------------------------------------ Library
        with gr.Tab("Library", id="library"):
            lib_table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, type="array", label="LoRA library",
                                     elem_id="library-table", wrap=True)
            lib_samples = gr.Gallery(label="Samples", columns=6, height="auto")
            with gr.Row():
                upload_file = gr.File(file_types=[".safetensors"], label="Upload a LoRA (.safetensors only)")
                upload_name = gr.Textbox(label="Name (default: the file name)")
                upload_btn = gr.Button("Add to library")
            with gr.Row():
                delete_name = gr.Dropdown(choices=[], label="LoRA to delete", allow_custom_value=True)
                delete_btn = gr.Button("Delete", variant="stop")
            lib_message = gr.Markdown(elem_id="library-message")

        # ------------------------------------------------------------------ handlers
        refresh_outputs = [slot_names, no_loras, *slot_rows, *checks, *weights, *te_weights, merge_table, lib_table,
                           lib_samples, delete_name, folder, continue_from]

        def refresh(previous=None):
            names = backend.library.names()
            shown = names[:max_slots]
            previous = list(previous or [])
            # a row whose LoRA changed (one deleted or added before it) starts unticked at weight 1: a tick or a
            # weight set for another LoRA must not carry over to the one that moved into its row
            same = [i < len(previous) and i < len(shown) and previous[i] == shown[i] for i in range(max_slots)]
            rows = [gr.Row(visible=i < len(shown)) for i in range(max_slots)]
            label = [shown[i] if i < len(shown) else f"LoRA {i}" for i in range(max_slots)]
            boxes = [gr.Checkbox(label=label[i]) if same[i] else gr.Checkbox(label=label[i], value=False) for i in range(max_slots)]
            sliders = [gr.update() if same[i] else gr.Slider(value=1.0) for i in range(max_slots)]
            te_boxes = [gr.update() if same[i] else gr.Textbox(value="") for i in range(max_slots)]
            infos = backend.library.list()
            samples = [(str(i.sample), i.name) for i in infos if i.sample]
            return [
                shown,
                gr.Markdown(visible=not names),
                *rows,
                *boxes,
                *sliders,
                *te_boxes,
                [[False, n, 1.0, ""] for n in names],
                [i.row() for i in infos],
                samples,
                gr.Dropdown(choices=names, value=None),
                gr.Dropdown(choices=backend.data_folders(), value=None),
                gr.Dropdown(choices=names, value=None),
            ]

        @_user_errors
        def on_generate(prompt, negative, preset, fuse, seed, steps, guidance, width, height, clip_skip, names, past, *rest):
            # (sampler, schedule type, A1111 syntax, hires fix, init image, batch count, the X/Y plot's axes, the
            # inpaint mask and its settings, the Z axis, the variation seed, the hires CFG scale, the noise schedule and the
            # hires sampler, schedule type, prompts and resize come after the slots, in the order they were added: API
            # callers' positions stay as they were, and a call without the newer ones takes their defaults)
            slots, extra = rest[: 3 * max_slots], rest[3 * max_slots :]
            defaults = (MODEL_SAMPLER, "Automatic", True, 1.0, "Latent", 0, 0.7, None, 1, NO_AXIS, None, NO_AXIS, None, None, 4,
                        False, 32, "original", MASK_MODES[0], NO_AXIS, None, 0, 0.0, 0.0, "Default", SAME, SAME, "", "", 0, 0)
            sampler, schedule, emphasis, hr_scale, hr_upscaler, hr_steps, denoise, init, count, x_type, x_values, y_type, \
                y_values, mask, blur, only_masked, padding, content, mode, z_type, z_values, sub, sub_strength, hr_guidance, \
                noise, hr_sampler, hr_schedule, hr_prompt, hr_negative, hr_x, hr_y = (*extra, *defaults[len(extra):])[:31]
            if (mode or MASK_MODES[0]) not in MASK_MODES:
                raise UIError(f"unknown mask mode {mode!r}; choose from {', '.join(MASK_MODES)}")
            count = _whole(count, "the batch count", 1)
            if not 1 <= count <= MAX_BATCH:
                raise UIError(f"the batch count must be between 1 and {MAX_BATCH}, got {count}")
            names = names or backend.library.names()[:max_slots]
            use, w, te = slots[:max_slots], slots[max_slots : 2 * max_slots], slots[2 * max_slots :]
            loras = {}
            for i, name in enumerate(names[:max_slots]):
                if use[i]:
                    loras[name] = (float(w[i]), _optional_weight(te[i], name))
            request = GenerateRequest(prompt=prompt or "", negative_prompt=negative or "", loras=loras, block_preset=preset,
                                fuse=bool(fuse), seed=_whole(seed, "the seed", 0), steps=_whole(steps, "steps"),
                                guidance=_number(guidance, "guidance"), width=_whole(width, "the width", 0) or None,
                                height=_whole(height, "the height", 0) or None, clip_skip=_whole(clip_skip, "CLIP skip", 1),
                                sampler=None if sampler in (None, MODEL_SAMPLER) else sampler,
                                schedule_type=schedule or "Automatic", emphasis=bool(emphasis),
                                hires_scale=_number(hr_scale, "the hires upscale"), hires_upscaler=hr_upscaler or "Latent",
                                hires_steps=_whole(hr_steps, "hires steps", 0), denoising_strength=_number(denoise, "the denoising strength"),
                                init_image=_file_path(init) if init else None, mask_image=_file_path(mask) if mask else None,
                                mask_blur=_whole(blur, "the mask blur", 4), inpaint_only_masked=bool(only_masked),
                                masked_padding=_whole(padding, "the masked area padding", 32),
                                masked_content=content or "original", inpaint_not_masked=mode == MASK_MODES[1],
                                subseed=_whole(sub, "the variation seed", 0),
                                subseed_strength=0.0 if sub_strength is None else _number(sub_strength, "the variation strength"),
                                hires_cfg_scale=0.0 if hr_guidance is None else _number(hr_guidance, "the hires CFG scale"),
                                noise_schedule=noise or "Default",
                                hires_sampler=None if hr_sampler in (None, SAME) else hr_sampler,
                                hires_schedule_type=None if hr_schedule in (None, SAME) else hr_schedule,
                                hires_prompt=hr_prompt or "", hires_negative_prompt=hr_negative or "",
                                hires_resize=(_whole(hr_x, "the hires resize width", 0), _whole(hr_y, "the hires resize height", 0)))
            axes = [f"{kind}: {values or ''}" if kind and kind != NO_AXIS else None
                    for kind, values in ((x_type, x_values), (y_type, y_values), (z_type, z_values))]
            if any(axes):  # A1111's X/Y/Z plot: the grid first, then its cells
                if count != 1:
                    raise UIError("an X/Y plot makes one image per cell: set the batch count to 1")
                grid, cells = backend.xy_plot(request, *axes)
                results = [grid, *cells]
            else:  # (A1111's batch count: seed, seed + 1, ...; each image its own request and PNG)
                results = (backend.generate(dataclasses.replace(request, seed=request.seed + i)) for i in range(count))
            made = []
            for result in results:
                info = f"**{result.caption}**  \nprompt: `{result.prompt}`"
                # a file of our own per image: gradio rewrites a PIL image's cache file on every response that holds it
                path = backend.save_image(result)
                made.append({"image": path, "caption": result.caption, "info": info, "snippet": result.snippet})
            past = [*made, *(past or [])][:HISTORY]
            return [(h["image"], h["caption"]) for h in past], past, made[0]["info"], made[0]["snippet"]

        # the API's parameter names, and defaults for the init image, batch count, X/Y plot and mask (an input without a
        # value is otherwise required, which would break callers written before it)
        on_generate.__signature__ = _positional_signature(
            ["prompt", "negative_prompt", "block_preset", "fuse", "seed", "steps", "guidance", "width", "height",
             "clip_skip", "slot_names", "history", *(f"{kind}_{i}" for kind in ("use", "weight", "te_weight")
                                                      for i in range(max_slots)),
             "sampler", "schedule_type", "a1111_syntax", "hires_scale", "hires_upscaler", "hires_steps",
             "denoising_strength"], {"init_image": None, "batch_count": 1, "x_type": NO_AXIS, "x_values": None,
                                     "y_type": NO_AXIS, "y_values": None, "mask_image": None, "mask_blur": None,
                                     "inpaint_only_masked": None, "masked_padding": None, "masked_content": None,
                                     "mask_mode": None, "z_type": NO_AXIS, "z_values": None, "subseed": None,
                                     "subseed_strength": None, "hires_cfg_scale": None, "noise_schedule": None,
                                     "hires_sampler": None, "hires_schedule_type": None, "hires_prompt": None,
                                     "hires_negative_prompt": None, "hires_resize_width": None, "hires_resize_height": None})

        def on_select(past, evt: gr.SelectData):
            item = (past or [])[evt.index] if past and evt.index < len(past) else None
            return (item["info"], item["snippet"]) if item else ("", "")

        def on_images(files, folder_name):
            paths = [_file_path(f) for f in files or []]
            if folder_name:
                paths += [str(p) for p in backend.folder_images(folder_name)]
            from .handlers import caption_rows

            return caption_rows(paths)

        def on_train(files, folder_name, table, name, mode, token, rank, steps, lr, te_lr, train_te, dora, res, val_prompt, seed,
                     fmt, skip, shuffle, keep, dropout, continue_from=None, layers="attn", conv_rank=0, conv_alpha=0.0,
                     noise_offset=0.0, multires=0, snr_gamma=0.0, loss_type="l2", val_split=0.0, max_tokens=75,
                     debiased=False, extra_args=None):
            paths = [_file_path(f) for f in files or []]
            try:
                if folder_name:
                    paths += [str(p) for p in backend.folder_images(folder_name)]
                by_name = {str(r[0]): str((r[1] if len(r) > 1 else "") or "") for r in _rows(table) if r and r[0]}
                req = TrainRequest(
                    name=name or "", images=[(p, by_name.get(Path(p).name, "")) for p in paths], mode=mode,
                    token=token or "", rank=_whole(rank, "the rank"), max_train_steps=_whole(steps, "steps"),
                    learning_rate=_number(lr, "the learning rate"), text_encoder_lr=_number(te_lr, "the text-encoder learning rate"), train_text_encoder=bool(train_te), use_dora=bool(dora), resolution=_whole(res, "the resolution", 0) or None,
                    validation_prompt=val_prompt or "", seed=_whole(seed, "the seed", 0), format=fmt or "diffusers",
                    extra={"clip_skip": _whole(skip, "CLIP skip", 1), "shuffle_caption": bool(shuffle),
                           "keep_tokens": _whole(keep, "the tags kept in place", 0),
                           "caption_dropout_rate": _number(dropout, "the caption dropout rate"),
                           "target_modules": layers or "attn", "conv_rank": _whole(conv_rank, "the conv rank", 0),
                           "conv_alpha": _number(conv_alpha or 0.0, "the conv alpha"),
                           "noise_offset": _number(noise_offset or 0.0, "the noise offset"),
                           "multires_noise_iterations": _whole(multires, "the multires noise iterations", 0),
                           "snr_gamma": _number(snr_gamma or 0.0, "the Min-SNR gamma"), "loss_type": loss_type or "l2",
                           "validation_split": _number(val_split or 0.0, "the validation split"),
                           "max_token_length": _whole(max_tokens, "the caption tokens", 75),
                           "debiased_estimation_loss": bool(debiased)},
                    continue_from=continue_from or None, extra_args=extra_args or "",
                )
                job = backend.start_training(req)
            except (UIError, LoraFormatError) as e:
                raise gr.Error(str(e), print_exception=False) from None
            while True:
                done = job.finished
                yield _train_view(job, backend.queue.position(job))
                if done:
                    return
                time.sleep(POLL_S)

        def _train_view(job, position):
            frac = job.step / job.max_steps if job.max_steps else 0.0
            bar = (f'<progress value="{job.step}" max="{max(job.max_steps, 1)}" style="width:100%"></progress>'
                   f"<div>step {job.step} / {job.max_steps} ({frac:.0%})"
                   + (f" · ETA {job.eta_s:.0f} s" if job.eta_s is not None and job.status == "running" else "") + "</div>")
            status = job_status(job, position)
            if job.skipped_images:
                status += "  \n**Skipped unreadable images:** " + "; ".join(job.skipped_images)
            plot = pd.DataFrame([(s, v, "training") for s, v in job.losses] + [(s, v, "validation") for s, v in job.val_losses],
                                columns=["step", "loss", "series"])
            return job.id, bar, status, plot, [p for p in job.samples if Path(p).is_file()]

        def on_cancel(current):
            job = backend.queue.jobs.get(current) if current is not None else None
            if job is None:
                return "no training job to cancel"
            backend.cancel_training(job)
            return f"cancelling job {job.id} ({job.name}); the last checkpoint is kept"

        @_user_errors
        def on_merge(table, mode, rank, fmt, name):
            rows = [r for r in _rows(table) if len(r) >= 3 and _truthy(r[0])]
            chosen = {str(r[1]): 0.0 if r[2] is None or str(r[2]).strip() == "" else r[2] for r in rows}  # (the backend checks numbers)
            blocks = {str(r[1]): str(r[3] or "") for r in rows if len(r) >= 4}
            info, report = backend.merge(chosen, name or "", mode=mode, rank=_whole(rank, "the rank", 0) or None, format=fmt,
                                         blocks=blocks)
            text = f"Merged **{len(chosen)}** LoRAs into **{info.name}** ({info.format}, rank {info.rank}, {info.size_mb:.2f} MB)."
            if report:
                text += "\n\n```\n" + report + "\n```"
            return text, str(info.path)

        @_user_errors
        def on_png(file):
            if not file:
                return [gr.update()] * 15 + [""] + [gr.update()] * 21
            fields, note = png_info(_file_path(file))
            inpainting = fields["inpaint"]  # (an image that was not inpainted leaves those settings as they are)
            plot, axes = fields["plot"] or {}, []  # an X/Y/Z grid's axes (any other image's: Nothing, one image)
            for a in "xyz":
                axes += [plot.get(f"{a}_type") or NO_AXIS, plot.get(f"{a}_values", "")]
            return [fields["prompt"], fields["negative_prompt"], fields["seed"], fields["steps"], fields["guidance"],
                    fields["width"], fields["height"], fields["clip_skip"], fields["sampler"] or MODEL_SAMPLER,
                    fields["schedule_type"], fields["emphasis"], fields["hires_scale"], fields["hires_upscaler"],
                    fields["hires_steps"], fields["denoising_strength"], f"*{note}*" if note else "settings taken",
                    *([inpainting["mask_blur"], inpainting["inpaint_only_masked"], inpainting["masked_padding"],
                       inpainting["masked_content"], MASK_MODES[inpainting["inpaint_not_masked"]]] if inpainting else
                      [gr.update()] * 5), *axes, fields["subseed"], fields["subseed_strength"], fields["hires_cfg_scale"],
                    fields["noise_schedule"], fields["hires_sampler"] or SAME, fields["hires_schedule_type"] or SAME,
                    fields["hires_prompt"], fields["hires_negative_prompt"], *(fields["hires_resize"] or (0, 0))]

        @_user_errors
        def on_upload(file, name):
            if not file:
                raise UIError("choose a .safetensors file first")
            info = backend.upload(_file_path(file), name or None)
            return f"added **{info.name}** ({info.format}, rank {info.rank}, {info.size_mb:.2f} MB)"

        @_user_errors
        def on_delete(name):
            if not name:
                raise UIError("choose a LoRA to delete")
            backend.delete(name)
            return f"deleted **{name}**"

        slot_inputs = [*checks, *weights, *te_weights]
        generate_btn.click(
            on_generate,
            [prompt, negative, preset, fuse, seed, steps, guidance, width, height, gen_clip_skip, slot_names, history,
             *slot_inputs, sampler, schedule, emphasis, hr_scale, hr_upscaler, hr_steps, denoise, init_image, batch_count,
             x_type, x_values, y_type, y_values, mask_image, mask_blur, only_masked, masked_padding, masked_content, mask_mode,
             z_type, z_values, subseed, subseed_strength, hr_cfg, noise_schedule, hr_sampler, hr_schedule, hr_prompt, hr_negative,
             hr_resize_x, hr_resize_y],
            [gallery, history, image_info, snippet],
            api_name="generate",
            concurrency_limit=2,  # the backend's lock keeps the two blends apart
        )
        gallery.select(on_select, [history], [image_info, snippet], api_visibility="private")
        train_files.change(on_images, [train_files, folder], [captions], api_visibility="private")
        folder.change(on_images, [train_files, folder], [captions], api_visibility="private")
        start_btn.click(
            on_train,
            [train_files, folder, captions, train_name, mode, token, rank, max_steps, lr, te_lr, train_te, use_dora, resolution,
             val_prompt, train_seed, train_format, clip_skip, shuffle_caption, keep_tokens, caption_dropout, continue_from, layers,
             conv_rank, conv_alpha, noise_offset, multires, snr_gamma, loss_type, val_split, max_tokens, debiased, extra_args],
            [job_id, train_progress, train_status, loss_plot, train_samples],
            api_name="train",
            concurrency_limit=8,  # the polling loops; the backend queue runs one job at a time
        ).then(refresh, [slot_names], refresh_outputs, api_visibility="private")
        cancel_btn.click(on_cancel, [job_id], [train_status], api_name="cancel_training")
        merge_btn.click(on_merge, [merge_table, merge_mode, merge_rank, merge_format, merge_name], [merge_report, merge_file],
                        api_name="merge").then(refresh, [slot_names], refresh_outputs, api_visibility="private")
        png_file.change(on_png, [png_file], [prompt, negative, seed, steps, guidance, width, height, gen_clip_skip, sampler,
                                             schedule, emphasis, hr_scale, hr_upscaler, hr_steps, denoise, png_note,
                                             mask_blur, only_masked, masked_padding, masked_content, mask_mode,
                                             x_type, x_values, y_type, y_values, z_type, z_values, subseed, subseed_strength, hr_cfg,
                                             noise_schedule, hr_sampler, hr_schedule, hr_prompt, hr_negative, hr_resize_x,
                                             hr_resize_y],
                        api_name="png_info")
        upload_btn.click(on_upload, [upload_file, upload_name], [lib_message], api_name="upload_lora").then(
            refresh, [slot_names], refresh_outputs, api_visibility="private")
        delete_btn.click(on_delete, [delete_name], [lib_message], api_name="delete_lora").then(
            refresh, [slot_names], refresh_outputs, api_visibility="private")
        demo.load(refresh, [slot_names], refresh_outputs, api_name="library")
    # gradio serves only files under the working directory and the temp folder unless told: the library's samples,
    # merged files and training samples live under --lora-dir, wherever that is
    demo.lora_dir = str(backend.library.root)
    return demo


# What the login page itself needs; with --auth every other route answers 401 until the user has logged in.
PUBLIC_PATHS = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt",
                "/manifest.json"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
LOOPBACK_ONLY = {"/gradio_api/startup-events"}  # gradio's launch calls it on itself; it only reports startup


class LoginRequired:
    """ASGI middleware: with gradio auth on, refuse every non-public route to a request without a login cookie.

    Gradio itself checks the login on its data and API routes; this also covers the ones it leaves open
    (heartbeat, cancel, reset, streams, run history, openapi.json, ...), so ``--auth`` protects every route.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and not self._public(scope):
            gradio_app = scope.get("app")
            if getattr(gradio_app, "auth", None) is not None and not self._logged_in(scope, gradio_app):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                from starlette.responses import JSONResponse

                response = JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _public(scope) -> bool:
        path = scope.get("path", "")
        if path in LOOPBACK_ONLY:
            return (scope.get("client") or ("",))[0] in ("127.0.0.1", "::1")
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    @staticmethod
    def _logged_in(scope, gradio_app) -> bool:
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cid = gradio_app.cookie_id
        token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
        return gradio_app.tokens.get(token) is not None


def launch(demo: gr.Blocks, **kwargs):
    """``demo.queue().launch(**kwargs)``, adding ``LoginRequired`` when ``auth`` is given and the LoRA folder to the
    paths gradio may serve; returns launch's tuple."""
    if getattr(demo, "lora_dir", None):
        kwargs["allowed_paths"] = [*kwargs.get("allowed_paths", []), demo.lora_dir]
    if kwargs.get("auth"):
        from starlette.middleware import Middleware

        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(LoginRequired)]
        kwargs["app_kwargs"] = app_kwargs
    return demo.queue().launch(**kwargs)


def _optional_weight(value, name: str) -> float | None:
    """A text-encoder weight box: blank means "same as the UNet weight"."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise UIError(f"text-encoder weight of {name}: {value!r} is not a number (leave it blank for the same weight)") from None


def _whole(value, what: str, default: int | None = None) -> int:
    """A whole-number box: empty gives ``default`` (or a message if there is none), NaN, Inf and text a message."""
    if value is None or str(value).strip() == "":
        if default is None:
            raise UIError(f"{what} is empty: enter a whole number")
        return default
    number = finite_number(value, what)
    if number != int(number):
        raise UIError(f"{what} must be a whole number, got {value!r}")
    return int(number)


def _number(value, what: str) -> float:
    """A number box that must not be left empty (gradio gives ``None`` for an emptied ``gr.Number``)."""
    if value is None or str(value).strip() == "":
        raise UIError(f"{what} is empty: enter a number")
    return finite_number(value, what)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "x")
    return bool(value)

"""A1111's X/Y/Z plot: one image per combination of axis values, laid out in a labelled grid (one X/Y grid per Z
value, side by side under the Z labels), the way LoRA makers compare weights, epochs, seeds and samplers.

An axis is A1111's text, ``"<type>: <values>"``: comma-separated values (CSV: quote one holding a comma), numbers with
A1111's ranges (``1-5`` is 1..5, ``1-9 (+2)`` steps by 2, ``0-1 [5]`` is 5 evenly spaced values). ``Prompt S/R``
replaces its first value, wherever it is in the prompt and the negative prompt, by each value in turn:
``Prompt S/R: <lora:style:1>, <lora:style:0.5>, <lora:style:0>`` is the usual LoRA-weight sweep.

Example:
    >>> plot = xy_plot(pipe, "a fox <lora:style:1>", lora_dir="loras", x="Prompt S/R: <lora:style:1>, <lora:style:0.5>",
    ...                y="Seed: 1-3")
    >>> plot.grid.save("grid.png", pnginfo=plot.cells[0].pnginfo())
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .generate import SAMPLERS, SCHEDULE_TYPES, Generated, split_sampler, txt2img

__all__ = ["AXES", "parse_axis", "plot_cells", "Cell", "xy_plot", "XYPlot", "draw_grid", "z_grids", "draw_z_grid",
           "grid_infotext", "plot_axes"]

# A1111's axis name -> (value type, the txt2img keyword it sets; None: Prompt S/R, which edits the prompts)
AXES: dict[str, tuple[type, str | None]] = {
    "Prompt S/R": (str, None),
    "Seed": (int, "seed"),
    "Steps": (int, "steps"),
    "CFG Scale": (float, "cfg_scale"),
    "Sampler": (str, "sampler"),
    "Schedule type": (str, "schedule_type"),
    "Denoising": (float, "denoising_strength"),
    "Clip skip": (int, "clip_skip"),
    "Hires upscale": (float, "hires_scale"),
    "Hires steps": (int, "hires_steps"),
    "Var. seed": (int, "subseed"),
    "Var. strength": (float, "subseed_strength"),
    "Checkpoint name": (str, "checkpoint"),  # (a model per value: ``xy_plot``'s ``load_checkpoint`` loads it)
}
_SEEDS = ("Seed", "Var. seed")  # the axes whose -1 values are drawn (each its own), and written fixed
_LABELLED = ("Seed", "Steps", "CFG Scale", "Denoising", "Clip skip", "Hires upscale", "Hires steps", "Var. seed",
             "Var. strength")  # "Steps: 20"
_NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")  # a-b (+step)
_COUNT = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*\[(\d+)\s*\]\s*")  # a-b [count]


@dataclass
class XYPlot:
    """The grid image, its cells (row by row, one X/Y grid after the other: ``cells[(z * len(y_labels) + row) *
    len(x_labels) + column]``, a missing axis counting as one value) and the axes' labels; with a Z axis, ``grid`` is
    A1111's: its X/Y ``grids`` side by side under the Z labels."""

    grid: object  # PIL.Image.Image
    cells: list[Generated]
    x_labels: list[str]
    y_labels: list[str]
    z_labels: list[str] = field(default_factory=list)
    grids: list = field(default_factory=list)  # one X/Y grid per Z value (``[grid]`` without a Z axis)
    infotext: str = ""  # the grid's: the first cell's with the plot's axes (``grid_infotext``)

    def pnginfo(self):
        """The grid's PNG text chunk (``parameters``): ``plot.grid.save(path, pnginfo=plot.pnginfo())``."""
        return Generated(self.grid, self.cells[0].seed, self.infotext).pnginfo()


def _number(kind: type, text: str, axis: str):
    try:
        value = float(text.replace(" ", ""))
    except ValueError:
        raise ValueError(f"{axis}: {text.strip()!r} is not a number") from None
    if kind is int:
        if value != int(value):
            raise ValueError(f"{axis}: {text.strip()!r} is not a whole number")
        return int(value)
    return value


def _expand(kind: type, text: str, axis: str) -> list:
    """One CSV value of a numeric axis: a number, or A1111's range ``a-b``, ``a-b (+step)`` or ``a-b [count]``."""
    if m := _COUNT.fullmatch(text):
        start, stop, count = _number(kind, m[1], axis), _number(kind, m[2], axis), int(m[3])
        if count < 1:
            raise ValueError(f"{axis}: {text.strip()!r} asks for no values")
        values = [start + (stop - start) * i / max(count - 1, 1) for i in range(count)]
        return [int(v) for v in values] if kind is int else values
    if m := _RANGE.fullmatch(text):
        start, stop = _number(kind, m[1], axis), _number(kind, m[2], axis)
        step = _number(kind, m[3], axis) if m[3] else 1
        if step == 0 or (stop - start) * step < 0:
            raise ValueError(f"{axis}: {text.strip()!r} never reaches its end")
        values, value, i = [], start, 0
        while (value <= stop + 1e-9) if step > 0 else (value >= stop - 1e-9):
            values.append(round(value, 8) if kind is float else value)
            i += 1
            value = start + i * step
        return values
    return [_number(kind, text, axis)]


def parse_axis(text: str) -> tuple[str, list]:
    """``"Seed: 1-3"`` -> ``("Seed", [1, 2, 3])``: an axis type of ``AXES`` (any case) and its values, as A1111 reads
    them. ``ValueError`` names a type we do not have, a value that is not a number, an unknown sampler."""
    name, colon, values = text.partition(":")
    kind_name = next((a for a in AXES if a.lower() == name.strip().lower()), None)
    if not colon or kind_name is None:
        raise ValueError(f"axis {text!r}: write '<type>: <values>' with a type of {', '.join(AXES)}")
    kind, _ = AXES[kind_name]
    items = [v for v in next(csv.reader(io.StringIO(values.strip()), skipinitialspace=True), []) if v.strip()]
    if kind is str:
        out = [v.strip() for v in items]
    else:
        out = [v for item in items for v in _expand(kind, item, kind_name)]
    if not out:
        raise ValueError(f"axis {kind_name}: no values")
    if kind_name == "Sampler":
        unknown = [s for s in out if split_sampler(s)[0] not in SAMPLERS and not s.endswith("Scheduler")]
        if unknown:
            raise ValueError(f"axis Sampler: unknown sampler {unknown[0]!r}; choose from {', '.join(SAMPLERS)}")
    if kind_name == "Schedule type":
        unknown = [s for s in out if s not in SCHEDULE_TYPES]
        if unknown:
            raise ValueError(f"axis Schedule type: unknown {unknown[0]!r}; choose from {', '.join(SCHEDULE_TYPES)}")
    return kind_name, out


def _label(kind: str, value) -> str:
    if kind == "Checkpoint name":  # (A1111's: the name without its folder and extension)
        return Path(value).stem if Path(value).suffix in (".safetensors", ".ckpt") else Path(value).name
    if isinstance(value, float):
        value = round(value, 8)
    return f"{kind}: {value}" if kind in _LABELLED else str(value)


@dataclass
class Cell:
    """One cell of a plot: its prompts (``Prompt S/R`` applied) and the ``txt2img`` keywords its values set."""

    prompt: str
    negative_prompt: str
    settings: dict


def plot_cells(prompt: str, negative_prompt: str, x: str | None, y: str | None,
               z: str | None = None) -> tuple[list[Cell], list[str], list[str], list[str]]:
    """The cells of an X/Y/Z plot, row by row and grid after grid (Z outermost, as A1111 orders them), and the column,
    row and Z labels: every axis checked first (a ``Prompt S/R`` whose first value is in neither prompt included), a
    ``Seed`` axis' -1 values drawn."""
    axes = [parse_axis(a) if a else None for a in (x, y, z)]
    if axes == [None, None, None]:
        raise ValueError("give an X, a Y or a Z axis")
    for axis in axes:
        if axis and axis[0] == "Prompt S/R" and axis[1][0] not in prompt and axis[1][0] not in negative_prompt:
            raise ValueError(f"Prompt S/R did not find {axis[1][0]!r} in the prompt or the negative prompt")
        if axis and axis[0] in _SEEDS:
            axis[1][:] = [random.randrange(2**32) if s == -1 else s for s in axis[1]]
    (x_kind, xs), (y_kind, ys), (z_kind, zs) = (a or (None, [None]) for a in axes)
    cells = []
    for z_value in zs:
        for y_value in ys:
            for x_value in xs:
                texts, settings = [prompt, negative_prompt], {}
                for kind, value, values in ((x_kind, x_value, xs), (y_kind, y_value, ys), (z_kind, z_value, zs)):  # (A1111's order)
                    if kind == "Prompt S/R":
                        texts = [t.replace(values[0], value) for t in texts]
                    elif kind is not None:
                        settings[AXES[kind][1]] = value
                cells.append(Cell(texts[0], texts[1], settings))
    labels = [[_label(kind, v) for v in values] if kind else [] for kind, values in ((x_kind, xs), (y_kind, ys), (z_kind, zs))]
    return cells, labels[0], labels[1], labels[2]


def xy_plot(pipe, prompt: str, negative_prompt: str = "", *, x: str | None = None, y: str | None = None,
            z: str | None = None, seed: int = -1, load_checkpoint=None, **kwargs) -> XYPlot:
    """A1111's X/Y/Z plot: ``txt2img`` once per (z, y, x) combination of values, row by row and grid after grid, each
    with its infotext, and the grid (``draw_grid``) with the values as column and row labels (with ``z``, one per Z
    value, side by side under the Z labels: ``draw_z_grid``). ``x`` / ``y`` / ``z``: axis texts (``parse_axis``); any
    may be None. ``seed`` -1 is drawn once, for every cell (a ``Seed`` axis' -1 values each draw their own). Other
    keywords go to ``txt2img`` (``lora_dir``, ``steps``, ``sampler``...). Every axis is checked before the first
    image (``plot_cells``). The pipeline's scheduler is restored after. A ``Checkpoint name`` axis makes its cells
    with ``load_checkpoint(value)`` -> ``(pipeline, {model_name, model_sha256})``, one model at a time (its cells
    together, as A1111 orders them to load each once)."""
    if kwargs.get("batch_count", 1) != 1:
        raise ValueError("an X/Y plot makes one image per cell: batch count must be 1")
    cells, x_labels, y_labels, z_labels = plot_cells(prompt, negative_prompt, x, y, z)
    checkpoints = list(dict.fromkeys(cell.settings.get("checkpoint") for cell in cells))
    if checkpoints != [None] and load_checkpoint is None:
        raise ValueError("a Checkpoint name axis needs load_checkpoint (value -> pipeline and its model_name / "
                         "model_sha256); the command line loads each")
    seed = random.randrange(2**32) if seed == -1 else int(seed)
    scheduler = pipe.scheduler
    made: list = [None] * len(cells)
    try:
        for checkpoint in checkpoints:
            model, extra = (pipe, {}) if checkpoint is None else load_checkpoint(checkpoint)
            for i, cell in enumerate(cells):
                if cell.settings.get("checkpoint") == checkpoint:
                    settings = {k: v for k, v in cell.settings.items() if k != "checkpoint"}
                    made[i] = txt2img(model, cell.prompt, cell.negative_prompt,
                                      **{**kwargs, **extra, "seed": seed, **settings})[0]
    finally:
        pipe.scheduler = scheduler
    grids = z_grids([c.image for c in made], x_labels, y_labels, z_labels)
    text = grid_infotext(made[0].infotext, (x, y, z), cells, (len(x_labels), len(y_labels)))
    return XYPlot(draw_z_grid(grids, z_labels), made, x_labels, y_labels, z_labels, grids, text)


def grid_infotext(first: str, axes: tuple[str | None, str | None, str | None], cells: list[Cell],
                  counts: tuple[int, int]) -> str:
    """A1111's infotext of an X/Y/Z grid: ``first`` (its first cell's) with ``Script: X/Y/Z plot`` and each axis'
    ``X Type`` / ``X Values`` (as typed; a seed axis' ``Fixed X Values`` too: the seeds its ``cells`` took, -1 drawn)
    before ``Version``; ``counts``: the X and Y axes' value counts (0: no axis). ``infotext_settings`` reads the axes
    back (``plot_axes``)."""
    from .generate import _insert_before, infotext, parse_infotext

    prompt, negative, params = parse_infotext(first)
    step = [1, max(counts[0], 1), max(counts[0], 1) * max(counts[1], 1)]  # (cells between one value and the next)
    plot = {"Script": "X/Y/Z plot"}
    for letter, axis, every in zip("XYZ", axes, step):
        if not axis:
            continue
        kind, typed = parse_axis(axis)
        plot[f"{letter} Type"], plot[f"{letter} Values"] = kind, axis.partition(":")[2].strip()
        if kind in _SEEDS:
            values = [cell.settings[AXES[kind][1]] for cell in cells[::every][: len(typed)]]
            plot[f"Fixed {letter} Values"] = ", ".join(map(str, values))
    return infotext(prompt, negative, _insert_before(params, "Version", plot))


def plot_axes(params: dict[str, str]) -> dict[str, str]:
    """``{"x_axis": "Seed: 1, 2", ...}``: the axes of an A1111 grid's infotext ``params`` (``parse_infotext``), as
    ``xy_plot`` takes them; a seed axis' fixed values, so that the grid is made again."""
    out = {}
    for letter in "XYZ":
        kind = params.get(f"{letter} Type")
        if kind and kind != "Nothing":
            values = params.get(f"Fixed {letter} Values") or params.get(f"{letter} Values", "")
            out[f"{letter.lower()}_axis"] = f"{kind}: {values}"
    return out


def z_grids(images: list, x_labels: list[str], y_labels: list[str], z_labels: list[str]) -> list:
    """The X/Y grid (``draw_grid``) of each Z value's share of ``images`` (all of them without a Z axis)."""
    per = len(images) // max(len(z_labels), 1)
    return [draw_grid(images[i : i + per], x_labels, y_labels) for i in range(0, len(images), per)]


def draw_z_grid(grids: list, z_labels: list[str], background: str = "white"):
    """A1111's X/Y/Z grid: the X/Y ``grids`` in one row, each under its Z label (the one grid itself without a Z
    axis)."""
    return draw_grid(grids, z_labels, [], background) if z_labels else grids[0]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # (Pillow without FreeType: its fixed bitmap font)
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def draw_grid(images: list, x_labels: list[str], y_labels: list[str], background: str = "white"):
    """``images`` (row by row, all one size) in ``max(len(x_labels), 1)`` columns, the column labels above and the row
    labels at the left (A1111's legend: a font of (width + height) / 25 px, long labels wrapped)."""
    from PIL import Image, ImageDraw

    columns = max(len(x_labels), 1)
    rows = max(len(y_labels), 1)
    if len(images) != columns * rows:
        raise ValueError(f"{len(images)} images for a {columns} x {rows} grid")
    w, h = images[0].size
    font = _font(max(10, (w + h) // 25))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.size * 1.2) if hasattr(font, "size") else 12
    x_lines = [_wrap(probe, t, font, w - 4) for t in x_labels]
    left = w * 3 // 4 if y_labels else 0
    y_lines = [_wrap(probe, t, font, left - 8) for t in y_labels]
    top = (max(map(len, x_lines)) * line_h + line_h // 2) if x_labels else 0
    grid = Image.new("RGB", (left + columns * w, top + rows * h), background)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (left + i % columns * w, top + i // columns * h))
    for c, lines in enumerate(x_lines):
        for j, line in enumerate(lines):
            draw.text((left + c * w + w / 2, line_h // 4 + j * line_h), line, fill="black", font=font, anchor="ma")
    for r, lines in enumerate(y_lines):
        y0 = top + r * h + (h - len(lines) * line_h) / 2
        for j, line in enumerate(lines):
            draw.text((left / 2, y0 + j * line_h), line, fill="black", font=font, anchor="ma")
    return grid

"""A1111's X/Y plot: axes read as A1111 reads them, each cell the image txt2img makes with its values, the grid
laid out row by row with labels, and bad axes refused before any image."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_diffusion import inject_lora, save_lora
from lora_diffusion.cli import main
from lora_diffusion.data import TINY_MODEL
from lora_diffusion.generate import parse_infotext, txt2img
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.xyplot import draw_grid, parse_axis, plot_axes, xy_plot

from conftest import randomize_lora


@pytest.mark.parametrize("text, expected", [
    ("Seed: 1-3", ("Seed", [1, 2, 3])),
    ("seed: 1-9 (+4), -1", ("Seed", [1, 5, 9, -1])),
    ("Steps: 10-20 [3]", ("Steps", [10, 15, 20])),
    ("CFG Scale: 5-7 (+0.5)", ("CFG Scale", [5.0, 5.5, 6.0, 6.5, 7.0])),
    ("CFG Scale: 0-1 [5], 9", ("CFG Scale", [0.0, 0.25, 0.5, 0.75, 1.0, 9.0])),
    ('Prompt S/R: <lora:a:1>, "red, blue", <lora:a:0>', ("Prompt S/R", ["<lora:a:1>", "red, blue", "<lora:a:0>"])),
    ("Sampler: Euler a, DPM++ 2M Karras", ("Sampler", ["Euler a", "DPM++ 2M Karras"])),
])
def test_axes_read_as_a1111_reads_them(text, expected):
    assert parse_axis(text) == expected


@pytest.mark.parametrize("text, match", [
    ("Seeds: 1", "with a type of Prompt S/R, Seed"),
    ("Seed 1", "write '<type>: <values>'"),
    ("Steps: 10, x", "Steps: 'x' is not a number"),
    ("Steps: 1.5", "Steps: '1.5' is not a whole number"),
    ("Steps: 5-1", "'5-1' never reaches its end"),
    ("Sampler: Euler b", "unknown sampler 'Euler b'"),
    ("Schedule type: Fast", "unknown 'Fast'"),
    ("CFG Scale:  ", "no values"),
])
def test_bad_axes_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_axis(text)


def test_each_cell_is_the_image_txt2img_makes_with_its_values(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    inject_lora(pipe.unet, rank=4)
    randomize_lora(pipe.unet, std=0.5)
    save_lora(tmp_path / "style.safetensors", unet=pipe.unet)
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    prompt = "a red circle <lora:style:1>"
    plot = xy_plot(pipe, prompt, "", x="Prompt S/R: <lora:style:1>, <lora:style:0>", y="Steps: 2, 3", lora_dir=tmp_path,
                   seed=4, sampler="Euler", width=32, height=32)
    assert pipe.scheduler is scheduler  # (the cells set their sampler; the pipeline gets its own back)
    assert (plot.x_labels, plot.y_labels) == (["<lora:style:1>", "<lora:style:0>"], ["Steps: 2", "Steps: 3"])
    assert plot_axes(parse_infotext(plot.infotext)[2]) == {"x_axis": "Prompt S/R: <lora:style:1>, <lora:style:0>",
                                                           "y_axis": "Steps: 2, 3"}
    for i, (weight, steps) in enumerate([(1, 2), (0, 2), (1, 3), (0, 3)]):  # row by row
        cell = plot.cells[i]
        alone = txt2img(pipe, f"a red circle <lora:style:{weight}>", lora_dir=tmp_path, seed=4, steps=steps, sampler="Euler",
                        width=32, height=32)[0]
        assert np.array_equal(np.asarray(cell.image), np.asarray(alone.image)), (weight, steps)
        assert cell.infotext == alone.infotext
    assert not np.array_equal(np.asarray(plot.cells[0].image), np.asarray(plot.cells[1].image))  # the weight shows
    grid = np.asarray(plot.grid)
    top, left = grid.shape[0] - 2 * 32, grid.shape[1] - 2 * 32
    assert top > 0 and left > 0  # room for the labels, which are drawn there
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()
    for i, cell in enumerate(plot.cells):
        r, c = divmod(i, 2)
        assert np.array_equal(grid[top + 32 * r: top + 32 * (r + 1), left + 32 * c: left + 32 * (c + 1)], np.asarray(cell.image))

    seeds = xy_plot(pipe, "a red circle", x="Seed: 7, -1, -1", steps=1, width=32, height=32)
    drawn = [c.seed for c in seeds.cells]
    assert drawn[0] == 7 and len(set(drawn)) == 3 and seeds.y_labels == [] and seeds.x_labels[0] == "Seed: 7"
    one_seed = xy_plot(pipe, "a red circle", y="CFG Scale: 1, 9", steps=1, width=32, height=32)
    assert one_seed.cells[0].seed == one_seed.cells[1].seed  # the plot's seed is drawn once for every cell
    with pytest.raises(ValueError, match="Prompt S/R did not find '<lora:ink:1>' in the prompt"):
        xy_plot(pipe, prompt, x="Prompt S/R: <lora:ink:1>, <lora:ink:0>", lora_dir=tmp_path)
    with pytest.raises(ValueError, match="give an X, a Y or a Z axis"):
        xy_plot(pipe, prompt)


def test_a_z_axis_makes_one_xy_grid_per_value_side_by_side():
    """A1111's Z: the cells grid after grid (Z outermost), each the image txt2img makes with its values; each Z value's
    X/Y grid, and the grids in one row under the Z labels."""
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    plot = xy_plot(pipe, "a red circle", x="Seed: 1, 2", z="CFG Scale: 3, 7", steps=1, width=32, height=32)
    assert (plot.x_labels, plot.y_labels, plot.z_labels) == (["Seed: 1", "Seed: 2"], [], ["CFG Scale: 3.0", "CFG Scale: 7.0"])
    for cell, (cfg, seed) in zip(plot.cells, [(3, 1), (3, 2), (7, 1), (7, 2)], strict=True):
        alone = txt2img(pipe, "a red circle", seed=seed, cfg_scale=float(cfg), steps=1, width=32, height=32)[0]
        assert np.array_equal(np.asarray(cell.image), np.asarray(alone.image)) and cell.infotext == alone.infotext
    assert len(plot.grids) == 2
    for grid, cells in zip(plot.grids, (plot.cells[:2], plot.cells[2:])):
        assert np.array_equal(np.asarray(grid), np.asarray(draw_grid([c.image for c in cells], plot.x_labels, [])))
    whole = np.asarray(plot.grid)
    w, h = plot.grids[0].size
    top = whole.shape[0] - h
    assert whole.shape[1] == 2 * w and top > 0 and (whole[:top] < 128).any()  # (the Z labels above)
    for i, grid in enumerate(plot.grids):
        assert np.array_equal(whole[top:, i * w : (i + 1) * w], np.asarray(grid))
    no_z = xy_plot(pipe, "a red circle", x="Seed: 1, 2", steps=1, width=32, height=32)
    assert no_z.z_labels == [] and no_z.grids == [no_z.grid]  # (without Z, the X/Y grid itself)
    assert 'Script: X/Y/Z plot, X Type: Seed, X Values: "1, 2", Fixed X Values: "1, 2", Z Type: CFG Scale, Z Values: ' \
        '"3, 7", Version' in plot.infotext
    assert plot_axes(parse_infotext(plot.infotext)[2]) == {"x_axis": "Seed: 1, 2", "z_axis": "CFG Scale: 3, 7"}
    assert not np.array_equal(np.asarray(no_z.grid), np.asarray(plot.grids[0]))  # (CFG 3 is not the default 7)
    assert np.array_equal(np.asarray(no_z.grid), np.asarray(plot.grids[1]))


def test_variation_axes_sweep_from_the_seed_to_the_variation_seed():
    """A1111's Var. strength / Var. seed axes: strength 0 is the seed's image, 1 the variation seed's (a sampler that
    draws no more noise); a -1 Var. seed is drawn and written fixed; a Hires. fix varies its first pass."""
    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(steps=2, sampler="Euler", width=32, height=32)
    plot = xy_plot(pipe, "a red circle", x="Var. strength: 0, 1", y="Var. seed: 5, -1", seed=1, **kw)
    assert plot.x_labels == ["Var. strength: 0.0", "Var. strength: 1.0"] and plot.y_labels[0] == "Var. seed: 5"
    drawn = int(plot.y_labels[1].split(": ")[1])
    for cell, seed in zip(plot.cells, [1, 5, 1, drawn]):
        assert np.array_equal(np.asarray(cell.image), np.asarray(txt2img(pipe, "a red circle", seed=seed, **kw)[0].image))
    assert f'Y Type: Var. seed, Y Values: "5, -1", Fixed Y Values: "5, {drawn}"' in plot.infotext
    hires = xy_plot(pipe, "a red circle", x="Var. strength: 0, 0.5", seed=1, subseed=5, hires_scale=1.5, **kw)
    assert hires.cells[0].image.size == (48, 48) and "Variation seed: 5" in hires.cells[1].infotext
    assert not np.array_equal(np.asarray(hires.cells[0].image), np.asarray(hires.cells[1].image))


def test_a_checkpoint_axis_makes_each_cell_with_its_model(tmp_path, capsys):
    """A1111's Checkpoint name axis on the command line: each cell is the image its model makes alone (named in its
    infotext), the models given as paths or as names beside the first; a missing one is named before any loads."""
    models = tmp_path / "models"
    for name, seed in (("alpha", 0), ("beta", 1)):
        tiny_pipeline(seed).save_pretrained(models / name)
    out = tmp_path / "plot"
    assert main(["generate", str(models / "alpha"), "a red circle", "--x-axis", f"Checkpoint name: alpha, {models / 'beta'}",
                 "--y-axis", "Seed: 1, 2", "--steps", "1", "--width", "32", "--height", "32", "-o", str(out)]) == 0
    cells = sorted(p for p in out.iterdir() if not p.name.startswith("xyz_grid"))
    assert len(cells) == 4
    for cell, (model, seed) in zip(cells, [("alpha", 1), ("beta", 1), ("alpha", 2), ("beta", 2)]):  # row by row
        alone = tmp_path / f"{model}-{seed}.png"
        assert main(["generate", str(models / model), "a red circle", "--seed", str(seed), "--steps", "1", "--width", "32",
                     "--height", "32", "-o", str(alone)]) == 0
        assert np.array_equal(np.asarray(Image.open(cell)), np.asarray(Image.open(alone))), cell.name
        assert parse_infotext(Image.open(cell).info["parameters"])[2]["Model"] == model
    assert not np.array_equal(np.asarray(Image.open(cells[0])), np.asarray(Image.open(cells[1])))
    with Image.open(out / "xyz_grid-00000.png") as grid:
        assert parse_infotext(grid.info["parameters"])[2]["X Type"] == "Checkpoint name"
    capsys.readouterr()
    assert main(["generate", str(models / "alpha"), "a red circle", "--x-axis", "Checkpoint name: alpha, gamma",
                 "-o", str(tmp_path / "no")]) == 2
    assert "Checkpoint name 'gamma': no such model file or folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a Checkpoint name axis needs load_checkpoint"):
        xy_plot(tiny_pipeline(0), "a red circle", x="Checkpoint name: alpha, beta")
    loads = []

    def load(value):  # (from Python: any loader; each model loads once, its cells together)
        loads.append(value)
        pipe = tiny_pipeline(1)
        pipe.set_progress_bar_config(disable=True)
        return pipe, {"model_name": Path(value).stem}

    plot = xy_plot(tiny_pipeline(0), "a red circle", x="Checkpoint name: m/one.safetensors, m/two.ckpt", y="Seed: 1, 2",
                   load_checkpoint=load, steps=1, width=32, height=32)
    assert plot.x_labels == ["one", "two"] and loads == ["m/one.safetensors", "m/two.ckpt"]
    assert "Model: two" in plot.cells[3].infotext


def test_the_grid_lays_images_out_row_by_row():
    images = [Image.new("RGB", (16, 8), (10 * i, 0, 0)) for i in range(6)]
    assert np.array_equal(np.asarray(draw_grid(images[1:2], [], [])), np.asarray(images[1]))  # no labels: no margins
    grid = draw_grid(images, ["a", "b", "c"], ["one", "two"])
    assert grid.size[0] > 48 and grid.size[1] > 16
    with pytest.raises(ValueError, match="6 images for a 4 x 2 grid"):
        draw_grid(images, ["a", "b", "c", "d"], ["one", "two"])


def test_cli_writes_the_cells_and_the_grid(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", str(TINY_MODEL), "a red circle", "--x-axis", "Seed: 1, 2", "--y-axis", "CFG Scale: 3, 7",
                 "--steps", "1", "--width", "32", "--height", "32", "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-1.png", "00001-2.png", "00002-1.png", "00003-2.png", "xyz_grid-00000.png"]
    with Image.open(out / "00002-1.png") as cell:
        assert parse_infotext(cell.info["parameters"])[2]["CFG scale"] == "7.0"
    with Image.open(out / "xyz_grid-00000.png") as grid:
        assert parse_infotext(grid.info["parameters"])[2]["Seed"] == "1" and grid.size[0] > 64
    assert main(["generate", str(TINY_MODEL), "a red circle", "--x-axis", "Seed: 1", "--steps", "1", "--width", "32",
                 "--height", "32", "-o", str(out)]) == 0
    assert (out / "xyz_grid-00001.png").is_file() and (out / "00004-1.png").is_file()
    assert main(["generate", str(TINY_MODEL), "a red circle", "--x-axis", "Seed: 1", "--z-axis", "Steps: 1, 2",
                 "--width", "32", "--height", "32", "-o", str(out)]) == 0
    assert (out / "00005-1.png").is_file() and (out / "00006-1.png").is_file() and not (out / "00007-1.png").exists()
    with Image.open(out / "00006-1.png") as cell:
        assert parse_infotext(cell.info["parameters"])[2]["Steps"] == "2"
    with Image.open(out / "xyz_grid-00002.png") as grid:
        assert grid.size[0] >= 64  # (two grids side by side)
    # the grid's infotext is A1111's (the axes as typed, a seed axis' seeds fixed): --from-png makes the plot again
    assert main(["generate", str(TINY_MODEL), "a red circle", "--x-axis", "Seed: 3, -1", "--y-axis", "CFG Scale: 2-4 [2]",
                 "--steps", "1", "--width", "32", "--height", "32", "-o", str(tmp_path / "first")]) == 0
    assert main(["generate", str(TINY_MODEL), "--from-png", str(tmp_path / "first" / "xyz_grid-00000.png"),
                 "-o", str(tmp_path / "again")]) == 0
    first, again = (sorted((tmp_path / name).iterdir()) for name in ("first", "again"))
    assert [p.name for p in first] == [p.name for p in again] and len(first) == 5
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
    for a, b in zip(first[:-1], again[:-1]):
        assert Image.open(a).info["parameters"] == Image.open(b).info["parameters"]
    _, _, params = parse_infotext(Image.open(first[-1]).info["parameters"])
    drawn = parse_infotext(Image.open(first[1]).info["parameters"])[2]["Seed"]
    remade = parse_infotext(Image.open(again[-1]).info["parameters"])[2]
    assert remade == {**params, "X Values": f"3, {drawn}"}  # (the seeds it was given, fixed)
    assert [params[k] for k in ("Script", "X Type", "X Values", "Fixed X Values", "Y Type", "Y Values")] == \
        ["X/Y/Z plot", "Seed", "3, -1", f"3, {drawn}", "CFG Scale", "2-4 [2]"]
    assert list(params)[-7:] == ["Script", "X Type", "X Values", "Fixed X Values", "Y Type", "Y Values", "Version"]
    assert "Script" not in parse_infotext(Image.open(first[0]).info["parameters"])[2]  # (a cell's is its own)
    for args, message in ((["--x-axis", "Steps: x"], "Steps: 'x' is not a number"),
                          (["--y-axis", "Seed: 1", "--batch-count", "2"], "leave --batch-count at 1"),
                          (["--z-axis", "Sampler: Euler b"], "unknown sampler 'Euler b'")):
        assert main(["generate", "/no/such/model", "a red circle", *args, "-o", str(tmp_path / "no")]) == 2
        assert message in capsys.readouterr().err  # (before the model loads)
    assert not (tmp_path / "no").exists()

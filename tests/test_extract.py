"""Extracting a LoRA from a fine-tuned model: a change of rank <= r comes back exactly (the fused pipeline computes
the tuned model's weights); a cut to a lower rank errs by what the dropped singular values hold (Eckart-Young), as
reported; unchanged layers and text encoders are left out; LoCon convolutions with ``full``; the command line; and
errors that name the layer."""

import subprocess
import sys

import pytest
import torch

from lora_diffusion import fuse, load_lora
from lora_diffusion.extract import extract_lora
from lora_diffusion.formats import our_metadata, read_lora_file
from lora_diffusion.inject import resolve_targets
from lora_diffusion.testing import tiny_pipeline

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _base():
    return tiny_pipeline(0).to(torch.float64)  # (fp64: the SVD too, so that "exactly" is to 1e-10)


def _tuned(seed: int, rank: int, targets="attn", text_encoder=True):
    """The tiny pipeline (fp64) with a random change of ``rank`` added to every layer ``targets`` selects (UNet, and
    the text encoder if asked), and those changes ``{component.path: dW}``."""
    pipe = _base()
    g = torch.Generator().manual_seed(seed)
    changes = {}
    for component in ("unet", "text_encoder") if text_encoder else ("unet",):
        model = getattr(pipe, component)
        for name in resolve_targets(model, targets):
            w = model.get_submodule(name).weight
            flat = w.reshape(w.shape[0], -1)
            delta = (torch.randn(flat.shape[0], rank, generator=g, dtype=torch.float64)
                     @ torch.randn(rank, flat.shape[1], generator=g, dtype=torch.float64)) * 0.02
            with torch.no_grad():
                w.add_(delta.reshape(w.shape))
            changes[f"{component}.{name}"] = delta
    return pipe, changes


def _weight(pipe, key):
    component, path = key.split(".", 1)
    return getattr(pipe, component).get_submodule(path).weight


def test_a_low_rank_change_comes_back_exactly(tmp_path):
    tuned, changes = _tuned(1, rank=2)
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(_base(), tuned, out, rank=4, dtype=torch.float64)
    assert report.mode == "extract" and report.path == out and report.error < 1e-10
    lora, header = read_lora_file(out)
    assert len(lora) == len(changes) and {k.split(".", 1)[0] for k in lora} == {"unet", "text_encoder"}
    assert {w.rank for w in lora.values()} == {4} and {w.alpha for w in lora.values()} == {4.0}
    assert our_metadata(header)["extracted"]["rank"] == 4
    pipe = _base()
    load_lora(pipe, out)
    fuse(pipe)
    for key in changes:
        torch.testing.assert_close(_weight(pipe, key), _weight(tuned, key), rtol=0, atol=1e-12)


def test_a_lower_rank_errs_by_the_dropped_singular_values():
    tuned, changes = _tuned(2, rank=3, text_encoder=False)
    report = extract_lora(_base(), tuned, rank=1)
    assert all(k.startswith("unet.") for k in report.lora)  # the text encoder did not change: left out
    kept = dropped = 0.0
    for key, delta in changes.items():
        s = torch.linalg.svdvals(delta.double())
        expect = float(s[1:].pow(2).sum() / s.pow(2).sum()) ** 0.5
        assert abs(report.errors[key] - expect) < 1e-10, key
        kept, dropped = kept + float(s.pow(2).sum()), dropped + float(s[1:].pow(2).sum())
    assert abs(report.error - (dropped / kept) ** 0.5) < 1e-10


def test_full_targets_extract_conv_layers_as_locon(tmp_path):
    tuned, changes = _tuned(3, rank=2, targets="full", text_encoder=False)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert _weight(tuned, conv).dim() == 4 and conv in changes
    out = tmp_path / "locon.safetensors"
    extract_lora(_base(), tuned, out, rank=2, targets="full", format="kohya", dtype=torch.float64)
    lora, header = read_lora_file(out)
    assert header["_format"] == "kohya" and lora[conv].A.shape[2:] == (3, 3) and lora[conv].B.shape[2:] == (1, 1)
    pipe = _base()
    load_lora(pipe, out)
    fuse(pipe)
    for key in changes:
        torch.testing.assert_close(_weight(pipe, key), _weight(tuned, key), rtol=0, atol=1e-12)


def test_a_pipeline_with_unfused_adapters_counts_as_what_it_computes(tmp_path):
    """A pipeline holding an active, unfused adapter is the model it computes (``W + w s B A``): extracting it against
    its base gives that adapter's change back (at its weight); disabled, it is the base: nothing to extract."""
    from lora_diffusion import disable_lora, set_adapters
    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.testing import random_lora

    tuned = _base()
    write_lora_file(tmp_path / "x.safetensors", random_lora(tuned, seed=5, rank=2), dtype=torch.float64)
    load_lora(tuned, tmp_path / "x.safetensors")
    set_adapters(tuned, {"x": 0.5})
    report = extract_lora(_base(), tuned, rank=2)
    assert report.error < 1e-10
    lora, _ = read_lora_file(tmp_path / "x.safetensors")
    for key, w in lora.items():
        got = report.lora[key]
        expect = 0.5 * (w.alpha / w.rank) * (w.B.flatten(1) @ w.A.flatten(1))
        torch.testing.assert_close((got.B.flatten(1) @ got.A.flatten(1)) * (got.alpha / got.rank), expect, rtol=0, atol=1e-12)
    disable_lora(tuned)
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lora(_base(), tuned, rank=2)


def test_same_models_and_other_architectures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the two models have the same weights in every layer the targets 'attn' select"):
        extract_lora(tiny_pipeline(0), tiny_pipeline(0), tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()
    from lora_diffusion.testing import tiny_sdxl_pipeline

    with pytest.raises(ValueError, match=r"unet\.\S+: the base model's weight is \[\d+, \d+\], the tuned model's"):
        extract_lora(tiny_pipeline(0), tiny_sdxl_pipeline(0), rank=2)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        extract_lora(tiny_pipeline(0), tiny_pipeline(1), rank=0)


def test_the_command_line_extracts_from_model_folders(tmp_path):
    base, tuned = tiny_pipeline(0), _tuned(4, rank=2)[0]
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "cli.safetensors"
    run = subprocess.run([sys.executable, "-m", "lora_diffusion", "extract", str(tmp_path / "base"), str(tmp_path / "tuned"),
                          "-o", str(out), "--rank", "2", "--targets", "to_q,to_v", "--no-text-encoder"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "relative Frobenius error" in run.stdout
    lora, _ = read_lora_file(out)
    assert lora and all(k.startswith("unet.") and k.endswith(("to_q", "to_v")) for k in lora)
    again = subprocess.run([sys.executable, "-m", "lora_diffusion", "extract", str(tmp_path / "base"), str(tmp_path / "tuned"),
                            "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr

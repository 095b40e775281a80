"""Q1, our side: load kohya's file (q1_kohya.py) with lora_diffusion.load_lora(strict=True) into a diffusers
StableDiffusionPipeline holding the same base weights; compare module mapping, unfused outputs (weight 1 and 0.5
via set_adapters), fused weights per layer (fuse) against kohya's merge_to, and fused outputs.
Usage: q1_ours.py lora|locon   (after q1_kohya.py; either interpreter: old or new transformers CLIP paths)
Pass: strict=True loads every key; "same modules as kohya's own: True" (asserted); outputs and fused weights
agree with kohya's to fp32 rounding (today: every ratio <= ~1e-5 of the LoRA's effect, fused weights ~3e-6)."""
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from common import WORK, inputs, rel, sd15_pipeline
from lora_diffusion import fuse, load_lora, set_adapters
from lora_diffusion.formats import strip_text_model
from lora_diffusion.formats_kohya import module_path_from_kohya
from lora_diffusion.inject import lora_layers

variant = sys.argv[1]
path = WORK / f"kohya_{variant}.safetensors"
ref = load_file(WORK / f"kohya_{variant}_outputs.safetensors")
pipe = sd15_pipeline()
x, t, ctx, ids = inputs()
print(f"[{variant}] transformers {transformers.__version__}; text-encoder module example:",
      [n for n, _ in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj")][0])


@torch.no_grad()
def outs():
    return pipe.unet(x, t, ctx).sample, pipe.text_encoder(ids).last_hidden_state


def peak(tag):
    import resource
    st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if l.startswith("Rss"))
    now = {k: f"{int(v.split()[0]) / 2**20:.1f}" for k, v in st.items()}
    print(f"  [after {tag}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB; now GB {now}]")


def report(tag, ours, kohya_key, base_ours=None):
    for comp, o in zip(("unet", "te"), ours):
        k, kb = ref[f"{kohya_key}_{comp}"], ref[f"base_{comp}"]
        effect = k - kb
        line = f"  {tag:<22} {comp:<4} max|ours-kohya|/max|kohya LoRA effect| = {rel(o, k, effect):.2e}"
        if base_ours is not None:
            line += f"; effects compared (ours-ours_base vs kohya-kohya_base): {rel(o - base_ours[comp], effect, effect):.2e}"
        print(line + f"  (effect max {effect.abs().max():.3g})")


peak("pipeline build")
base = dict(zip(("unet", "te"), outs()))
peak("base forward")
for comp in ("unet", "te"):
    print(f"  base outputs, diffusers vs kohya {comp}: max|diff| {float((base[comp] - ref['base_' + comp]).abs().max()):.2e} "
          f"(output max {float(ref['base_' + comp].abs().max()):.3g})")

# every key consumed: strict=True raises on any unmatched key
keys = list(safe_open(str(path), "pt").keys())
modules = sorted({k.split(".")[0] for k in keys})
name = load_lora(pipe, path, strict=True)
wrapped = {("unet" if c == "unet" else "te", p) for c, m in (("unet", pipe.unet), ("te", pipe.text_encoder))
           for p, layer in lora_layers(m) if name in layer.specs}
# the right module: kohya names module X of ITS model; X must be where we put it
with safe_open(str(WORK / f"kohya_{variant}_merged.safetensors"), "pt") as f:
    kohya_paths = {tuple(k.split(".", 1)) for k in f.keys()}
norm = lambda s: {(c, strip_text_model(p) if c == "te" else p) for c, p in s}  # noqa: E731
ours_paths = {("unet" if c == "unet" else "te", p) for c, p in (module_path_from_kohya(m) for m in modules)}
print(f"  file: {len(keys)} keys, {len(modules)} modules; load_lora(strict=True) wrapped {len(wrapped)} layers; "
      f"same modules as kohya's own: {norm(wrapped) == norm(kohya_paths)}; name mapping == kohya's module paths: "
      f"{norm(ours_paths) == norm(kohya_paths)}")
assert norm(wrapped) == norm(kohya_paths), sorted(norm(wrapped) ^ norm(kohya_paths))[:10]

peak("load_lora")
lora1 = outs()
peak("unfused forward")
report("unfused weight 1", lora1, "lora1", base)
set_adapters(pipe, {name: 0.5})
report("unfused weight 0.5", outs(), "lora05", base)
set_adapters(pipe, {name: 1.0})
fuse(pipe)
peak("fuse")
report("fused vs kohya merged", outs(), "merged", base)

# per-layer fused weights vs kohya merge_to
worst, worst_abs, worst_layer = 0.0, 0.0, None
per_kind = {}
with safe_open(str(WORK / f"kohya_{variant}_merged.safetensors"), "pt") as fm, \
        safe_open(str(WORK / "base_unet.safetensors"), "pt") as fu, safe_open(str(WORK / "base_te.safetensors"), "pt") as ft:
    for key in fm.keys():
        comp, p = key.split(".", 1)
        kohya_w = fm.get_tensor(key)
        base_w = (fu if comp == "unet" else ft).get_tensor(p + ".weight")
        model = pipe.unet if comp == "unet" else pipe.text_encoder
        ours_w = model.get_submodule(p if comp == "unet" or p in dict(model.named_modules()) else strip_text_model(p)).weight.detach()
        d = float((ours_w - kohya_w).abs().max())  # fp32: close values subtract exactly
        r = d / float((kohya_w - base_w).abs().max())
        kind = "linear" if base_w.dim() == 2 else f"conv{base_w.shape[2]}x{base_w.shape[3]}"
        per_kind[kind] = max(per_kind.get(kind, 0.0), r)
        del kohya_w, ours_w
        if r > worst:
            worst, worst_layer = r, key
        worst_abs = max(worst_abs, d / float(base_w.abs().max()))
peak("per-layer compare")
print(f"  fused weights vs kohya merge_to, {len(kohya_paths)} layers: worst max|ours-kohya|/max|delta| = {worst:.2e} "
      f"({worst_layer}); per kind {({k: f'{v:.1e}' for k, v in per_kind.items()})}; worst relative to max|W| {worst_abs:.1e}")

"""Q4: files under ComfyUI's own names, written by ComfyUI's own "Extract and Save Lora" node
(comfy_extras/nodes_lora_extract.py LoraSave, fed by ModelSubtract / CLIPSubtract as in ComfyUI's workflow),
loaded with lora_diffusion.load_lora. Checked against what ComfyUI itself applies from the same file
(comfy.sd.load_lora_for_models + load_models_gpu), for EVERY parameter of the UNet and the text encoder(s)
(weights, biases, norms, embedding tables), strength 1.0 and 0.7.

Model B = model A + a perturbation of every parameter (a fine-tune stand-in): matrices / convs get a rank-2
delta (so a rank-8 extraction holds it up to ComfyUI's 0.99-quantile clamp), 1-D parameters a dense one.
Usage: q4_comfy_files_in_ours.py [sd15] [sdxl]. Writes $OUT/q4_<kind>.json and $OUT/comfy_lorasave/q4_<kind>_*.safetensors.

Pass: ours_error is None, comfy_not_loaded == 0, only_ours == only_comfy == [], max_rel_err == 0 at strength 1.0
and rows_over_1e-5 == 0 (no weight off by more than 1e-5 of its delta) at 1.0 and 0.7.
"""
from __future__ import annotations

import asyncio
import glob
import json
import os
import sys

import torch

import common as C
from common import comfy

import folder_paths  # ComfyUI's
import comfy_extras.nodes_lora_extract as lora_extract
import comfy_extras.nodes_model_merging as merging

from lora_diffusion import fuse, load_lora

RANK = 8


def perturb(pipe, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in [pipe.unet] + [te for _, te in C.text_encoders(pipe)]:
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    a = torch.randn(2, p[0].numel(), generator=g) * 0.05
                    b = torch.randn(p.shape[0], 2, generator=g) * 0.05
                    p.add_((b @ a).reshape(p.shape))
                else:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _reduced_svd(A, full_matrices=True, **kw):
    """Memory only: ComfyUI's extract_lora calls torch.linalg.svd with full_matrices=True, which for the
    49408-row token-embedding table allocates a 49408 x 49408 U (9.8 GB fp32); it keeps U[:, :rank], S[:rank],
    Vh[:rank], which the reduced SVD gives too (what is compared below is ComfyUI vs us on the file written)."""
    return _svd(A, full_matrices=False, **kw)


_svd = torch.linalg.svd


def extract(kind, zero_missing=True, tag=""):
    a = C.build(kind)
    b = C.build(kind)
    perturb(b)
    ma, _ = C.B.comfy_unet_patcher(kind, a.unet)
    mb, _ = C.B.comfy_unet_patcher(kind, b.unet)
    ca, cb = C.B.comfy_clip(kind, a, zero_missing=zero_missing), C.B.comfy_clip(kind, b, zero_missing=zero_missing)
    (model_diff,) = merging.ModelSubtract().merge(mb, ma, 1.0)
    (clip_diff,) = merging.CLIPSubtract().merge(cb, ca, 1.0)
    outdir = f"{C.OUT}/comfy_lorasave"
    os.makedirs(outdir, exist_ok=True)
    folder_paths.set_output_directory(outdir)
    prefix = f"q4_{kind}{tag}"
    for f in glob.glob(f"{outdir}/{prefix}_*"):
        os.remove(f)
    torch.linalg.svd = _reduced_svd
    try:
        with C.Capture() as cap:
            res = lora_extract.LoraSave.execute(filename_prefix=prefix, rank=RANK, lora_type="standard", bias_diff=True,
                                                model_diff=model_diff, text_encoder_diff=clip_diff)
            if asyncio.iscoroutine(res):
                asyncio.run(res)
    finally:
        torch.linalg.svd = _svd
    comfy.model_management.unload_all_models()
    path = sorted(glob.glob(f"{outdir}/{prefix}_*.safetensors"))[-1]
    return path, b, cap.records


def main(kind):
    path, pipe_b, logs = extract(kind)
    lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
    kinds = {}
    for k in lora_sd:
        suffix = k.rsplit(".", 1)[-1] if not k.endswith(".weight") else ".".join(k.rsplit(".", 2)[-2:])
        kinds.setdefault(k.split(".")[0] + " " + suffix, 0)
        kinds[k.split(".")[0] + " " + suffix] += 1
    result = {"file": path, "tensors": len(lora_sd), "key_kinds": kinds, "extract_warnings": logs[:5],
              "sample_keys": [k for k in sorted(lora_sd) if "attn2.to_k" in k][:2] +
                             [k for k in sorted(lora_sd) if k.startswith("text_encoders.")][:2]}
    for strength in (1.0, 0.7):
        base = C.build(kind)
        base_unet, base_te = C.ours_state(base)
        new_model, new_clip, dkeys, cap = C.comfy_load(kind, base, lora_sd, strength)
        comfy_unet, comfy_te, patch_logs = C.comfy_patched_state(new_model, new_clip)
        pipe = C.build(kind)
        err = None
        try:
            load_lora(pipe, path, weight=strength)
            fuse(pipe)
        except Exception as e:  # report, do not hide
            err = f"{type(e).__name__}: {e}"
        ours_unet, ours_te = C.ours_state(pipe)
        rows = C.compare(ours_unet, ours_te, base_unet, base_te, comfy_unet, comfy_te, dkeys)
        s = C.summarize(rows)
        s["ours_error"] = err
        s["comfy_not_loaded"] = len(cap.not_loaded())
        s["comfy_not_loaded_sample"] = cap.not_loaded()[:8]
        s["comfy_other_warnings"] = cap.others()[:5] + patch_logs[:5]
        bad = sorted([r for r in rows if r["rel_err"] > 1e-5], key=lambda r: -r["rel_err"])
        s["rows_over_1e-5"] = len(bad)
        s["worst_rows"] = [(r["name"], r["shape"], r["rel_err"], r["delta_max"]) for r in bad[:10]]
        by = {}
        for r in rows:
            if not (r["changed_ours"] or r["changed_comfy"]):
                continue
            n = r["name"].split("  ")[0]
            cat = ("bias" if n.endswith(".bias") else "norm/1-D" if len(r["shape"]) == 1 else
                   "embedding" if "embedding" in n and "time" not in n else "conv3x3" if r["shape"][2:] == (3, 3) else
                   "conv1x1" if len(r["shape"]) == 4 else "linear")
            by.setdefault(cat, []).append(r["rel_err"])
        s["max_rel_err_by_kind"] = {c: (len(v), max(v)) for c, v in by.items()}
        # how close the file gets to B (for information: extraction is rank-limited and clamped)
        if strength == 1.0:
            b_unet, b_te = C.ours_state(pipe_b)
            num = max((ours_unet[k].double() - b_unet[k].double()).abs().max().item() for k in b_unet)
            den = max((b_unet[k].double() - base_unet[k].double()).abs().max().item() for k in b_unet)
            s["info_unet_ours_vs_B_over_B_minus_A"] = num / den
        result[f"strength_{strength}"] = s
        print(f"[{kind} comfy-named s={strength}] ours_error={err} changed ours={s['weights_changed_ours']} "
              f"comfy={s['weights_changed_comfy']} only_ours={len(s['only_ours'])} only_comfy={len(s['only_comfy'])} "
              f"comfy_not_loaded={s['comfy_not_loaded']} max_rel_err={s['max_rel_err']} max_ulps={s['max_err_in_ulps_of_weight']} by_kind={s['max_rel_err_by_kind']}",
              flush=True)
    json.dump(result, open(f"{C.OUT}/q4_{kind}.json", "w"), indent=1, default=str)


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["sd15", "sdxl"]:
        main(kind)

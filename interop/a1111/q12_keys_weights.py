"""Q1 (key mapping) and Q2 (weight maths): LoRA files written by our save_lora (kohya format: LoRA attn / LoCon
full, DoRA per output row and, rewritten, per input column; diffusers format; SDXL te2 on q/v only) loaded by A1111's
own Lora extension (a1111_harness) into an LDM/SGM-layout model holding the same base weights, applied through
network_apply_weights as the first forward pass does, and compared tensor by tensor with our load_lora +
set_adapters(..., text_encoder=...) + fuse, exported to the same original layout. SD1.5 and SDXL structures; tags
<lora:n>, <lora:n:0.7>, <lora:n:0.3:0.7>, <lora:n:te=-1:unet=0.5>.

Pass (per file and tag): A1111 matches every key of the file (0 unmatched, one module per file module), loads the
tag's te/unet multipliers, applies with no error and restores the base weights bit-exactly; both sides change the
same tensors; max over tensors of ||A1111 - ours|| / ||ours - base|| <= REL_TOL (1e-5).
KNOWN (documented in README.md): diffusers-format files (A1111 reads none of their keys); DoRA per output row
(A1111 normalises per input column); SDXL te2 LoRA without all of q/k/v/out (A1111 patches OpenCLIP's packed
in_proj only from all four: 4 in_proj tensors changed by ours only, the rest within REL_TOL).
Writes $OUT/q12_results.json."""
import json
import os

import safetensors.torch
import torch

import a1111_harness as H
import models
from common import REL_TOL, Verdicts, base_weights, column_dora, compare, dump, make_file, ours

torch.manual_seed(0)
RESULTS = {}
V = Verdicts("q12_keys_weights")


def run_case(label, pipe, sd_model, base, path, name, prompts):
    keys = list(safetensors.torch.load_file(path))
    net, failed = H.load_file(path)
    kinds = sorted({type(m).__name__ for m in net.modules.values()})
    res = dict(file_keys=len(keys), modules_in_file=len({k.split(".", 1)[0] for k in keys}), a1111_modules=len(net.modules),
               a1111_unmatched=len(failed), unmatched_examples=list(failed.items())[:6], module_types=kinds, prompts={})
    for prompt, te, unet in prompts:
        text, loaded = H.activate_prompt(prompt)
        errs, msgs = H.apply_all(sd_model)
        a = {k: v.clone() for k, v in H.ldm_weights(sd_model).items()}
        H.restore_all(sd_model)
        back = H.ldm_weights(sd_model)
        restored = all(torch.equal(back[k], base[k]) for k in base)
        mine = ours(pipe, path, name, te, unet)
        c = compare(base, a, mine)
        c.update(loaded=loaded, a1111_apply_errors=errs, a1111_messages=msgs[:3], a1111_restores_base=restored)
        res["prompts"][prompt] = c
        judge(label, res, prompt, c, [(name, te, unet, None)])
    del_keys = [c.pop("one_side_keys") for c in res["prompts"].values()]
    res["one_side_keys"] = sorted({k for ks in del_keys for k in ks})[:12]
    RESULTS[label] = res
    print(f"== {label}: {json.dumps(res, default=str)[:1500]}", flush=True)


def judge(label, res, prompt, c, want_loaded):
    plumbing = (c["loaded"] == want_loaded and not c["a1111_apply_errors"] and c["a1111_restores_base"])
    keys_ok = res["a1111_unmatched"] == 0 and res["a1111_modules"] == res["modules_in_file"]
    same_set = c["n_one_side"] == 0 and c["changed_a1111"] == c["changed_ours"]
    agree = plumbing and keys_ok and same_set and c["max_rel"] <= REL_TOL
    detail = (f"{prompt!r}: modules {res['a1111_modules']}/{res['modules_in_file']}, unmatched keys "
              f"{res['a1111_unmatched']}, changed {c['changed_a1111']}/{c['changed_ours']} (A1111/ours), one side only "
              f"{c['n_one_side']}, max_rel {c['max_rel']:.3g}, max_abs {c['max_abs']:.3g}, restores base {c['a1111_restores_base']}")
    known, why = None, ""
    if "_diffusers_" in label:
        known = plumbing and res["a1111_modules"] == 0 and c["changed_a1111"] == 0
        why = "diffusers-format file: A1111 reads none of its keys (ours: write kohya files for A1111)"
    elif "_dora_" in label and not label.endswith("_col"):
        known = plumbing and keys_ok and same_set and c["max_rel"] > REL_TOL
        why = "DoRA dora_scale per output row: A1111 1.10.1 always normalises per input column (A1111's side)"
    elif label.endswith("_te_qv_only"):
        known = (plumbing and keys_ok and c["n_one_side"] > 0 and c["max_rel_both"] <= REL_TOL
                 and all(k.startswith("conditioner.embedders.1.") and k.endswith("attn.in_proj_weight")
                         for k in c["one_side_keys"])
                 and c["changed_ours"] - c["changed_a1111"] == c["n_one_side"])
        why = ("SDXL te2 LoRA on q/v only: A1111 patches OpenCLIP's packed in_proj only when q, k, v and out all have a "
               f"module; {c['n_one_side']} in_proj tensors changed by ours only, the other tensors max_rel "
               f"{c['max_rel_both']:.3g}")
    V.judge(f"{label}", agree, detail, known, why)


PROMPTS = lambda n: [(f"x <lora:{n}>", 1.0, 1.0), (f"x <lora:{n}:0.7>", 0.7, 0.7), (f"x <lora:{n}:0.3:0.7>", 0.3, 0.7),
                     (f"x <lora:{n}:te=-1:unet=0.5>", -1.0, 0.5)]


def main():
    for arch, build in (("sd15", models.sd15_pipeline), ("sdxl", models.sdxl_pipeline)):
        pipe = build()
        base = base_weights(pipe)
        cases = [
            (f"{arch}_kohya_attn_te", dict(unet_targets="attn", te_targets="attn", rank=4, alpha=2, fmt="kohya")),
            (f"{arch}_kohya_full_te", dict(unet_targets="full", te_targets="full", rank=4, alpha=8, fmt="kohya")),
            (f"{arch}_diffusers_attn_te", dict(unet_targets="attn", te_targets="attn", rank=4, alpha=2, fmt="diffusers")),
            (f"{arch}_kohya_dora_attn_te", dict(unet_targets="attn", te_targets="attn", rank=4, alpha=4, fmt="kohya", dora=True)),
        ]
        if arch == "sdxl":  # te2 LoRA on q/v only (no k, no out): A1111 needs all four to patch OpenCLIP's in_proj
            cases.append((f"{arch}_kohya_te_qv_only", dict(unet_targets="attn", te_targets=r".*self_attn\.(q_proj|v_proj)", rank=4, alpha=4, fmt="kohya")))
        for label, kw in cases:
            for f in os.listdir(H.LORA_DIR):
                if os.path.isfile(os.path.join(H.LORA_DIR, f)):
                    os.remove(os.path.join(H.LORA_DIR, f))
            path = make_file(pipe, label, **kw)
            if kw.get("dora"):  # also LyCORIS' per-input-column dora_scale layout
                H.install_model(base)
                col = column_dora(pipe, path, label + "_col")
                H.install_model(base)
                run_case(label + "_col", pipe, H.shared.sd_model, base, col, label + "_col", PROMPTS(label + "_col")[:2])
                os.remove(col)
            sd_model = H.install_model(base)
            run_case(label, pipe, sd_model, base, path, label, PROMPTS(label))
    dump("q12_results.json", RESULTS)
    V.finish()


if __name__ == "__main__":
    main()

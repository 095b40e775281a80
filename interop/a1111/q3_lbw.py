"""Q3b: LoRA Block Weight vectors. hako-mikan's sd-webui-lora-block-weight (checked at b403cb7; $LBW_DIR) scales
each A1111 network module's up weight by ratiodealer(sd_key, to26(vector)) (its lbw()); we run its own
ratiodealer / to26 / BLOCKS / BLOCKID* (extracted from scripts/lora_block_weight.py with ast, unmodified) on A1111's
loaded modules, apply with A1111's network_apply_weights, and compare with our set_adapters(..., blocks={name:
vector}) + fuse, and each module's LBW ratio with our block_factor. Kohya LoRA (attn) and LoCon (full) files on
SD1.5 and SDXL, with the short vectors (17 SD1 / 12 SDXL values) and, on LoCon, every block's (26 / 20 values).

Pass (per file and vector): 0 modules whose LBW ratio differs from our block_factor (|diff| > 1e-9); both sides
change the same tensors; max ||A1111+LBW - ours|| / ||ours - base|| <= REL_TOL (1e-5).
Writes $OUT/q3_lbw_results.json."""
import ast
import json
import os
import shutil

import torch

import a1111_harness as H
import models
from common import REL_TOL, Verdicts, base_weights, compare, dump, make_file
from lora_diffusion import delete_adapter, fuse, load_lora, set_adapters, unfuse
from lora_diffusion.blend import block_factor
from lora_diffusion.formats_kohya import canonical_key

LBW_DIR = os.environ.get("LBW_DIR")
SRC = os.path.join(LBW_DIR or "", "scripts", "lora_block_weight.py")
if not LBW_DIR or not os.path.isfile(SRC):
    raise SystemExit("set LBW_DIR to a hako-mikan/sd-webui-lora-block-weight checkout (see README.md)")
WANT = {"BLOCKID26", "BLOCKID17", "BLOCKID12", "BLOCKID20", "BLOCKIDFLUX", "BLOCKNUMS", "BLOCKIDS", "BLOCKS",
        "ratiodealer", "to26", "hyphener"}
with open(SRC, encoding="utf-8") as f:
    tree = ast.parse(f.read())
body = [n for n in tree.body if (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in WANT for t in n.targets))
        or (isinstance(n, ast.FunctionDef) and n.name in WANT)]
LBW = {"princ": False}
exec(compile(ast.Module(body=body, type_ignores=[]), SRC, "exec"), LBW)
V = Verdicts("q3_lbw")


def lbw_scale(net, vector):
    lwei = LBW["to26"](vector) if len(vector) != 26 else vector
    ratios = {}
    for key, module in net.modules.items():
        ratio, picked = LBW["ratiodealer"](key, lwei, "")
        ratios[key] = (ratio, picked)
        module.up_model.weight = torch.nn.Parameter(module.up_model.weight * ratio)  # as lbw() does
    return ratios


def main():
    results = {}
    for arch, build, vecs in (
            ("sd15", models.sd15_pipeline, {"attn": [[round(0.05 * (i + 2), 2) for i in range(17)]],
                                            "full": [[round(0.05 * (i + 2), 2) for i in range(17)],
                                                     [round(0.03 * (i + 2), 2) for i in range(26)]]}),
            ("sdxl", models.sdxl_pipeline, {"attn": [[round(0.07 * (i + 2), 2) for i in range(12)]],
                                            "full": [[round(0.07 * (i + 2), 2) for i in range(12)],
                                                     [round(0.04 * (i + 2), 2) for i in range(20)]]})):
        pipe = build()
        base = base_weights(pipe)
        for targets in ("attn", "full"):
            shutil.rmtree(H.LORA_DIR, ignore_errors=True)
            os.makedirs(H.LORA_DIR)
            name = f"{arch}_lbw_{targets}"
            path = make_file(pipe, name, unet_targets=targets, te_targets="attn", rank=4, alpha=4, fmt="kohya")
            for vec in vecs[targets]:
                label = f"{name}_{len(vec)}"
                sd_model = H.install_model(base)
                H.networks.loaded_networks.clear()
                H.activate_prompt(f"x <lora:{name}:1>")
                net = H.networks.loaded_networks[0]
                ratios = lbw_scale(net, vec)
                H.apply_all(sd_model)
                a = {k: v.clone() for k, v in H.ldm_weights(sd_model).items()}
                H.restore_all(sd_model)
                load_lora(pipe, path, adapter=name)
                set_adapters(pipe, {name: 1.0}, blocks={name: vec})
                fuse(pipe)
                o = base_weights(pipe)
                unfuse(pipe)
                delete_adapter(pipe, name)
                c = compare(base, a, o)
                # per module: LBW ratio vs our block_factor
                diff = {}
                for key, (ratio, picked) in ratios.items():
                    comp, _, p = canonical_key(net.modules[key].network_key.split(".")[0]).partition(".")
                    mine = block_factor(vec, comp, p)
                    if abs(mine - ratio) > 1e-9:
                        diff.setdefault(f"LBW {ratio} vs ours {mine}", []).append(key)
                res = dict(vector=vec, max_abs=c["max_abs"], max_rel=c["max_rel"],
                           changed=(c["changed_a1111"], c["changed_ours"]), modules=len(ratios),
                           modules_with_different_factor=sum(len(v) for v in diff.values()),
                           examples={k: v[:4] + [f"... {len(v)} modules"] for k, v in diff.items()})
                results[label] = res
                print(label, json.dumps(res)[:1500], flush=True)
                agree = (res["modules_with_different_factor"] == 0 and c["changed_a1111"] == c["changed_ours"]
                         and c["max_rel"] <= REL_TOL)
                V.judge(label, agree, f"{len(vec)}-value vector: modules {res['modules']}, with a different factor "
                        f"{res['modules_with_different_factor']}, changed {c['changed_a1111']}/{c['changed_ours']}, "
                        f"max_rel {c['max_rel']:.3g}, max_abs {c['max_abs']:.3g}")
    dump("q3_lbw_results.json", results)
    V.finish()


if __name__ == "__main__":
    main()

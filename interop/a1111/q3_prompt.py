"""Q3: prompt syntax. For each of 27 prompts: A1111's own parser and activation (modules/extra_networks.parse_prompt
-> ExtraNetworkLora.activate -> networks.load_networks, then network_apply_weights on the model) against our
lora_diffusion.blend.parse_prompt / apply_prompt_loras + fuse. Compared: the stripped prompt (as text and as real
CLIP-L token ids: the BPE file from $CLIP_BPE), the (name, te, unet, dyn) A1111 loads vs our tags, and the fused
weights tensor by tensor.

Pass (per prompt): the same CLIP-L token ids for both stripped prompts (the text itself may differ in whitespace CLIP
folds anyway; reported as same_text), the same LoRAs with the same te/unet weights, both sides change the same
tensors, max ||A1111 - ours|| / ||ours - base|| <= REL_TOL (1e-5).
KNOWN (README.md): dyn (`<lora:n:1:1:2>`, `dyn=`) ignored by us with a warning (all else agrees); a LoRA tagged
twice: A1111 applies it twice at the last tag's weights, we once (its delta is twice ours: max_rel 1 +- 1e-3).
Writes $OUT/q3_results.json."""
import json
import os
import shutil
import warnings

import a1111_harness as H
import models
from common import REL_TOL, Verdicts, base_weights, clip_tokenizer, compare, dump, make_file
from lora_diffusion import fuse, unfuse
from lora_diffusion.blend import apply_prompt_loras, parse_prompt

V = Verdicts("q3_prompt")


TOK = clip_tokenizer()
assert len(TOK) == 49408


def ids(text):
    return TOK(text, add_special_tokens=False).input_ids


PROMPTS = [
    "a cat <lora:sty>",
    "a cat <lora:sty:0.5>",
    "a cat <lora:sty:0.5:0.2>",
    "a cat <lora:sty:te=0.5:unet=1>",
    "a cat <lora:sty:unet=0.3>",
    "a cat <lora:sty:te=0.4>",
    "a cat <lora:sty:0.2:unet=0.9>",
    "a cat <lora:sty:-1>",
    "a cat <lora:sty:.5>",
    "a cat <lora:sty:1e-1>",
    "a cat <lora:sty:1:1:2>",
    "a cat <lora:sty:1:dyn=2>",
    "a cat <lora:my style v1.2:0.8>",
    "a cat <lyco:sty:0.6>",
    "a cat <lora:sty:0.3> <lora:sty:0.5>",
    "a cat <lora:sty:1> <lora:sty:0.5>",
    "a cat <lora:sty:0.7> <lora:other:0.4:1>",
    "a cat, <lora:sty:0.5>, on a mat",
    "<lora:sty:0.5>a cat",
    "a cat<lora:sty:0.5>on a mat",
    "a cat <lora: sty :0.5>",
    "a cat <lora:sty: 0.5 >",
    "a cat <hypernet:foo:1> <lora:sty:0.5>",
    "a cat <lora:a:b:0.5>",
    "<lora:sty:0.5>, a cat",
    "a cat . <lora:sty:0.5>",
    "(red:1.2), <lora:sty:0.5> , cat",
]


def judge(row, a_loaded):
    a_tags = {n: (te, unet) for n, te, unet, _ in a_loaded}  # (a repeated name: its last tag)
    o_tags = row.get("ours_tags")
    same_tags = o_tags is not None and a_tags == {k: tuple(v) for k, v in o_tags.items()}
    w = row["weights"]
    same_weights = w["changed"][0] == w["changed"][1] and w.get("max_rel", float("inf")) <= REL_TOL
    dyn = any(d is not None for *_, d in a_loaded)
    twice = len({n for n, *_ in a_loaded}) < len(a_loaded)
    agree = row["same_tokens"] and same_tags and same_weights and not dyn and not twice
    detail = (f"{row['prompt']!r}: text A1111 {row['a1111_text']!r} / ours {row.get('ours_text')!r} (same tokens "
              f"{row['same_tokens']}), loaded A1111 {a_loaded} / ours {o_tags if o_tags is not None else row.get('ours_error')}, "
              f"changed {w['changed'][0]}/{w['changed'][1]}, max_rel {w.get('max_rel', float('nan')):.3g}")
    known, why = None, ""
    if dyn:
        known = row["same_tokens"] and same_tags and w["changed"][0] == w["changed"][1]
        why = "dyn (rank cut) ignored by us, with a warning; names, te/unet and tokens agree"
    elif twice:
        known = (row["same_tokens"] and same_tags and w["changed"][0] == w["changed"][1]
                 and abs(w.get("max_rel", 0) - 1) < 1e-3)  # A1111's delta is twice ours
        why = "LoRA tagged twice: A1111 applies it twice at the last tag's weights, we once (with a warning)"
    elif not a_loaded and row.get("ours_error", "").startswith("ValueError: bad LoRA tag"):
        known = row["same_tokens"] is False and w["changed"][0] == 0  # (A1111 logs the error, then generates bare)
        why = "a tag whose weight is not a number: A1111 logs an error and drops every LoRA of the prompt; we refuse it"
    elif not a_loaded and o_tags and all(n.strip() == n for n in o_tags) and row["prompt"] != row["prompt"].replace(": ", ":"):
        known = row["same_tokens"] and w["changed"][0] == 0
        why = "spaces around a tag's name: A1111 looks for ' name ' and finds nothing; we strip them and load it"
    V.judge("q3_prompt", agree, detail, known, why)


def main():
    shutil.rmtree(H.LORA_DIR, ignore_errors=True)
    os.makedirs(H.LORA_DIR)
    pipe = models.sd15_pipeline()
    base = base_weights(pipe)
    for i, n in enumerate(["sty", "my style v1.2", "other"]):
        make_file(pipe, n, unet_targets="attn", te_targets="attn", rank=4, alpha=2, fmt="kohya", seed=i)
    sd_model = H.install_model(base)
    rows = []
    for prompt in PROMPTS:
        row = {"prompt": prompt}
        # A1111
        H.networks.loaded_networks.clear()
        H._records.clear()
        a_text, a_loaded = H.activate_prompt(prompt)
        H.apply_all(sd_model)
        a_w = {k: v.clone() for k, v in H.ldm_weights(sd_model).items()}
        H.restore_all(sd_model)
        row["a1111_text"], row["a1111_loaded"] = a_text, a_loaded
        # ours
        try:
            with warnings.catch_warnings():
                o_text, o_tags = parse_prompt(prompt)
            clean = apply_prompt_loras(pipe, prompt, H.LORA_DIR)
            assert clean == o_text
            row["ours_text"], row["ours_tags"] = o_text, {k: (v.te, v.unet) for k, v in o_tags.items()}  # (no LBW here)
            fuse(pipe)
            o_w = base_weights(pipe)
            unfuse(pipe)
            c = compare(base, a_w, o_w)
            row["weights"] = dict(max_abs=c["max_abs"], max_rel=c["max_rel"], changed=(c["changed_a1111"], c["changed_ours"]))
        except Exception as e:  # noqa
            row["ours_error"] = f"{type(e).__name__}: {e}"
            c = compare(base, a_w, base)
            row["weights"] = dict(max_abs=c["max_abs"], changed=(c["changed_a1111"], 0))
        row["same_text"] = row.get("ours_text") == a_text
        row["same_tokens"] = "ours_text" in row and ids(row["ours_text"]) == ids(a_text)
        if not row["same_tokens"] and "ours_text" in row:
            row["tokens"] = (TOK.convert_ids_to_tokens(ids(a_text)), TOK.convert_ids_to_tokens(ids(row["ours_text"])))
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        judge(row, a_loaded)
    print(f"same text {sum(r['same_text'] for r in rows)}/{len(rows)}, same CLIP-L tokens "
          f"{sum(r['same_tokens'] for r in rows)}/{len(rows)}")
    dump("q3_results.json", rows)
    V.finish()


if __name__ == "__main__":
    main()

"""Helpers shared by the checks, no check of their own: write our LoRA files, our fused weights in the original
layout, the tensor-by-tensor comparison, and the PASS / KNOWN / FAIL bookkeeping.

Verdicts: PASS = agrees with A1111 within REL_TOL; KNOWN = one of the documented differences (README.md), and it
still looks exactly as documented (a KNOWN case that starts to agree prints PASS; one that differs otherwise, FAIL);
FAIL = anything else. Each script exits 1 if it printed a FAIL."""
import gzip
import json
import os
import sys

import safetensors
import safetensors.torch
import torch

import a1111_harness as H
from lora_diffusion import delete_adapter, fuse, inject_lora, load_lora, remove_lora, save_lora, set_adapters, unfuse
from lora_diffusion.inject import lora_parameters
from lora_diffusion.tools import to_ldm_checkpoint

# weights agree when, for every tensor, ||A1111 - ours|| / ||ours - base|| <= REL_TOL (float32 rounding; measured
# up to 5.5e-7) and both sides change the same tensors
REL_TOL = 1e-5
OUT = H.OUT


def base_weights(pipe):
    return {k: v.clone() for k, v in to_ldm_checkpoint(pipe).items() if not k.startswith("first_stage_model.")}


def make_file(pipe, name, *, unet_targets, te_targets, rank, alpha, fmt, dora=False, seed=0):
    """Our LoRA (random factors, DoRA magnitudes perturbed) saved by save_lora to $OUT/loras/<name>.safetensors."""
    comps = [("unet", pipe.unet, unet_targets)]
    if te_targets is not None:
        comps += [(c, getattr(pipe, c), te_targets) for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    g = torch.Generator().manual_seed(seed)
    for _, m, t in comps:
        inject_lora(m, rank=rank, alpha=alpha, targets=t, use_dora=dora)
        with torch.no_grad():
            for p in lora_parameters(m):
                if p.dim() == 1 or (dora and "magnitude" in str(p.shape)):
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))  # DoRA magnitude: perturbed
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = os.path.join(H.LORA_DIR, f"{name}.safetensors")
    save_lora(path, **{c: m for c, m, _ in comps}, format=fmt, metadata={"name": name})
    for _, m, _ in comps:
        remove_lora(m)
    return path


def column_dora(pipe, src, name, seed=1):
    """A copy of kohya DoRA file ``src`` with LyCORIS' other dora_scale layout: one magnitude per input column,
    shape [1, in] ([1, in, 1, 1] for convs), from the base weight's column norms, perturbed."""
    from lora_diffusion.formats_kohya import canonical_key
    g = torch.Generator().manual_seed(seed)
    state = safetensors.torch.load_file(src)
    with safetensors.safe_open(src, "pt") as f:
        header = f.metadata()
    for k in [k for k in state if k.endswith(".dora_scale")]:
        comp, _, path = canonical_key(k[: -len(".dora_scale")]).partition(".")
        model = getattr(pipe, comp)
        try:
            w = model.get_submodule(path).weight
        except AttributeError:
            w = model.get_submodule(path.removeprefix("text_model.")).weight
        col = w.detach().float().transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        col = col * (1 + 0.2 * torch.randn(col.shape, generator=g))
        state[k] = col.reshape(1, w.shape[1], *[1] * (w.dim() - 2)).to(state[k].dtype)
    out = os.path.join(H.LORA_DIR, f"{name}.safetensors")
    header = dict(header, ss_output_name=name)
    safetensors.torch.save_file(state, out, header)
    return out


def ours(pipe, path, name, te, unet):
    """Our load_lora + set_adapters(unet weight, text_encoder=te weight) + fuse, in the original layout."""
    load_lora(pipe, path, adapter=name)
    set_adapters(pipe, {name: unet}, text_encoder={name: te})
    fuse(pipe)
    out = base_weights(pipe)
    unfuse(pipe)
    delete_adapter(pipe, name)
    return out


def compare(base, a1111, mine):
    """max |A1111 - ours| over all tensors, and over each the relative error ||A-O|| / ||O-base||; tensors changed.
    max_rel_both: the same relative error over the tensors both sides change only."""
    worst_abs, worst_rel, worst_both, changed_a, changed_o, only = 0.0, 0.0, 0.0, 0, 0, []
    for k, b in base.items():
        a, o = a1111[k].float(), mine[k].float()
        da, do = (a - b.float()).norm().item(), (o - b.float()).norm().item()
        changed_a += da > 0
        changed_o += do > 0
        if (da > 0) != (do > 0):
            only.append((k, da, do))
        d = (a - o).abs().max().item()
        worst_abs = max(worst_abs, d)
        if do > 0:
            rel = (a - o).norm().item() / do
            worst_rel = max(worst_rel, rel)
            if da > 0:
                worst_both = max(worst_both, rel)
    return dict(max_abs=worst_abs, max_rel=worst_rel, max_rel_both=worst_both, changed_a1111=changed_a,
                changed_ours=changed_o, changed_by_one_side_only=only[:10], n_one_side=len(only),
                one_side_keys=[k for k, _, _ in only])


class Verdicts:
    """Collects 'PASS|KNOWN|FAIL <check>: <detail>' lines; finish() writes them to $OUT/<script>_verdicts.json and
    exits 1 if any FAIL."""

    def __init__(self, script):
        self.script, self.rows = script, []

    def add(self, check, status, detail):
        self.rows.append(dict(check=check, status=status, detail=detail))
        print(f"{status} {check}: {detail}")
        sys.stdout.flush()

    def judge(self, check, agree, detail, known=None, known_why=""):
        """agree: the sides agree (PASS). Otherwise KNOWN if ``known`` (the documented signature holds), else FAIL."""
        if agree:
            self.add(check, "PASS", detail)
        elif known:
            self.add(check, "KNOWN", f"{detail} -- {known_why}")
        else:
            self.add(check, "FAIL", detail + (f" (expected difference would be: {known_why})" if known_why else ""))

    def finish(self):
        counts = {s: sum(r["status"] == s for r in self.rows) for s in ("PASS", "KNOWN", "FAIL")}
        with open(os.path.join(OUT, f"{self.script}_verdicts.json"), "w") as f:
            json.dump(self.rows, f, indent=1)
        print(f"{self.script}: {counts['PASS']} PASS, {counts['KNOWN']} KNOWN, {counts['FAIL']} FAIL")
        sys.exit(1 if counts["FAIL"] else 0)


def dump(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def clip_tokenizer():
    """CLIP-L's real BPE tokenizer, offline: vocab and merges rebuilt (in $OUT/clip_tok) from open_clip's
    bpe_simple_vocab_16e6.txt.gz, given as $CLIP_BPE."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    bpe = os.environ.get("CLIP_BPE")
    if not bpe or not os.path.isfile(bpe):
        raise SystemExit("set CLIP_BPE to open_clip's bpe_simple_vocab_16e6.txt.gz (see README.md)")
    d = os.path.join(OUT, "clip_tok")
    os.makedirs(d, exist_ok=True)
    merges = gzip.open(bpe).read().decode().split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(f"{d}/vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(f"{d}/merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt")

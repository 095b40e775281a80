"""Q4: A1111 prompts as conditioning. For each prompt of a corpus (emphasis, escapes, unbalanced brackets, prompts of
1-4 chunks, commas near a chunk's end, BREAK), A1111's own code against lora_diffusion.prompts:

- modules/prompt_parser.parse_prompt_attention vs our parse_emphasis (fragments and weights);
- sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.tokenize_line (real CLIP-L tokens, $CLIP_BPE; "Prompt word wrap
  length limit" 20) vs our prompt_chunks: every chunk's token ids and multipliers;
- its forward (emphasis "Original" at CLIP skip 1 and 2, and "No norm") on a small random CLIPTextModel with CLIP-L's vocabulary vs
  our prompt_embeds on the same encoder;
- modules/prompt_parser.get_learned_conditioning_prompt_schedules (prompt editing: [from:to:when], [a|b], nested,
  unparsable text; 10 and 20 steps, and a Hires. fix pass of 10 after 10 and 14 after 7) vs our prompt_schedule;
- A1111's infotext parsing (modules/infotext_utils: its param regex and unquote, taken from the file with ``ast``)
  on the infotext our generate writes vs our parse_infotext.

Pass: the same fragments and weights, the same ids and multipliers, conditioning within 1e-6 (max abs; same
float32 ops), the same parsed settings.
- textual inversions: a 3-vector and a 1-vector A1111 embedding file read by A1111's own create_embedding_from_data,
  registered in its EmbeddingDatabase, matched by find_embedding_at_position and put in by sd_hijack's
  EmbeddingsWithFixes (all four taken from their files with ``ast``) vs our load_embedding + prompt_embeds, on
  prompts naming them in any case, in brackets and at a chunk's end.
KNOWN: "BREAK" inside brackets: A1111 multiplies its marker's weight (-1) by the brackets', so the word is then
encoded as text with a negative weight; we break the chunk there as everywhere. An embedding's name inside a longer
word ("xbadthingx"): A1111 matches CLIP tokens, so not there; the tokenizer's added token, ours, matches it.
Writes $OUT/q4_verdicts.json."""
import ast
import json
import os
import re
from types import SimpleNamespace

import a1111_harness as H
import torch
from common import Verdicts, clip_tokenizer

from lora_diffusion.generate import infotext, parse_infotext
from lora_diffusion.prompts import (
    parse_emphasis,
    prompt_chunks,
    prompt_embeds,
    prompt_schedule,
)

V = Verdicts("q4")
TOK = clip_tokenizer()

opts = H.shared.opts
opts.comma_padding_backtrack = 20
opts.emphasis = "Original"
opts.CLIP_stop_at_last_layers = 1
opts.use_old_emphasis_implementation = False
opts.textual_inversion_add_hashes_to_infotext = False
H.devices.torch_npu_set_device = lambda: None

from modules import prompt_parser, sd_hijack_clip  # noqa: E402  (A1111's own)


class _NoEmbeddings:
    def find_embedding_at_position(self, tokens, offset):
        return None, None


class _Transformer(torch.nn.Module):
    """A CLIPTextModel as A1111's FrozenCLIPEmbedder holds it (``.text_model.final_layer_norm``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.text_model = SimpleNamespace(final_layer_norm=model.final_layer_norm if not hasattr(model, "text_model")
                                          else model.text_model.final_layer_norm)

    def forward(self, input_ids, output_hidden_states=False):
        return self.model(input_ids=input_ids, output_hidden_states=bool(output_hidden_states))


def encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=TOK.bos_token_id,
                            eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # a final norm with a bias, as CLIP-L's (emphasis keeps each chunk's mean)
        getattr(model, "text_model", model).final_layer_norm.bias.normal_(0.3, 0.1)
    return model


LONG = ", ".join(f"word{i} thing" for i in range(40))
PROMPTS = [
    "a photo of a cat",
    "an (important) word",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "masterpiece, best quality, (red fox:1.4), [[blurry]], \\(literal\\) brackets",
    "(unbalanced open, and more",
    "stray) close and ] square",
    "(negative:-0.5) and (zero:0)",
    "escaped \\\\ backslash and \\[square\\]",
    "first part BREAK second part BREAK (third:1.2)",
    LONG,
    "(" + LONG + ":1.1)",
    "a " * 74 + ", " + "b " * 10,  # a comma at the end of the first chunk: its tail moves
    "a " * 50 + ", " + "c " * 40,  # the comma is more than 20 tokens back: a plain cut
    " ".join(["x"] * 75) + " tail",  # exactly 75 tokens, then one more
    " ".join(["y"] * 75),  # exactly one full chunk
    ", ".join(["tag"] * 120),  # ~4 chunks
    "",
    "BREAK",
    "(inside BREAK brackets)",  # KNOWN
]


def a1111_parts():
    hijack = SimpleNamespace(embedding_db=_NoEmbeddings(), fixes=None, extra_generation_params={})
    te = encoder()
    wrapped = SimpleNamespace(tokenizer=TOK, transformer=_Transformer(te))
    clip = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(wrapped, hijack)
    ours = SimpleNamespace(tokenizer=TOK, text_encoder=te)
    return clip, ours


def a1111_infotext_parser():
    """A1111's param regex and unquote, from modules/infotext_utils.py (it imports gradio and the UI at the top)."""
    source = open(os.path.join(H.WEBUI, "modules", "infotext_utils.py")).read()
    tree = ast.parse(source)
    ns = {"re": re, "json": json}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("re_param_code", "re_param", "re_imagesize")
                                                for t in node.targets):
            exec(compile(ast.Module([node], []), "infotext_utils", "exec"), ns)
        if isinstance(node, ast.FunctionDef) and node.name in ("unquote", "quote"):
            exec(compile(ast.Module([node], []), "infotext_utils", "exec"), ns)
    return ns


def from_file(relative, names, ns):
    """Top-level classes / functions ``names`` of an A1111 file, run in namespace ``ns`` (the file's imports pull in
    the webui's UI)."""
    tree = ast.parse(open(os.path.join(H.WEBUI, relative)).read())
    nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
    assert {n.name for n in nodes} == set(names), names
    exec(compile(ast.Module(nodes, []), relative, "exec"), ns)
    return ns


SCHEDULES = [
    "test", "a [b:3]", "a [b: 3]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e", "a [unbalanced",
    "a [b:.5] c", "a [{b|d{:.5] c", "((a][:b:c [d:3]", "[a|(b:1.1)]", "[fe|]male", "[fe|||]male", "[a:b:0.5] [c|d]",
    "x [a:b:c:2]", "(a [b:2]:1.2)", "[a:(b:1.3):4]", "a | b", "[a|b|c] [x:y:7]", "a ]", "[ :3]", "[a:b: 2 ]",
    "[a:b:2.0]", "[a:b:-1]", "[a:b:0]", "[:x:0.5]", "a \\[b:3\\]", "a \\", "(red:1.2), [blue], BREAK x", "[a:b:1e1]",
    "a (b [c|d]) e", "[[a:b:2]|c]", "(a:[b:c:2])", ")(", "a:b", "[a]", "[a:]", "[:]", "[|]", "(a:b:c)", "((a)",
    "[a:b:c]", "\\(x\\) [y:2]", "a\nb [c:2]", "[a:b:+3]", "[a:b:3.]",
    "a [b:c:.5] [d|e|f] (g:1.2) [h::3]",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][: in "
    "background:0.25] [shoddy:masterful:0.5]",
]


EMB_PROMPTS = [
    ("a badthing cat", "badthing"),
    ("a BadThing cat, (BADTHING:1.3), [tiny]", "tiny"),
    ("a " * 73 + "badthing cat", "x"),  # 73 + 3 vectors > 75: moved on whole
    ("a " * 74 + "tiny badthing", ""),
    ("a xbadthingx cat", ""),  # KNOWN
]


def embeddings_check(tmp):
    """A1111's textual inversion path against ours, on the same CLIP text model and files."""
    import copy

    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    from lora_diffusion import load_embedding
    from lora_diffusion.testing import tiny_components

    te = encoder()
    width = te.config.hidden_size
    g = torch.Generator().manual_seed(5)
    files = {"BadThing": torch.randn(3, width, generator=g), "tiny": torch.randn(1, width, generator=g)}
    for name, vec in files.items():
        safetensors.torch.save_file({"emb_params": vec}, os.path.join(tmp, f"{name}.safetensors"))
    # A1111: its loader, database and embedding layer
    ns = {"torch": torch, "devices": SimpleNamespace(device=torch.device("cpu"), cond_cast_unet=lambda x: x),
          "hashes": SimpleNamespace(sha256=lambda *a, **k: None)}
    from_file("modules/textual_inversion/textual_inversion.py",
              ["Embedding", "EmbeddingDatabase", "create_embedding_from_data"], ns)
    from_file("modules/sd_hijack.py", ["EmbeddingsWithFixes"], ns)
    db = ns["EmbeddingDatabase"]()
    hijack = SimpleNamespace(embedding_db=db, fixes=None, extra_generation_params={})
    a_te = copy.deepcopy(te)
    emb = getattr(a_te, "text_model", a_te).embeddings
    emb.token_embedding = ns["EmbeddingsWithFixes"](emb.token_embedding, hijack)
    clip = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(SimpleNamespace(tokenizer=TOK, transformer=_Transformer(a_te)),
                                                            hijack)
    model = SimpleNamespace(cond_stage_model=SimpleNamespace(tokenize=clip.tokenize))
    for name in files:
        data = safetensors.torch.load_file(os.path.join(tmp, f"{name}.safetensors"))
        db.register_embedding(ns["create_embedding_from_data"](data, name, filename=name), model)
    # ours: a pipeline around a copy of the same encoder and tokenizer
    parts = tiny_components(0, cross_attention_dim=width)
    parts.update(tokenizer=copy.deepcopy(TOK), text_encoder=copy.deepcopy(te))
    pipe = StableDiffusionPipeline(**parts)
    for name in files:
        assert load_embedding(pipe, os.path.join(tmp, f"{name}.safetensors")) == name
    with torch.no_grad():
        for prompt, negative in EMB_PROMPTS:
            z = clip([prompt])
            mine = prompt_embeds(pipe, [prompt], [negative])["prompt_embeds"]
            diff = (z - mine).abs().max().item() if z.shape == mine.shape else float("inf")
            inside = "xbadthingx" in prompt
            V.judge(f"embedding {prompt[-30:]!r}", diff <= 1e-6, f"shape {tuple(z.shape)} / {tuple(mine.shape)}, "
                    f"max abs {diff:.2e}", known=inside and diff > 1e-3,
                    known_why="a name inside a longer word: A1111 does not match it, the tokenizer's added token does")


def main():
    import tempfile

    clip, ours = a1111_parts()
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            label = f"prompt {i} ({text[:30]!r}{'...' if len(text) > 30 else ''})"
            theirs = [(t, w) for t, w in prompt_parser.parse_prompt_attention(text)]
            mine = [(t, -1 if w is None else w) for t, w in parse_emphasis(text)]
            breaks_in_brackets = any(t == "BREAK" and w not in (-1,) for t, w in theirs)
            V.judge(f"parse {label}", theirs == mine, f"{len(mine)} fragments",
                    known=breaks_in_brackets, known_why="BREAK inside brackets")
            a_chunks, _ = clip.tokenize_line(text)
            o_chunks = prompt_chunks(TOK, text)
            same = [(c.tokens, c.multipliers) for c in a_chunks] == [(ids, w) for ids, w in o_chunks]
            V.judge(f"chunks {label}", same, f"{len(a_chunks)} / {len(o_chunks)} chunks",
                    known=breaks_in_brackets, known_why="BREAK inside brackets")
            for skip, mode in ((1, "Original"), (2, "Original"), (1, "No norm")):
                opts.CLIP_stop_at_last_layers, opts.emphasis = skip, mode
                z = clip([text])
                mine = prompt_embeds(ours, [text], clip_skip=skip, emphasis=mode)["prompt_embeds"]
                diff = (z - mine).abs().max().item() if z.shape == mine.shape else float("inf")
                V.judge(f"embeds clip skip {skip} {mode} {label}", diff <= 1e-6, f"shape {tuple(z.shape)}, max abs {diff:.2e}",
                        known=breaks_in_brackets, known_why="BREAK inside brackets")
            opts.CLIP_stop_at_last_layers, opts.emphasis = 1, "Original"

    for steps, hires in ((10, None), (20, None), (10, 10), (7, 14)):
        for text in SCHEDULES:
            theirs = [tuple(x) for x in prompt_parser.get_learned_conditioning_prompt_schedules([text], steps, hires)[0]]
            mine = prompt_schedule(text, hires or steps, base_steps=steps if hires else None)
            V.judge(f"schedule {text[:40]!r} steps {steps} hires {hires}", theirs == mine, f"{len(mine)} prompts")

    ns = a1111_infotext_parser()
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 42,
              "Size": "512x768", "Model hash": "0123456789", "Model": "v1-5, pruned: emaonly",
              "Lora hashes": "style: 0123456789ab, ink: ba9876543210", "Version": "lora_diffusion 0.1.0"}
    text = infotext("a (red:1.2) fox <lora:style:0.8>\nsecond line", "lowres, (bad hands:1.3)", params)
    theirs = {k: ns["unquote"](v) if v[:1] == '"' else v for k, v in ns["re_param"].findall(text.split("\n")[-1])}
    _, _, mine = parse_infotext(text)
    V.judge("infotext params", theirs == mine == {k: str(v) for k, v in params.items()}, f"{len(mine)} settings")
    quoted = all(ns["quote"](v) == (json.dumps(str(v)) if any(c in str(v) for c in ",\n:") else v)
                 for v in params.values())
    V.judge("infotext quoting", quoted, "A1111's quote() and ours quote the same values")
    with tempfile.TemporaryDirectory() as tmp:
        embeddings_check(tmp)
    V.finish()


if __name__ == "__main__":
    main()

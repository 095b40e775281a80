"""A1111 prompts (emphasis, long prompts, BREAK) as embeddings: A1111's parser and chunking rules, its "Original"
emphasis, and the pipelines' own embeddings for plain prompts, bit for bit."""

import numpy as np
import pytest
import torch

from lora_diffusion.prompts import encode_text, parse_emphasis, prompt_chunks, prompt_embeds
from lora_diffusion.testing import tiny_pipeline, tiny_sdxl_pipeline

SDXL_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_pipeline(0)
    with torch.no_grad():  # a final norm with a bias, as CLIP's: the states' mean, which emphasis keeps, is not ~0
        getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm.bias.normal_(0.3, 0.1)
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline(0)


@pytest.mark.parametrize("text, expect", [  # A1111's own examples (modules/prompt_parser.py), and edge cases
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[[faint]] x", [("faint", 1 / 1.1 / 1.1), (" x", 1.0)]),
    ("stray) and :2) and \\\\ slash", [("stray) and :2) and \\ slash", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_emphasis_as_a1111(text, expect):
    assert parse_emphasis(text) == expect


def test_parse_emphasis_refuses_a_bad_number():
    with pytest.raises(ValueError, match=r"'1\.2\.3' is not a number"):
        parse_emphasis("(red:1.2.3)")


def test_chunks_hold_the_whole_prompt_in_75_token_pieces(sd):
    tok = sd.tokenizer
    text = " ".join(f"word{i}" for i in range(60))  # no commas: no backtracking
    plain = tok(text, add_special_tokens=False).input_ids
    chunks = prompt_chunks(tok, text)
    assert len(chunks) == -(-len(plain) // 75) > 1
    for ids, weights in chunks:
        assert len(ids) == len(weights) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert weights == [1.0] * 77
    body = [t for ids, _ in chunks for t in ids[1:-1]]
    assert body[: len(plain)] == plain and set(body[len(plain):]) == {tok.eos_token_id}


def test_a_full_chunk_moves_the_words_after_its_last_comma(sd):
    tok = sd.tokenizer
    comma = tok.get_vocab()[",</w>"]
    head = "a " * 70 + ", "  # 70 tokens then a comma (token 71)
    tail = "b " * 10  # would fill the chunk past 75
    first, second = prompt_chunks(tok, head + tail)
    assert first[0][1:72] == [tok("a", add_special_tokens=False).input_ids[0]] * 70 + [comma]
    assert set(first[0][72:]) == {tok.eos_token_id}  # the b's moved on whole
    assert second[0][1:11] == tok(tail, add_special_tokens=False).input_ids
    far = prompt_chunks(tok, "a , " + "c " * 80)  # the comma is over 20 tokens back: a plain cut
    assert far[0][0][1:76] == tok("a , " + "c " * 73, add_special_tokens=False).input_ids


def test_break_starts_a_chunk_and_weights_follow_the_tokens(sd):
    tok = sd.tokenizer
    chunks = prompt_chunks(tok, "red BREAK (blue:1.5) x")
    assert len(chunks) == 2
    red = tok("red", add_special_tokens=False).input_ids
    assert chunks[0][0][1:1 + len(red)] == red and chunks[0][0][1 + len(red)] == tok.eos_token_id
    blue = tok("blue", add_special_tokens=False).input_ids
    assert chunks[1][1][1:1 + len(blue)] == [1.5] * len(blue) and chunks[1][1][1 + len(blue)] == 1.0
    assert prompt_chunks(tok, "(blue:1.5)", emphasis=False)[0][1] == [1.0] * 77  # taken literally


@pytest.mark.parametrize("negative", [None, [""], ["lowres, blurry"]])
def test_plain_prompts_give_the_pipelines_own_embeddings(sd, sdxl, negative):
    neg = None if negative is None else negative[0]
    ours = prompt_embeds(sd, ["a red cat, sitting"], negative)
    expect = sd.encode_prompt("a red cat, sitting", torch.device("cpu"), 1, True, neg)
    assert torch.equal(ours["prompt_embeds"], expect[0]) and torch.equal(ours["negative_prompt_embeds"], expect[1])
    ours = prompt_embeds(sdxl, ["a red cat, sitting"], negative)
    expect = sdxl.encode_prompt(prompt="a red cat, sitting", device=torch.device("cpu"), num_images_per_prompt=1,
                                do_classifier_free_guidance=True, negative_prompt=neg)
    for key, tensor in zip(SDXL_KEYS, expect):
        assert torch.equal(ours[key], tensor), key
    if negative is None:  # SDXL's zeros for no negative prompt
        assert not ours["negative_prompt_embeds"].any() and not ours["negative_pooled_prompt_embeds"].any()


def test_clip_skip_gives_that_layer(sd):
    ours = prompt_embeds(sd, ["a red cat"], ["blurry"], clip_skip=2)
    expect = encode_text(sd.tokenizer, sd.text_encoder, ["a red cat", "blurry"], "cpu", clip_skip=2)
    assert torch.equal(ours["prompt_embeds"], expect[:1]) and torch.equal(ours["negative_prompt_embeds"], expect[1:])
    assert not torch.equal(ours["prompt_embeds"], prompt_embeds(sd, ["a red cat"])["prompt_embeds"])


def test_emphasis_weighs_tokens_and_keeps_the_chunks_mean(sd):
    ids, weights = prompt_chunks(sd.tokenizer, "a (red:1.4) cat [sitting]")[0]
    assert 1.4 in weights and min(weights) == pytest.approx(1 / 1.1)
    with torch.no_grad():
        z = sd.text_encoder(torch.tensor([ids]))[0].double()
    w = torch.tensor(weights, dtype=torch.float64)[None, :, None]
    expect = z * w * (z.mean() / (z * w).mean())  # A1111's "Original" emphasis
    got = prompt_embeds(sd, ["a (red:1.4) cat [sitting]"])["prompt_embeds"]
    torch.testing.assert_close(got.double(), expect, rtol=0, atol=1e-5)
    assert (got - z).abs().max() > 1e-2  # it did weigh
    # a chunk whose weighted mean is 0 (a LayerNorm with no bias comes close): the weights alone, not A1111's NaN
    handle = sd.text_encoder.register_forward_hook(lambda module, args, out: [out.last_hidden_state.zero_(), None][1])
    try:
        assert torch.equal(prompt_embeds(sd, ["a (red:1.4) cat"])["prompt_embeds"], torch.zeros(1, 77, z.shape[-1]))
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_long_prompts_encode_chunk_by_chunk_and_pad_the_negative(which, sd, sdxl):
    pipe = sd if which == "sd" else sdxl
    first = " ".join(["a"] * 75)  # one token each
    prompt = first + " " + "blue cat"
    tokens = pipe.tokenizer(first, add_special_tokens=False).input_ids
    assert len(tokens) == 75  # the first chunk is exactly `first`
    ours = prompt_embeds(pipe, [prompt], ["blurry"])
    alone, blank = prompt_embeds(pipe, [first], ["blurry"]), prompt_embeds(pipe, [""], [""])
    assert ours["prompt_embeds"].shape[1] == 154
    assert torch.equal(ours["prompt_embeds"][:, :77], alone["prompt_embeds"])
    assert torch.equal(ours["negative_prompt_embeds"][:, :77], alone["negative_prompt_embeds"])
    assert torch.equal(ours["negative_prompt_embeds"][:, 77:], blank["prompt_embeds"])  # padded with ""
    assert not torch.equal(ours["prompt_embeds"][:, 77:], blank["prompt_embeds"])
    if which == "sdxl":  # the pooled text is the first chunk's
        assert torch.equal(ours["pooled_prompt_embeds"], alone["pooled_prompt_embeds"])
    image = pipe(**ours, num_inference_steps=1, output_type="np", height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[1:3] == (32, 32) and torch.isfinite(torch.from_numpy(image)).all()


def test_prompt_and_negative_lists_must_pair(sd):
    with pytest.raises(ValueError, match="2 prompts but 1 negative"):
        prompt_embeds(sd, ["a", "b"], ["c"])


def test_sd2_padding_after_the_end_token_as_its_pipeline(sd):
    """SD 2.x's tokenizer pads with "!" (id 0) after the end-of-text token, not with end-of-text tokens."""
    import copy

    pipe = copy.copy(sd)
    pipe.tokenizer = copy.deepcopy(sd.tokenizer)
    pipe.tokenizer.pad_token = "!"
    assert pipe.tokenizer.pad_token_id == 0 != pipe.tokenizer.eos_token_id
    ours = prompt_embeds(pipe, ["a red cat"], ["dark"])
    expect = pipe.encode_prompt("a red cat", torch.device("cpu"), 1, True, "dark")
    assert torch.equal(ours["prompt_embeds"], expect[0]) and torch.equal(ours["negative_prompt_embeds"], expect[1])
    assert not torch.equal(ours["prompt_embeds"], prompt_embeds(sd, ["a red cat"])["prompt_embeds"])


def test_multi_vector_textual_inversions_spell_out_and_stay_in_one_chunk():
    pipe = tiny_pipeline(0)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion([{"<tri>": torch.randn(3, width, generator=torch.Generator().manual_seed(1))}],
                                token=["<tri>"], tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    ours = prompt_embeds(pipe, ["a <tri> cat"], ["<tri>, dark"])
    expect = pipe.encode_prompt("a <tri> cat", torch.device("cpu"), 1, True, "<tri>, dark")  # diffusers spells it out
    assert torch.equal(ours["prompt_embeds"], expect[0]) and torch.equal(ours["negative_prompt_embeds"], expect[1])
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<tri>", "<tri>_1", "<tri>_2")]
    (first, _), (second, _) = prompt_chunks(pipe.tokenizer, " ".join(["a"] * 73) + " <tri>")
    assert first[74:] == [pipe.tokenizer.eos_token_id] * 3 and second[1:4] == ids  # 73 + 3 > 75: moved on whole


@pytest.mark.parametrize("layout", ["emb_params", "diffusers", "one vector"])
def test_load_embedding_takes_a1111_and_diffusers_files_under_their_file_name(tmp_path, layout):
    from safetensors.torch import save_file

    from lora_diffusion import load_embedding

    pipe = tiny_pipeline(0)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(1 if layout == "one vector" else 2, width, generator=torch.Generator().manual_seed(2))
    key = {"emb_params": "emb_params", "diffusers": "<concept>", "one vector": "x"}[layout]
    save_file({key: vectors[0] if layout == "one vector" else vectors}, tmp_path / "BadThing.safetensors")
    assert load_embedding(pipe, tmp_path / "BadThing.safetensors") == "BadThing"
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer("a badthing cat", add_special_tokens=False).input_ids  # any case, as A1111 finds it
    (chunk, _), = prompt_chunks(pipe.tokenizer, "a badthing cat")
    assert len(chunk[1:-1]) - chunk[1:-1].count(pipe.tokenizer.eos_token_id) == len(ids) + len(vectors) - 1
    spelled = [t for t in chunk[1:-1] if t >= len(pipe.tokenizer) - len(vectors)]
    assert torch.equal(table[spelled], vectors)
    assert load_embedding(pipe, tmp_path / "BadThing.safetensors") == "BadThing"  # again: left as it is
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == table.shape[0]


def test_load_embedding_refuses_what_is_not_one(tmp_path):
    from safetensors.torch import save_file

    from lora_diffusion import LoraFormatError, load_embedding

    pipe, sdxl = tiny_pipeline(0), tiny_sdxl_pipeline(0)
    save_file({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, tmp_path / "two.safetensors")
    with pytest.raises(LoraFormatError, match=r"two.safetensors: 2 tensors .* holds one"):
        load_embedding(pipe, tmp_path / "two.safetensors")
    save_file({"emb_params": torch.zeros(2, 7)}, tmp_path / "narrow.safetensors")
    with pytest.raises(LoraFormatError, match=r"narrow.safetensors: the vector of 'narrow' has shape \(2, 7\)"):
        load_embedding(pipe, tmp_path / "narrow.safetensors")
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x04")
    with pytest.raises(Exception, match="pickle"):
        load_embedding(pipe, tmp_path / "pickled.pt")
    save_file({"clip_l": torch.randn(2, sdxl.text_encoder.config.hidden_size),
               "clip_g": torch.randn(2, sdxl.text_encoder_2.config.hidden_size)}, tmp_path / "xl.safetensors")
    with pytest.raises(LoraFormatError, match="SDXL's"):
        load_embedding(pipe, tmp_path / "xl.safetensors")
    assert load_embedding(sdxl, tmp_path / "xl.safetensors") == "xl"
    assert "xl_1" in sdxl.tokenizer.get_vocab() and "xl_1" in sdxl.tokenizer_2.get_vocab()


def test_an_embedding_named_like_a_word_piece_is_found_by_its_pieces(tmp_path):
    from safetensors.torch import save_file

    from lora_diffusion import load_embedding

    pipe = tiny_pipeline(0)
    assert "x" in pipe.tokenizer.get_vocab()  # a word piece: it cannot be a new token of its own
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.randn(2, width)}, tmp_path / "x.safetensors")
    assert load_embedding(pipe, tmp_path / "x.safetensors") == "x"
    unit = [pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<x>", "<x>_1")]
    (ids, weights), = prompt_chunks(pipe.tokenizer, "a (x:1.2) cat")
    start = ids.index(unit[0])
    assert ids[start:start + 2] == unit and weights[start:start + 2] == [1.2, 1.2]
    assert torch.equal(prompt_embeds(pipe, ["a x cat"])["prompt_embeds"],
                       prompt_embeds(pipe, ["a <x> cat"])["prompt_embeds"])


@pytest.mark.parametrize("prompt, steps, hires, expect", [  # A1111's own examples (prompt_parser.py) and the comment's
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[fe|||]male", 4, None, [(1, "female"), (2, "male"), (3, "male"), (4, "male")]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][: in "
     "background:0.25] [shoddy:masterful:0.5]", 100, None,
     [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
      (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
      (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
      (75, "fantasy landscape with a lake and an oak in background masterful"),
      (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
])
def test_prompt_schedule_as_a1111(prompt, steps, hires, expect):
    from lora_diffusion.prompts import prompt_schedule

    got = prompt_schedule(prompt, hires or steps, base_steps=steps if hires else None)
    assert got == expect


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_prompt_editing_switches_the_conditioning_at_its_step(which, sd, sdxl):
    from lora_diffusion.prompts import scheduled_prompt_kwargs

    pipe = sd if which == "sd" else sdxl
    seen = []  # what the UNet is given at each step: (text states, pooled text or None)

    def hook(_module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((kwargs["encoder_hidden_states"].clone(), added.get("text_embeds")))

    def run(prompt):
        seen.clear()
        kwargs = scheduled_prompt_kwargs(pipe, prompt, "dark", 4)
        image = pipe(**kwargs, num_inference_steps=4, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        return image, list(seen)

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (red, red_seen), (blue, blue_seen) = run("a red cat"), run("a blue cat")
        assert np.array_equal(run("a [red:blue:4] cat")[0], red)  # no switch within 4 steps
        assert np.array_equal(run("a [red:blue:0] cat")[0], blue)
        for prompt, colours in (("a [red:blue:2] cat", "rrrb"), ("a [red:blue:1] cat", "rrbb"), ("a [red|blue] cat", "rrbr")):
            _, got = run(prompt)  # A1111's steps: step s takes the first schedule entry ending at or after s
            for step, colour in enumerate(colours):
                expect = (red_seen if colour == "r" else blue_seen)[step]
                assert torch.equal(got[step][0], expect[0]), (prompt, step)
                assert expect[1] is None or torch.equal(got[step][1], expect[1]), (prompt, step)
    finally:
        handle.remove()


def test_no_norm_emphasis_weighs_without_restoring_the_mean(sd):
    from lora_diffusion.prompts import emphasis_mode

    ids, weights = prompt_chunks(sd.tokenizer, "a (red:1.4) cat [sitting]")[0]
    with torch.no_grad():
        z = sd.text_encoder(torch.tensor([ids]))[0]
    got = prompt_embeds(sd, ["a (red:1.4) cat [sitting]"], emphasis="no norm")["prompt_embeds"]
    torch.testing.assert_close(got, z * torch.tensor(weights)[None, :, None], rtol=0, atol=1e-6)  # A1111's "No norm"
    assert not torch.equal(got, prompt_embeds(sd, ["a (red:1.4) cat [sitting]"])["prompt_embeds"])
    assert (emphasis_mode(True), emphasis_mode(False), emphasis_mode("NONE")) == ("Original", "None", "None")
    with pytest.raises(ValueError, match="unknown emphasis mode 'strong'"):
        prompt_embeds(sd, ["a"], emphasis="strong")

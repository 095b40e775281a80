"""Text conditioning as kohya trains and A1111 generates: CLIP skip, and A1111's prompt emphasis and long prompts.

CLIP skip: a CLIP text encoder's Nth hidden state from the end through its final layer norm.

kohya's ``--clip_skip`` and A1111's "CLIP skip" count N from the end (1: the last layer, the default; 2: the
penultimate, for models trained so, such as NovelAI-derived SD 1.x anime models). diffusers counts the layers skipped
(``clip_skip=N-1``), applies it to the prompt only (A1111 also to the negative prompt) and, in 0.42 with transformers
>= 5.6 (whose CLIPTextModel has no ``text_model`` level), fails: ``prompt_kwargs`` gives a pipeline call the
embeddings instead.

A1111's prompts (``prompt_embeds``; with prompt editing, ``[from:to:when]``, ``[a|b]``:
``scheduled_prompt_kwargs``): ``(word)`` weighs a word 1.1x, ``((word))`` 1.21x, ``[word]`` 1/1.1x,
``(word:1.4)`` 1.4x (``\\(`` is a literal bracket); a prompt longer than 75 tokens is encoded in 75-token chunks
side by side (a chunk breaks at the last comma within 20 tokens of its end, and at ``BREAK``); each chunk's
states are multiplied by the weights and rescaled to their former mean (A1111's "Original" emphasis). A plain
prompt of up to 75 tokens gives the pipeline's own embeddings, bit for bit.

Example:
    >>> image = pipe(**prompt_kwargs(pipe, ["a cat"], clip_skip=2), num_inference_steps=20).images[0]
    >>> image = pipe(**prompt_embeds(pipe, ["a (red:1.3) cat, [blurry]"], ["lowres"]), num_inference_steps=20).images[0]
"""

from __future__ import annotations

import re

import torch

__all__ = ["encode_text", "prompt_kwargs", "token_ids", "weighted_token_ids", "check_clip_skip", "parse_emphasis", "prompt_chunks",
           "prompt_embeds", "prompt_schedule", "scheduled_prompt_kwargs", "EMPHASIS_MODES", "emphasis_mode"]

CHUNK_TOKENS = 75  # a chunk's prompt tokens; with its start and end tokens, the text encoder's 77
COMMA_BACKTRACK = 20  # A1111's "prompt word wrap length limit"
ROUND, SQUARE = 1.1, 1 / 1.1  # (word), [word]
BREAK = None  # the weight of a BREAK marker in parse_emphasis' output
EMPHASIS_MODES = ("Original", "No norm", "None")  # A1111's: weights then the mean restored; weights alone; literal text
ALIASES_ATTR = "_lora_embedding_aliases"  # tokenizer attribute: {ids of a name: id of the token its vectors hold}


def token_ids(tokenizer, captions: list[str], device, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids of ``captions``, padded and cut to the tokenizer's length (77), as SD's pipelines make them. With
    ``max_token_length`` past 75 (kohya's ``--max_token_length`` 150 / 225): ``[B, n, 77]`` as kohya makes them, each
    caption cut at that many tokens and split into n chunks of 75, each between the first and the last token (where
    the tokenizer pads with another token than its end token, SD 2's and SDXL's, a chunk that stops mid-text ends with
    the end token and an empty one starts with it)."""
    length = tokenizer.model_max_length
    long = max_token_length is not None and max_token_length > length - 2
    ids = tokenizer(captions, padding="max_length", max_length=max_token_length + 2 if long else length, truncation=True,
                    return_tensors="pt").input_ids
    return (_chunk_ids(tokenizer, ids) if long else ids).to(device)


def _chunk_ids(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """``[B, m + 2]`` ids as kohya's ``[B, n, 77]`` chunks of 75 (``token_ids``)."""
    inner, pad, end = tokenizer.model_max_length - 2, tokenizer.pad_token_id, tokenizer.eos_token_id
    chunks = []
    for start in range(1, ids.shape[1] - 1, inner):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + inner], ids[:, -1:]], dim=1)
        if pad != end:
            chunk[(chunk[:, -2] != end) & (chunk[:, -2] != pad), -1] = end
            chunk[chunk[:, 1] == pad, 1] = end
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def weighted_token_ids(tokenizer, captions: list[str], device, max_token_length: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's ``--weighted_captions``: ``(ids, weights)`` of ``captions`` read with A1111's emphasis
    (``parse_emphasis``; ``BREAK`` is a word there, as in kohya's older parser), each fragment tokenized alone, cut
    at ``max_token_length`` (75 by default) tokens and padded as ``token_ids`` pads, in its shape; the weights 1 on
    the first, last and padding tokens. ``apply_token_weights`` weighs the encoder's states by them."""
    length = tokenizer.model_max_length
    long = max_token_length is not None and max_token_length > length - 2
    size = max_token_length + 2 if long else length
    rows, weights = [], []
    for caption in captions:
        tokens: list[int] = []
        scale: list[float] = []
        for fragment, weight in parse_emphasis(caption):
            piece = tokenizer("BREAK" if weight is None else fragment).input_ids[1:-1]
            tokens += piece
            scale += [1.0 if weight is None else weight] * len(piece)
        tokens, scale = tokens[: size - 2], scale[: size - 2]
        rows.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (size - 2 - len(tokens)))
        weights.append([1.0, *scale] + [1.0] * (size - 1 - len(scale)))
    ids, weights = torch.tensor(rows), torch.tensor(weights)
    if long:  # (the weights chunked as the ids: 1 on each chunk's first and last token)
        ids = _chunk_ids(tokenizer, ids)
        inner = length - 2
        weights = torch.stack([torch.cat([torch.ones(len(rows), 1), weights[:, start : start + inner], torch.ones(len(rows), 1)], dim=1)
                               for start in range(1, size - 1, inner)], dim=1)
    return ids.to(device), weights.to(device)


def join_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """kohya's conditioning of chunked captions: the text encoder's states of ``[batch * n, 77]`` chunks as ``[batch,
    1 + 75n + 1, d]``: the first chunk's first state, each chunk's 75 inner states, the last chunk's last state."""
    size = states.shape[1]
    states = states.reshape(batch, -1, states.shape[-1])
    inner = [states[:, k * size + 1 : (k + 1) * size - 1] for k in range(states.shape[1] // size)]
    return torch.cat([states[:, :1], *inner, states[:, -1:]], dim=1)


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An encoder's states (``[B, T, d]``, chunks joined) weighed token by token by ``weighted_token_ids``' weights
    (``[B, 77]`` or ``[B, n, 77]``), as kohya's ``encode_tokens_with_weights`` weighs them (no mean restored)."""
    if weights.dim() == 3:
        weights = join_chunks(weights.flatten(0, 1)[..., None], weights.shape[0])[..., 0]
    return states * weights[..., None].to(states.dtype)


def encode_text(tokenizer, text_encoder, captions: list[str], device, clip_skip: int = 1,
                max_token_length: int | None = None, weighted: bool = False) -> torch.Tensor:
    """A CLIP text encoder's conditioning: its last hidden states, or (``clip_skip`` N > 1, kohya's and A1111's count)
    the Nth from the end through the final layer norm, as kohya trains and diffusers' ``clip_skip=N-1`` generates;
    ``max_token_length`` past 75: each chunk of ``token_ids`` encoded alone and joined (``join_chunks``), as kohya
    trains long captions; ``weighted``: the captions' ``(word:1.2)`` emphasis read and weighed as kohya's
    ``--weighted_captions`` (``weighted_token_ids``)."""
    if weighted:
        ids, weights = weighted_token_ids(tokenizer, captions, device, max_token_length)
        return apply_token_weights(encode_text_ids(text_encoder, ids, clip_skip), weights)
    return encode_text_ids(text_encoder, token_ids(tokenizer, captions, device, max_token_length), clip_skip)


def encode_text_ids(text_encoder, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """``encode_text`` of token ids (``[B, 77]``, or ``[B, n, 77]`` chunks, joined)."""
    flat = ids.flatten(0, 1) if ids.dim() == 3 else ids
    if clip_skip == 1:
        states = text_encoder(flat)[0]
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        model = getattr(text_encoder, "text_model", text_encoder)  # (transformers >= 5.6 has no text_model level)
        states = model.final_layer_norm(hidden)
    return states if ids.dim() == 2 else join_chunks(states, ids.shape[0])


def check_clip_skip(pipe, clip_skip: int, name: str = "clip_skip") -> None:
    """Raises ``ValueError`` (naming it ``name``) where ``clip_skip`` does not fit ``pipe``: SDXL conditions on both
    encoders' penultimate layers whatever it is (its pipeline, kohya's SDXL trainer), and no encoder has more layers
    than its own."""
    if clip_skip == 1:
        return
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError(f"{name} {clip_skip}: SDXL always conditions on both text encoders' penultimate layers (as its "
                         "pipeline and kohya's SDXL trainer do); leave it at 1")
    layers = pipe.text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"{name} {clip_skip}: the text encoder has {layers} layers (1-{layers})")


def prompt_kwargs(pipe, prompts: list[str], clip_skip: int = 1, negative: list[str] | None = None) -> dict:
    """An SD 1.x / 2.x pipeline call's prompt arguments: the prompts (and ``negative``), or, with ``clip_skip`` N > 1,
    their embeddings from that layer, the negative prompts' (default: empty) too, as A1111 conditions both."""
    if clip_skip == 1:
        return {"prompt": prompts, **({"negative_prompt": negative} if negative is not None else {})}
    device = pipe.text_encoder.device
    negative = negative if negative is not None else [""] * len(prompts)
    with torch.no_grad():
        return {"prompt_embeds": encode_text(pipe.tokenizer, pipe.text_encoder, prompts, device, clip_skip),
                "negative_prompt_embeds": encode_text(pipe.tokenizer, pipe.text_encoder, negative, device, clip_skip)}


# ---------------------------------------------------------------------------------------------- A1111 prompts
_EMPHASIS = re.compile(r"""\\.|\\$|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""", re.S)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float | None]]:
    """A1111's prompt emphasis: ``text`` as ``(fragment, weight)`` pairs, runs of one weight joined, and
    ``("BREAK", None)`` where the prompt says ``BREAK``. Unclosed brackets weigh what follows them to the end.

    Example:
        >>> parse_emphasis("a (red:1.3) cat, [blurry] BREAK (sky)")
        [('a ', 1.0), ('red', 1.3), (' cat, ', 1.0), ('blurry', 0.9090909090909091), ('', 1.0), ('BREAK', None),
         ('', 1.0), ('sky', 1.1)]
    """
    out: list[list] = []  # [fragment, weight]; weight None marks a BREAK
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            if item[1] is not BREAK:
                item[1] *= factor

    for m in _EMPHASIS.finditer(text):
        piece, number = m.group(0), m.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece in opened:
            opened[piece].append(len(out))
        elif number is not None and opened["("]:
            try:
                factor = float(number)
            except ValueError:
                raise ValueError(f"prompt emphasis {piece.strip()!r}: {number!r} is not a number") from None
            scale(opened["("].pop(), factor)
        elif piece == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif piece == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    out.append(["BREAK", BREAK])
                out.append([part, 1.0])
    for bracket, factor in (("(", ROUND), ("[", SQUARE)):
        for start in opened[bracket]:
            scale(start, factor)
    joined: list[list] = []
    for fragment, weight in out or [["", 1.0]]:
        if joined and weight is not BREAK and joined[-1][1] == weight:
            joined[-1][0] += fragment
        else:
            joined.append([fragment, weight])
    return [(fragment, weight) for fragment, weight in joined]


def emphasis_mode(emphasis: bool | str) -> str:
    """One of A1111's emphasis modes (``EMPHASIS_MODES``, any case) from a mode or a flag (``True``: ``"Original"``,
    ``False``: ``"None"``)."""
    if isinstance(emphasis, bool):
        return "Original" if emphasis else "None"
    mode = next((m for m in EMPHASIS_MODES if m.lower() == str(emphasis).strip().lower()), None)
    if mode is None:
        raise ValueError(f"unknown emphasis mode {emphasis!r}; choose from {', '.join(EMPHASIS_MODES)}")
    return mode


def prompt_chunks(tokenizer, text: str, *, emphasis: bool | str = True) -> list[tuple[list[int], list[float]]]:
    """``text`` as A1111 tokenizes it: chunks of 77 token ids (start, 75 prompt tokens or end-of-text padding, end)
    with a weight per token; a chunk that fills up moves the words after its last comma (within 20 tokens) on to the
    next, and ``BREAK`` starts a new one. Emphasis ``False`` / ``"None"`` takes brackets literally."""
    parsed = parse_emphasis(text) if emphasis_mode(emphasis) != "None" else [(text, 1.0)]
    pieces = [fragment for fragment, weight in parsed if weight is not BREAK]
    ids = iter(tokenizer(pieces, add_special_tokens=False, truncation=False, verbose=False).input_ids if pieces else [])
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # (not get_vocab(): it builds a 49408-entry dict, ~20 ms)
    comma = None if comma == tokenizer.unk_token_id else comma
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        pad = CHUNK_TOKENS - len(tokens)
        chunks.append(([start, *tokens, *[end] * pad, end], [1.0, *weights, *[1.0] * pad, 1.0]))
        tokens, weights, last_comma = [], [], -1

    groups = _vector_groups(tokenizer)
    aliases: dict[int, list[tuple[int, ...]]] = {}  # first id of a name -> the names' ids, longest first
    for name_ids in sorted(getattr(tokenizer, ALIASES_ATTR, {}), key=len, reverse=True):
        aliases.setdefault(name_ids[0], []).append(name_ids)
    for fragment, weight in parsed:
        if weight is BREAK:
            close()
            continue
        found = next(ids)
        position = 0
        while position < len(found):
            token = found[position]
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved = tokens[last_comma + 1:], weights[last_comma + 1:]
                del tokens[last_comma + 1:], weights[last_comma + 1:]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_TOKENS:
                close()
            name = next((n for n in aliases.get(token, ()) if tuple(found[position:position + len(n)]) == n), None)
            if name:  # a textual inversion named by word pieces (load_embedding's "<name>")
                token = getattr(tokenizer, ALIASES_ATTR)[name]
            unit = groups.get(token, (token,))  # a textual inversion's vectors stay in one chunk, as in A1111
            if len(tokens) + len(unit) > CHUNK_TOKENS:
                close()
            tokens += unit
            weights += [weight] * len(unit)
            position += len(name) if name else 1
    if tokens or not chunks:
        close()
    return chunks


def _vector_groups(tokenizer) -> dict[int, tuple[int, ...]]:
    """The multi-vector textual inversions of ``tokenizer`` (diffusers' ``load_textual_inversion`` adds ``<t>``,
    ``<t>_1``, ...): ``{id of <t>: ids of all its vectors}``, which stand for ``<t>`` wherever a prompt names it (as
    diffusers' ``maybe_convert_prompt`` spells them out)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    groups = {}
    for token, first in added.items():
        ids, i = [first], 1
        while f"{token}_{i}" in added:
            ids.append(added[f"{token}_{i}"])
            i += 1
        if len(ids) > 1:
            groups[first] = tuple(ids)
    return groups


def _encode_chunks(tokenizer, text_encoder, chunks, layer: int, final_norm: bool, keep_mean: bool = True):
    """One prompt's chunks through ``text_encoder``, one by one as A1111 encodes them: the states of hidden layer
    ``layer`` (-1: the last, through the final norm; -N with ``final_norm``: CLIP skip), weighted, side by side; and
    the encoder's first output for the first chunk (the pooled text of SDXL's second encoder). ``keep_mean``: each
    weighted chunk gets its former mean back (A1111's "Original"; else "No norm")."""
    device = text_encoder.device
    pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
    states, first = [], None
    for ids, weights in chunks:
        ids = torch.tensor([ids], device=device)
        if pad is not None and pad != end:  # (SD 2.x, SDXL's second tokenizer: padding after the end-of-text token)
            ids = ids.masked_fill((ids == end).int().cumsum(-1) - (ids == end).int() > 0, pad)
        out = text_encoder(ids, output_hidden_states=layer != -1)
        z = out[0] if layer == -1 else out.hidden_states[layer]
        if final_norm:
            z = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(z)
        if any(w != 1 for w in weights):  # A1111's emphasis: weigh the tokens ("Original": keep the chunk's mean)
            w = torch.tensor(weights, device=device)[None, :, None]
            weighted = z.float() * w
            ratio = z.float().mean() / weighted.mean()
            # (a weighted mean of 0, as a LayerNorm with no bias can give: A1111 divides by it and draws NaN; here
            # the weights stand alone)
            z = (weighted * ratio if keep_mean and torch.isfinite(ratio) else weighted).to(z.dtype)
        states.append(z)
        first = out[0] if first is None else first
    return torch.cat(states, dim=1), first


def prompt_embeds(pipe, prompts: list[str], negative: list[str] | None = None, *, clip_skip: int = 1,
                  emphasis: bool | str = True) -> dict:
    """A pipeline call's prompt arguments for A1111-style prompts (SD 1.x / 2.x and SDXL): emphasis, prompts of any
    length, ``BREAK``, CLIP skip (A1111's count, SD 1.x / 2.x), the negative prompts (default: empty) alike.
    ``emphasis``: A1111's mode, ``"Original"`` (``True``), ``"No norm"`` or ``"None"`` (``False``).

    Where a prompt and its negative differ in chunks, the shorter is padded with the empty prompt's chunks, as
    A1111's "Pad prompt/negative prompt" does (diffusers takes one length for both). SDXL without ``negative``: zeros,
    as diffusers' pipeline without a negative prompt and A1111 with an empty one.

    Example:
        >>> image = pipe(**prompt_embeds(pipe, ["masterpiece, (red:1.2) fox BREAK snow"], ["lowres"])).images[0]
    """
    check_clip_skip(pipe, clip_skip)
    emphasis = emphasis_mode(emphasis)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    zeros = negative is None and sdxl and getattr(pipe.config, "force_zeros_for_empty_prompt", True)
    negative = negative if negative is not None else [""] * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative)} negative prompts")
    encoders = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])

    def encode(text: str):
        states, pooled = [], None
        for tokenizer, encoder in encoders:
            chunks = prompt_chunks(tokenizer, text, emphasis=emphasis)
            layer, norm = (-2, False) if sdxl else (-clip_skip, clip_skip > 1)
            s, pooled = _encode_chunks(tokenizer, encoder, chunks, layer, norm, keep_mean=emphasis == "Original")
            states.append(s)
        return torch.cat(states, dim=-1), pooled

    with torch.no_grad():
        conds = [encode(t) for t in prompts]
        unconds = [tuple(map(torch.zeros_like, encode(t))) if zeros else encode(t) for t in negative]
        length = max(s.shape[1] for s, _ in conds + unconds)
        blank = encode("")[0] if any(s.shape[1] < length for s, _ in conds + unconds) else None
        padded = [(torch.cat([s] + [blank] * ((length - s.shape[1]) // blank.shape[1]), dim=1), p)
                  if s.shape[1] < length else (s, p) for s, p in conds + unconds]
    n = len(prompts)
    out = {"prompt_embeds": torch.cat([s for s, _ in padded[:n]]),
           "negative_prompt_embeds": torch.cat([s for s, _ in padded[n:]])}
    if sdxl:
        out["pooled_prompt_embeds"] = torch.cat([p for _, p in padded[:n]])
        out["negative_pooled_prompt_embeds"] = torch.cat([p for _, p in padded[n:]])
    return out


# ---------------------------------------------------------------------------------------------- prompt editing
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_NOT_IN_PROMPT = set(")]:|")


class _NoParse(Exception):
    """The text is not A1111's prompt-editing syntax there."""


def _parse_seq(text: str, i: int, stops: str, closed: bool = True) -> tuple[list, int]:
    """Nodes from ``i`` up to a character of ``stops`` (the caller checks which; the end of ``text`` fails a
    ``closed`` one); a stray ``) ] : |`` or a lone backslash fails the parse. Nodes: text, ``("emph", open, inner, weight | None, close)``, ``("sched", before |
    None, after, when)``, ``("alt", options)``."""
    nodes: list = []
    while i < len(text):
        c = text[i]
        if c in stops:
            return nodes, i
        if c in "([":
            node, i = _parse_bracket(text, i)
            nodes.append(node)
        elif c in _NOT_IN_PROMPT:
            raise _NoParse
        else:
            j = i
            while j < len(text) and text[j] not in "([" and text[j] not in _NOT_IN_PROMPT:
                if text[j] == "\\":
                    if j + 1 == len(text):
                        raise _NoParse
                    j += 1
                j += 1
            nodes.append(text[i:j])
            i = j
    if closed:
        raise _NoParse  # unclosed
    return nodes, i


def _parse_bracket(text: str, i: int) -> tuple[tuple, int]:
    if text[i] == "(":
        inner, j = _parse_seq(text, i + 1, ":)")
        if text[j] == ")":
            return ("emph", "(", inner, None, ")"), j + 1
        weight, k = _parse_seq(text, j + 1, ")")
        return ("emph", "(", inner, weight, ")"), k + 1
    first, j = _parse_seq(text, i + 1, ":|]")
    if text[j] == "]":
        return ("emph", "[", first, None, "]"), j + 1
    if text[j] == "|":
        options = [first]
        while text[j] == "|":
            option, j = _parse_seq(text, j + 1, "|]")
            options.append(option)
        return ("alt", options), j + 1
    when = _WHEN.match(text, j + 1)
    if when:  # [to:when]: added at that step
        return ("sched", None, first, when.group(1)), when.end()
    second, k = _parse_seq(text, j + 1, ":]")
    when = _WHEN.match(text, k + 1) if text[k] == ":" else None
    if not when:
        raise _NoParse
    return ("sched", first, second, when.group(1)), when.end()


def _parse_schedule(text: str) -> list:
    """The whole prompt's nodes: at its top level a bracket that does not parse, and a stray ``) ] :``, are text."""
    nodes: list = []
    i = 0
    while i < len(text):
        if text[i] in "([":
            try:
                node, i = _parse_bracket(text, i)
                nodes.append(node)
                continue
            except _NoParse:
                pass
        if text[i] in "([)]:":
            nodes.append(text[i])
            i += 1
            continue
        found, i = _parse_seq(text, i, "([)]:", closed=False)
        nodes += found
    return nodes


def prompt_schedule(prompt: str, steps: int, *, base_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's prompt editing: ``[from:to:when]`` (``to`` after ``when``), ``[to:when]`` (added), ``[from::when]``
    (removed), ``[a|b]`` (alternating each step), nested; ``when`` with a decimal point is a fraction of ``steps``,
    else a step. Returns ``[(last step, prompt), ...]``: step s (from 0) takes the first with ``last step >= s``, as
    A1111 counts. A prompt that does not parse is taken whole. ``base_steps``: the first pass's steps, for a Hires.
    fix pass of ``steps`` (A1111's offsets: a step counts on from the first pass, a fraction from 1).

    Example:
        >>> prompt_schedule("a [red:blue:0.5] cat", 10)
        [(5, 'a red cat'), (10, 'a blue cat')]
    """
    try:
        nodes = _parse_schedule(prompt)
    except _NoParse:
        return [(steps, prompt)]
    int_offset, flt_offset = (0, 0.0) if base_steps is None else (base_steps, 1.0)
    ends = {steps}

    def when(text: str) -> int:
        v = float(text)
        v = (v - flt_offset) * steps if "." in text else v - int_offset
        return min(steps, int(v))

    def collect(items) -> None:
        for node in items:
            if isinstance(node, str):
                continue
            if node[0] == "emph":
                collect(node[2])
                collect(node[3] or [])
            elif node[0] == "sched":
                collect(node[1] or [])
                collect(node[2])
                if when(node[3]) >= 1:
                    ends.add(when(node[3]))
            else:
                ends.update(range(1, steps + 1))
                for option in node[1]:
                    collect(option)

    def render(items, step: int) -> str:
        out = []
        for node in items:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "emph":
                weight = "" if node[3] is None else ":" + render(node[3], step)
                out.append(node[1] + render(node[2], step) + weight + node[4])
            elif node[0] == "sched":
                out.append(render(node[1] or [], step) if step <= when(node[3]) else render(node[2], step))
            else:
                out.append(render(node[1][(step - 1) % len(node[1])], step))
        return "".join(out)

    collect(nodes)
    return [(end, render(nodes, end)) for end in sorted(ends)]


def scheduled_prompt_kwargs(pipe, prompt: str, negative: str | None, steps: int, *, clip_skip: int = 1,
                            emphasis: bool | str = True, base_steps: int | None = None) -> dict:
    """A pipeline call's prompt arguments for one A1111 prompt with prompt editing (``prompt_schedule``), its negative
    prompt alike: the first step's embeddings, and, where they change, a ``callback_on_step_end`` that gives each
    step its own (every prompt of the schedule padded to one length). ``negative=None``: as in ``prompt_embeds``.

    Example:
        >>> image = pipe(**scheduled_prompt_kwargs(pipe, "a [red:blue:0.5] cat", "lowres", 20),
        ...              num_inference_steps=20).images[0]
    """
    plan = prompt_schedule(prompt, steps, base_steps=base_steps)
    plan_neg = prompt_schedule(negative, steps, base_steps=base_steps) if negative is not None else [(steps, None)]
    n = max(len(plan), len(plan_neg))
    prompts = [t for _, t in plan] + [plan[-1][1]] * (n - len(plan))
    negatives = None if negative is None else [t for _, t in plan_neg] + [plan_neg[-1][1]] * (n - len(plan_neg))
    out = prompt_embeds(pipe, prompts, negatives, clip_skip=clip_skip, emphasis=emphasis)
    if len(plan) == len(plan_neg) == 1:
        return out

    def pick(schedule, step: int) -> int:  # A1111: the first whose last step is at or after it
        return next((i for i, (end, _) in enumerate(schedule) if end >= step), len(schedule) - 1)

    sdxl = "pooled_prompt_embeds" in out
    first = {k: v[pick(plan if k in ("prompt_embeds", "pooled_prompt_embeds") else plan_neg, 0)][None]
             for k, v in out.items()}

    def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
        p, q = pick(plan, i + 1), pick(plan_neg, i + 1)  # (for the next step)
        cfg = tensors["prompt_embeds"].shape[0] == 2
        pair = (out["negative_prompt_embeds"][q:q + 1], out["prompt_embeds"][p:p + 1])
        new = {"prompt_embeds": torch.cat(pair if cfg else pair[1:]).to(tensors["prompt_embeds"])}
        if sdxl:
            pooled = (out["negative_pooled_prompt_embeds"][q:q + 1], out["pooled_prompt_embeds"][p:p + 1])
            new["add_text_embeds"] = torch.cat(pooled if cfg else pooled[1:]).to(tensors["add_text_embeds"])
        return new

    inputs = ["prompt_embeds"] + (["add_text_embeds"] if sdxl else [])
    return {**first, "callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": inputs}

"""Text conditioning with CLIP skip, as kohya trains and A1111 generates: a CLIP text encoder's Nth hidden state from
the end through its final layer norm.

kohya's ``--clip_skip`` and A1111's "CLIP skip" count N from the end (1: the last layer, the default; 2: the
penultimate, for models trained so, such as NovelAI-derived SD 1.x anime models). diffusers counts the layers skipped
(``clip_skip=N-1``), applies it to the prompt only (A1111 also to the negative prompt) and, in 0.42 with transformers
>= 5.6 (whose CLIPTextModel has no ``text_model`` level), fails: ``prompt_kwargs`` gives a pipeline call the
embeddings instead.

Example:
    >>> image = pipe(**prompt_kwargs(pipe, ["a cat"], clip_skip=2), num_inference_steps=20).images[0]
"""

from __future__ import annotations

import torch

__all__ = ["encode_text", "prompt_kwargs", "token_ids", "check_clip_skip"]


def token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    """Token ids of ``captions``, padded and cut to the tokenizer's length (77), as SD's pipelines make them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(tokenizer, text_encoder, captions: list[str], device, clip_skip: int = 1) -> torch.Tensor:
    """A CLIP text encoder's conditioning: its last hidden states, or (``clip_skip`` N > 1, kohya's and A1111's count)
    the Nth from the end through the final layer norm, as kohya trains and diffusers' ``clip_skip=N-1`` generates."""
    ids = token_ids(tokenizer, captions, device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    model = getattr(text_encoder, "text_model", text_encoder)  # (transformers >= 5.6 has no text_model level)
    return model.final_layer_norm(hidden)


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

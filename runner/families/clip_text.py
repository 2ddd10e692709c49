"""Prompts and captions → UNet conditioning, laid out as kohya sd-scripts trains and A1111 generates.

A prompt is split into chunks of 75 tokens; each chunk is encoded on its own as
``BOS + tokens + EOS + padding`` (77 tokens). Inside a chunk the EOS follows the last real token and
the padding (the tokenizer's own pad token: ``<|endoftext|>`` for SD1.5, ``!`` for SDXL's second
tokenizer) fills the rest, as both A1111 and kohya lay it out; this also puts SDXL's pooled output
on the right token. Chunks are split every 75 tokens (kohya's way; A1111 additionally backtracks
to the last comma, which training does not do).

The encoded chunks are then joined in one of two ways (see :func:`encode_prompts`): training keeps
kohya's ``75 × chunks + 2`` tokens (one BOS, each chunk's 75 inner positions, one end token),
generation keeps A1111's ``77 × chunks`` (every chunk's BOS and EOS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .models import Base

CHUNK = 75  # real tokens per chunk; CLIP's 77 positions minus BOS and EOS

# A1111's attention syntax, token by token: escapes, brackets, a ":weight)" closer, plain text.
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_UP = 1.1


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # [B, 75 × chunks + 2 or 77 × chunks, D]; SDXL: TE1 and TE2 concatenated on D
    pooled: torch.Tensor | None  # SDXL: TE2's projected pooled output of the first chunk; None for SD1.5


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs with A1111's attention syntax.

    ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.5)`` ×1.5, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]``
    ``\\\\`` are literal, unclosed brackets apply to the end. Neighbouring runs with equal weight
    are merged. No library parses this syntax (diffusers only has it in community pipelines).
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), _UP)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / _UP)
        else:
            runs.append([tok, 1.0])
    for start in round_open:
        scale(start, _UP)
    for start in square_open:
        scale(start, 1 / _UP)

    merged: list[tuple[str, float]] = []
    for tok, w in runs:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + tok, w)
        else:
            merged.append((tok, w))
    return merged or [("", 1.0)]


def _tokenize(
    tokenizer: CLIPTokenizer, prompts: list[str], weighted: bool
) -> list[tuple[list[int], list[float]]]:
    """Token ids without BOS/EOS and one weight per token, untruncated."""
    if not weighted:
        ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
        return [(list(t), [1.0] * len(t)) for t in ids]
    out = []
    for prompt in prompts:
        runs = parse_weighted(prompt)
        run_ids = tokenizer(
            [t for t, _ in runs], add_special_tokens=False, truncation=False, verbose=False
        ).input_ids
        tokens = [i for ids in run_ids for i in ids]
        weights = [w for ids, (_, w) in zip(run_ids, runs, strict=True) for _ in ids]
        out.append((tokens, weights))
    return out


def _chunk_ids(
    tokenizer: CLIPTokenizer, tokens: list[int], weights: list[float], chunks: int
) -> tuple[list[list[int]], list[list[float]]]:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids_out, w_out = [], []
    for c in range(chunks):
        part = tokens[c * CHUNK : (c + 1) * CHUNK]
        part_w = weights[c * CHUNK : (c + 1) * CHUNK]
        fill = CHUNK - len(part)
        ids_out.append([bos, *part, eos] + [pad] * fill)
        w_out.append([1.0, *part_w, 1.0] + [1.0] * fill)
    return ids_out, w_out


def _hidden(
    encoder: CLIPTextModel | CLIPTextModelWithProjection, ids: torch.Tensor, layer: int, final_norm: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = encoder(ids, output_hidden_states=True)
    states = out.hidden_states[layer]
    if final_norm:
        # hidden_states[-1] is taken before the norm, so last_hidden_state equals hidden_states[-1] normed.
        # transformers 5: CLIPTextModel holds the norm itself, CLIPTextModelWithProjection under text_model.
        inner = getattr(encoder, "text_model", encoder)
        states = inner.final_layer_norm(states)
    return states, getattr(out, "text_embeds", None)


def _rescale(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token by its weight, then restore the mean over the last two dimensions."""
    before = states.float().mean(dim=(-2, -1), keepdim=True)
    weighted = states * weights
    after = weighted.float().mean(dim=(-2, -1), keepdim=True)
    # A checkpoint whose outputs average to ~0 would blow up the ratio; weighting alone is then
    # the best that can be done.
    ratio = torch.where(after.abs() > 1e-6, before / after, torch.ones_like(after))
    return weighted * ratio.to(states.dtype)


def _kohya_join(chunks: torch.Tensor) -> torch.Tensor:
    """[B, n, 77, ...] → [B, 75n + 2, ...]: the first chunk's BOS, each chunk's 75 inner positions and
    the last chunk's final position, as kohya's SD and SDXL text-encoding strategies join chunks."""
    return torch.cat([chunks[:, 0, :1], chunks[:, :, 1:-1].flatten(1, 2), chunks[:, -1, -1:]], dim=1)


def encode_prompts(
    base: Base,
    prompts: list[str],
    *,
    max_token_length: int | None = 75,
    clip_skip: int | None = None,
    weighted: bool = False,
    min_chunks: int = 1,
) -> Conditioning:
    """Encode ``prompts`` with the base's text encoders into UNet conditioning.

    ``max_token_length`` 75/150/225 is kohya's training layout: n = 1/2/3 chunks, tokens past 75n
    dropped, and the chunks joined into ``75n + 2`` tokens (the first BOS, each chunk's 75 inner
    positions, the last chunk's final position); with ``weighted`` each token is multiplied by its
    weight and the whole prompt's mean restored (kohya's ``get_weighted_text_embeddings``).
    ``None`` is A1111's generation layout: as many chunks as the longest prompt needs (at least
    ``min_chunks``), all ``77 × chunks`` tokens kept, and weighting restores each chunk's mean.
    ``clip_skip`` N > 1 takes the N-th last layer (through the final layer norm for SD1.5);
    SDXL always uses the penultimate layer without the norm unless N > 2 asks for an earlier one.
    SDXL's pooled output is the second encoder's projected EOS token of the first chunk.
    Gradients flow, so the trainer can train the text encoders through this.
    """
    if max_token_length is not None and max_token_length % CHUNK:
        raise ValueError(f"max_token_length must be a multiple of {CHUNK}, got {max_token_length}")
    per_encoder = [_tokenize(tok, prompts, weighted) for tok in base.tokenizers]
    if max_token_length is not None:
        chunks = max_token_length // CHUNK
    else:
        longest = max((len(t) for enc in per_encoder for t, _ in enc), default=0)
        chunks = max(min_chunks, -(-longest // CHUNK), 1)

    sdxl = base.family == "sdxl"
    skip = clip_skip or 1
    layer = -max(skip, 2) if sdxl else -skip
    batch = len(prompts)
    states_all, pooled = [], None
    for encoder, tokenizer, encoded in zip(base.text_encoders, base.tokenizers, per_encoder, strict=True):
        ids, weights = [], []
        for tokens, token_w in encoded:
            chunk_ids, chunk_w = _chunk_ids(tokenizer, tokens, token_w, chunks)
            ids += chunk_ids
            weights += chunk_w
        ids_t = torch.tensor(ids, device=encoder.device)
        states, embeds = _hidden(encoder, ids_t, layer, final_norm=not sdxl)
        states = states.reshape(batch, chunks, CHUNK + 2, states.shape[-1])
        w = torch.tensor(weights, device=states.device, dtype=states.dtype).view(batch, chunks, -1, 1)
        if max_token_length is not None:
            states, w = _kohya_join(states), _kohya_join(w)
        if weighted:
            states = _rescale(states, w)
        states_all.append(states.reshape(batch, -1, states.shape[-1]))
        if embeds is not None:
            pooled = embeds.reshape(batch, chunks, -1)[:, 0]
    hidden = torch.cat(states_all, dim=-1)
    return Conditioning(hidden_states=hidden, pooled=pooled if sdxl else None)

"""CLIP text: its tokenizer (from the vocabulary shipped in the package), the prompts and captions →
UNet conditioning of SD1.5 and SDXL, and which CLIP modules get LoRA under which kohya names.

Prompts are laid out as kohya sd-scripts trains and A1111 generates.

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

import gzip
import re
from functools import cache

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..spec import TrainSpec
from .model import CONFIGS
from .protocol import Base, Conditioning, Target

CLIP_BPE = CONFIGS / "bpe_simple_vocab_16e6.txt.gz"
# The real CLIP vocabulary has 49152 - 256 - 2 merges (the rest of the file is unused), as in
# OpenAI's and open_clip's tokenizers.
CLIP_NUM_MERGES = 49152 - 256 - 2
TINY_NUM_MERGES = 1000
# Tokens besides the merges: 256 byte characters, their end-of-word forms, start and end.
CLIP_BASE_TOKENS = 2 * 256 + 2

CHUNK = 75  # real tokens per chunk; CLIP's 77 positions minus BOS and EOS

# A1111's attention syntax, token by token: escapes, brackets, a ":weight)" closer, plain text.
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_UP = 1.1


# ---- tokenizers ----


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte→character table; transformers keeps it private, so it is restated here.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@cache
def _clip_vocab(num_merges: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    with gzip.open(CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = tuple(tuple(m.split()) for m in lines)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return tuple((tok, i) for i, tok in enumerate(vocab)), merges


def clip_tokenizer(num_merges: int = CLIP_NUM_MERGES, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the vocabulary file shipped in the package (no download).

    ``num_merges`` below the full count gives the small vocabulary the tiny models use. SDXL's
    second tokenizer pads with ``!`` instead of ``<|endoftext|>``.
    """
    vocab, merges = _clip_vocab(num_merges)
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def tiny_clip_config(vocab_size: int, act: str, hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


# ---- prompts ----


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

    # SDXL's layout, told by its second encoder's pooled projection: the penultimate layer without
    # the final norm, and the projected pooled output.
    sdxl = isinstance(base.text_encoders[-1], CLIPTextModelWithProjection)
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


# ---- LoRA on CLIP ----


def clip_targets(te: torch.nn.Module, spec: TrainSpec) -> list[Target]:
    """kohya's TEXT_ENCODER_TARGET_REPLACE_MODULE: the Linears of CLIP's attention and MLP."""
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    return [
        Target(f"{parent_name}.{child_name}", spec.network_dim, spec.network_alpha)
        for parent_name, parent in te.named_modules()
        if isinstance(parent, (CLIPAttention, CLIPMLP))
        for child_name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear)
    ]


def te_key(prefix: str, module: str) -> str:
    """kohya's key for a CLIP module: ``lora_te1_text_model_encoder_layers_0_…``."""
    # transformers 5's CLIPTextModel lost the text_model wrapper; A1111 and ComfyUI only map names with it.
    if not module.startswith("text_model."):
        module = "text_model." + module
    return f"{prefix}.{module}".replace(".", "_")

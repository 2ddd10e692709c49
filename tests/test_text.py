import pytest
import torch

from runner.families.clip_text import encode_prompts, parse_weighted
from runner.families.registry import load_base


@pytest.fixture(scope="module")
def sd15():
    return load_base("tiny:sd15")


@pytest.fixture(scope="module")
def sdxl():
    return load_base("tiny:sdxl")


def _long_prompt(words: int) -> str:
    # "a" is one token in the tiny vocabulary, so the word count is the token count.
    return " ".join(["a"] * words)


# ---- parse_weighted: A1111's own documented examples ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        (
            "a (b:1.5) [c] ((d))",
            [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1), (" ", 1.0), ("d", 1.21)],
        ),
        ("\\(x\\)", [("(x)", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_weighted_a1111_examples(text, expected):
    got = parse_weighted(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_parse_weighted_malformed_weight_is_text():
    assert parse_weighted("(x:.)") == [("x:.)", pytest.approx(1.1))]


# ---- shapes and chunking ----


@pytest.mark.parametrize(("max_len", "chunks"), [(75, 1), (150, 2), (225, 3)])
def test_fixed_chunk_count(sd15, max_len, chunks):
    cond = encode_prompts(sd15, ["a cat", _long_prompt(200)], max_token_length=max_len)
    assert cond.hidden_states.shape == (2, 75 * chunks + 2, 32)
    assert cond.pooled is None


def test_auto_chunk_count(sd15):
    assert encode_prompts(sd15, ["a cat"], max_token_length=None).hidden_states.shape[1] == 77
    assert encode_prompts(sd15, [_long_prompt(75)], max_token_length=None).hidden_states.shape[1] == 77
    assert encode_prompts(sd15, ["a", _long_prompt(76)], max_token_length=None).hidden_states.shape[1] == 154
    assert encode_prompts(sd15, [_long_prompt(300)], max_token_length=None).hidden_states.shape[1] == 77 * 4
    assert encode_prompts(sd15, ["a"], max_token_length=None, min_chunks=3).hidden_states.shape[1] == 231


def test_truncation_drops_tokens_past_the_limit(sd15):
    head = _long_prompt(75)
    a = encode_prompts(sd15, [head + " the the"], max_token_length=75).hidden_states
    b = encode_prompts(sd15, [head + " red red red"], max_token_length=75).hidden_states
    torch.testing.assert_close(a, b)


def test_generation_chunks_are_encoded_separately(sd15):
    # A1111's layout: the second chunk of a long prompt equals the tail encoded alone as its own first chunk.
    cond = encode_prompts(sd15, [_long_prompt(75) + " the red"], max_token_length=None).hidden_states
    tail = encode_prompts(sd15, ["the red"], max_token_length=None).hidden_states
    assert cond.shape[1] == 154
    torch.testing.assert_close(cond[:, 77:], tail)


# ---- kohya's training layout, written out from its TokenizeStrategy._get_input_ids and
# SdTextEncodingStrategy.encode_tokens / SdxlTextEncodingStrategy._get_hidden_states_sdxl ----


def kohya_input_ids(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """[n, 77] chunk ids for one caption (max_length = 75n + 2)."""
    ids = tokenizer(
        text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids[0]
    if max_length == 77:
        return ids[None]
    chunks = []
    for i in range(1, max_length - 77 + 2, 75):
        chunk = torch.cat((ids[0].unsqueeze(0), ids[i : i + 75], ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # v2 / SDXL's second tokenizer
            if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                chunk[-1] = tokenizer.eos_token_id
            if chunk[1] == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks)


def kohya_join(states: torch.Tensor, max_length: int) -> torch.Tensor:
    """[n, 77, D] encoded chunks → [1, 75n + 2, D]."""
    n = states.shape[0]
    states = states.reshape(1, -1, states.shape[-1])
    if max_length == 77:
        return states
    parts = [states[:, 0].unsqueeze(1)]
    for i in range(1, n * 77, 77):
        parts.append(states[:, i : i + 75])
    parts.append(states[:, -1].unsqueeze(1))
    return torch.cat(parts, dim=1)


def kohya_encode(base, text: str, max_token_length: int, weights_of=None):
    max_length = max_token_length + 2
    sdxl = base.family == "sdxl"
    states, pool = [], None
    for i, (te, tok) in enumerate(zip(base.text_encoders, base.tokenizers, strict=True)):
        ids = kohya_input_ids(tok, text, max_length)
        out = te(ids, output_hidden_states=True)
        hidden = out.hidden_states[-2] if sdxl else out.last_hidden_state
        joined = kohya_join(hidden, max_length)
        if weights_of is not None:
            # get_weighted_text_embeddings: weight each token, then restore the prompt's mean.
            w = weights_of(tok, max_token_length)[None, :, None]
            previous_mean = joined.float().mean(axis=[-2, -1])
            joined = joined * w
            current_mean = joined.float().mean(axis=[-2, -1])
            joined = joined * (previous_mean / current_mean).unsqueeze(-1).unsqueeze(-1)
        states.append(joined)
        if sdxl and i == 1:
            # _pool_workaround: the first EOS of the first chunk, through the projection.
            first_eos = torch.argmax((ids == tok.eos_token_id).int(), dim=1)
            pooled = out.last_hidden_state[torch.arange(len(ids)), first_eos]
            pool = te.text_projection(pooled)[:1]
    return torch.cat(states, dim=-1), pool


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("max_token_length", [75, 150, 225])
@pytest.mark.parametrize("words", [3, 74, 75, 80, 150, 160, 400])
def test_training_layout_is_kohyas(request, family, max_token_length, words):
    base = request.getfixturevalue(family)
    text = _long_prompt(words)
    cond = encode_prompts(base, [text], max_token_length=max_token_length)
    with torch.no_grad():
        want, pool = kohya_encode(base, text, max_token_length)
    assert cond.hidden_states.shape == want.shape == (1, max_token_length + 2, want.shape[-1])
    torch.testing.assert_close(cond.hidden_states, want)
    if family == "sdxl":
        torch.testing.assert_close(cond.pooled, pool)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weighted_long_caption_restores_the_whole_prompts_mean(request, family):
    base = request.getfixturevalue(family)
    runs = [(_long_prompt(70), 1.0), (" red", 1.5), (" " + _long_prompt(40), 1.0), (" cat", 0.5)]
    text = _long_prompt(70) + " (red:1.5) " + _long_prompt(40) + " (cat:0.5)"
    # The runs split at word boundaries, so the whole text without brackets has the runs' tokens.
    plain = "".join(run for run, _ in runs)

    def weights_of(tok, max_token_length):
        # get_prompts_with_weights: each run tokenized on its own, its weight on each of its tokens.
        weights = [w for run, w in runs for _ in tok(run).input_ids[1:-1]]
        weights = weights[:max_token_length]
        return torch.tensor([1.0] + weights + [1.0] * (max_token_length + 1 - len(weights)))

    cond = encode_prompts(base, [text], max_token_length=150, weighted=True)
    with torch.no_grad():
        want, _ = kohya_encode(base, plain, 150, weights_of=weights_of)
    torch.testing.assert_close(cond.hidden_states, want)


def test_chunk_layout_bos_text_eos_pad(sdxl):
    # Records the ids each encoder sees: BOS, the text, EOS right after it, then that tokenizer's pad.
    seen = []
    hooks = [
        te.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0][0].tolist()))
        for te in sdxl.text_encoders
    ]
    try:
        encode_prompts(sdxl, ["a cat"], max_token_length=75)
    finally:
        for h in hooks:
            h.remove()
    text = sdxl.tokenizers[0]("a cat", add_special_tokens=False).input_ids
    for ids, tok in zip(seen, sdxl.tokenizers, strict=True):
        assert len(ids) == 77
        assert ids[: len(text) + 2] == [tok.bos_token_id, *text, tok.eos_token_id]
        assert set(ids[len(text) + 2 :]) == {tok.pad_token_id}
    assert sdxl.tokenizers[1].convert_ids_to_tokens(seen[1][-1]) == "!"


# ---- weighting ----


def test_weighted_without_brackets_equals_literal(sd15):
    a = encode_prompts(sd15, ["a photo of a cat"], weighted=True).hidden_states
    b = encode_prompts(sd15, ["a photo of a cat"], weighted=False).hidden_states
    torch.testing.assert_close(a, b)


def test_weighting_scales_only_weighted_tokens_and_keeps_mean(sdxl):
    # SDXL's penultimate layer (no final layer norm) has a clearly non-zero mean to preserve.
    plain = encode_prompts(sdxl, ["a the red"], weighted=True).hidden_states[0]
    weighted = encode_prompts(sdxl, ["a (the:1.5) red"], weighted=True).hidden_states[0]
    the = 2  # BOS, "a", "the", ...
    w1, w2 = (te.config.hidden_size for te in sdxl.text_encoders)
    for half in (slice(0, w1), slice(w1, w1 + w2)):  # each encoder's chunk is rescaled on its own
        p, w = plain[:, half], weighted[:, half]
        assert w.mean().item() == pytest.approx(p.mean().item(), rel=1e-4)
        ratio = w / p
        factor = ratio[0, 0].item()
        assert factor != pytest.approx(1.0)
        others = torch.cat([ratio[:the], ratio[the + 1 :]])
        torch.testing.assert_close(others, torch.full_like(others, factor), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            ratio[the], torch.full_like(ratio[the], 1.5 * factor), rtol=1e-4, atol=1e-5
        )


def test_unweighted_text_keeps_parentheses(sd15):
    literal = encode_prompts(sd15, ["a (cat:1.5)"], weighted=False).hidden_states
    parsed = encode_prompts(sd15, ["a (cat:1.5)"], weighted=True).hidden_states
    assert not torch.allclose(literal, parsed)


# ---- clip skip ----


def test_clip_skip_sd15_matches_manual(sd15):
    te, tok = sd15.text_encoders[0], sd15.tokenizers[0]
    ids = tok("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = te(ids, output_hidden_states=True)
    last = encode_prompts(sd15, ["a cat"]).hidden_states
    torch.testing.assert_close(last, out.last_hidden_state)
    torch.testing.assert_close(encode_prompts(sd15, ["a cat"], clip_skip=1).hidden_states, last)
    skip2 = encode_prompts(sd15, ["a cat"], clip_skip=2).hidden_states
    torch.testing.assert_close(skip2, te.final_layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(skip2, last)


def test_sdxl_shapes_and_penultimate_layer(sdxl):
    cond = encode_prompts(sdxl, ["a cat", "a dog"], max_token_length=150)
    assert cond.hidden_states.shape == (2, 152, sdxl.unet.config.cross_attention_dim)
    assert cond.pooled is not None and cond.pooled.shape == (2, 32)

    te1, te2 = sdxl.text_encoders
    ids1 = sdxl.tokenizers[0]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = sdxl.tokenizers[1]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    first = encode_prompts(sdxl, ["a cat"])
    torch.testing.assert_close(
        first.hidden_states, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1)
    )
    torch.testing.assert_close(first.pooled, out2.text_embeds)
    torch.testing.assert_close(
        encode_prompts(sdxl, ["a cat"], clip_skip=2).hidden_states, first.hidden_states
    )
    skip3 = encode_prompts(sdxl, ["a cat"], clip_skip=3).hidden_states
    torch.testing.assert_close(skip3, torch.cat([out1.hidden_states[-3], out2.hidden_states[-3]], -1))


def test_sdxl_pooled_comes_from_first_chunk(sdxl):
    short = encode_prompts(sdxl, ["a cat"], max_token_length=75).pooled
    long = encode_prompts(sdxl, ["a cat"], max_token_length=225).pooled
    torch.testing.assert_close(short, long)


def test_gradients_reach_text_encoder(sd15):
    te = sd15.text_encoders[0]
    param = te.encoder.layers[0].self_attn.q_proj.weight
    param.requires_grad_(True)
    try:
        encode_prompts(
            sd15, ["a (cat:1.2)"], weighted=True, clip_skip=2
        ).hidden_states.square().sum().backward()
        assert param.grad is not None and param.grad.abs().sum() > 0
    finally:
        param.requires_grad_(False)
        param.grad = None


def test_bad_max_token_length(sd15):
    with pytest.raises(ValueError, match="multiple of 75"):
        encode_prompts(sd15, ["a"], max_token_length=100)


def test_runs_in_the_encoders_dtype():
    base = load_base("tiny:sdxl").to("cpu", torch.bfloat16)
    cond = encode_prompts(base, ["a (the:1.3) red"], weighted=True, max_token_length=None)
    assert cond.hidden_states.dtype == torch.bfloat16 and cond.pooled.dtype == torch.bfloat16
    assert torch.isfinite(cond.hidden_states).all()

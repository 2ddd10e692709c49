"""Florence-2 captioning: the caption text rules on real Florence-2 outputs, and whole jobs through
transformers' own generate with tiny models built here (no download)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.data.captioner import CaptionerError, caption_dataset, download_progress, resolve_captioner
from runner.data.captions import (
    caption_frequency,
    clean_caption,
    compose_caption,
    phrases,
    strip_boilerplate,
    trim_words,
)
from runner.spec import CaptionedEvent, CaptionSpec, FailedEvent, SpecError, StageEvent, parse_event
from runner.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
SAYS = "The image shows a woman with long hair. She is smiling at the camera."
WORDS = [*SAYS.split(), "cat", "sofa", "red", "blue"]
BOS, PAD, EOS = 0, 1, 2

# What Florence-2 really writes (transformers' integration tests and the model card's examples).
REAL = {
    "The image shows a stop sign sitting on the side of a street in Chinatown, New York City. The street is "
    "lined with buildings, trees, and statues, and there are people walking on the footpath. The sky is "
    "visible in the background.": "a stop sign sitting on the side of a street in Chinatown, New York City. "
    "The street is lined with buildings, trees, and statues, and there are people walking on the footpath. "
    "The sky is visible in the background.",
    "In this image, we can see a woman with long hair.": "a woman with long hair.",
    "In this image there are two cats on a sofa.": "two cats on a sofa.",
    "The image is a digital illustration of an anime girl with green hair.": "a digital illustration of an "
    "anime girl with green hair.",
    "This is a close-up of a cat.": "a close-up of a cat.",
    "This image depicts Tokyo Tower at night.": "Tokyo Tower at night.",
    "The picture shows NASA's rocket.": "NASA's rocket.",
    "A woman with long hair smiling.": "A woman with long hair smiling.",  # no boilerplate: untouched
}


def build_captioner(folder: Path, says: str | None = SAYS, seed: int = 0) -> Path:
    """A Florence-2 of a few kilobytes in transformers' format, with a word-level BART tokenizer.

    ``says``: its decoder is made a chain of next-token rules (each token's embedding one-hot, attention
    and MLP outputs zeroed, the LM head mapping token t's normalised embedding to the token after it),
    so generate writes ``says`` for every image. ``None``: random weights wide enough that each image
    gets its own text, to compare batches with single images."""
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        GenerationConfig,
        RobertaTokenizer,
    )

    # Byte-level BPE pieces: "Ġ" is the space before a word.
    chain = [says.split()[0], *("Ġ" + w for w in says.split()[1:])] if says else []
    pieces = list(dict.fromkeys([WORDS[0]] + ["Ġ" + w for w in WORDS[1:]] + chain))
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *pieces, "<image>"])}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 16, "width": 16}, do_center_crop=False)
    images.image_seq_length = 17  # (16 / patch stride 4)² patches + the pooled one
    d = 32
    config = Florence2Config(
        text_config=dict(
            model_type="bart", vocab_size=len(vocab), d_model=d, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
            max_position_embeddings=128, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS,
            decoder_start_token_id=EOS, tie_word_embeddings=False,
            init_std=0.02 if says else 1.0,
        ),
        vision_config=dict(
            depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
            embed_dim=[16], num_heads=[1], num_groups=[1], window_size=12, projection_dim=d, drop_path_rate=0.0,
            initializer_range=0.02 if says else 1.0,
        ),
        image_token_id=vocab["<image>"], tie_word_embeddings=False, initializer_range=0.02 if says else 1.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    if says:
        ids = [EOS, BOS, *(vocab[t] for t in chain), EOS]
        assert len(set(ids[1:])) == len(ids) - 1 and len(ids) <= d, "one rule per token, one dimension each"
        text = model.model.language_model
        with torch.no_grad():
            onehot = torch.zeros(len(vocab), d)
            for i, token in enumerate(ids[:-1]):
                onehot[token, i] = 1.0
            text.shared.weight.copy_(onehot)
            text.decoder.embed_tokens.weight.copy_(onehot)
            text.decoder.embed_positions.weight.zero_()
            layer = text.decoder.layers[0]
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
            normed = torch.nn.functional.layer_norm(onehot, (d,))
            head = torch.zeros(len(vocab), d)
            for token, after in zip(ids[:-1], ids[1:], strict=True):
                head[after] = 10 * normed[token]
            model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def says_dir(tmp_path_factory) -> Path:
    return build_captioner(tmp_path_factory.mktemp("florence"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return build_captioner(tmp_path_factory.mktemp("florence_random"), says=None)


def _dataset(root: Path, n: int = 3) -> Path:
    folder = root / "10_zzk"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((20 + 4 * i, 24, 3)) * 255).astype("uint8")).save(folder / f"{i:04d}.png")
    (folder / "0001.txt").write_text("zzk, 1girl, smile\n", encoding="utf-8")
    return root


def _read(root: Path, i: int) -> str:
    return (root / "10_zzk" / f"{i:04d}.txt").read_text(encoding="utf-8").strip()


def _caption(root: Path, captioner: Path, **kw) -> tuple[CaptionedEvent | FailedEvent, list]:
    events: list = []
    spec = CaptionSpec.parse({"train_data_dir": str(root), "captioner": str(captioner), **kw})
    return caption_dataset(spec, events.append), events


# ---- the text rules ----


@pytest.mark.parametrize(("raw", "expected"), list(REAL.items()))
def test_boilerplate_is_removed_from_real_outputs(raw, expected):
    assert strip_boilerplate(raw) == expected


def test_word_limit_cuts_at_sentences_then_commas():
    text = strip_boilerplate(next(iter(REAL)))
    assert trim_words(text, 100) == text
    assert trim_words(text, 30) == "a stop sign sitting on the side of a street in Chinatown, New York City."
    assert trim_words(text, 12) == "a stop sign sitting on the side of a street in Chinatown"  # at its comma
    assert trim_words(text, 8) == "a stop sign sitting on the side"  # no dangling "of"
    assert clean_caption("The image shows\na cat\x00 on a sofa.", max_words=3) == "a cat"


def test_trigger_styles_prefix_and_modes():
    body = "a woman with long hair."
    assert compose_caption(body, None, mode="replace", trigger="zzk") == "zzk, a woman with long hair."
    photo = compose_caption(body, "", mode="replace", trigger="zzk", style="photo_of", prefix="anime style")
    assert photo == "a photo of zzk, anime style, a woman with long hair."
    old = "zzk, 1girl, smile"
    assert compose_caption(body, old, mode="replace", trigger="zzk") == "zzk, a woman with long hair."
    assert (
        compose_caption(body, old, mode="append", trigger="zzk")
        == "zzk, 1girl, smile, a woman with long hair."
    )
    assert (
        compose_caption(body, old, mode="prepend", trigger="zzk")
        == "zzk, a woman with long hair. 1girl, smile"
    )
    # Captioning twice does not stack triggers or prefixes; a capital after the trigger goes.
    twice = compose_caption(
        "A cat.", photo, mode="append", trigger="zzk", style="photo_of", prefix="anime style"
    )
    assert twice == "a photo of zzk, anime style, a woman with long hair. A cat."
    assert compose_caption("A cat.", None, mode="replace", trigger="zzk") == "zzk, a cat."
    assert compose_caption("Tokyo at night.", None, mode="replace", trigger="zzk") == "zzk, Tokyo at night."
    assert compose_caption(body, "ずんだもん, 緑の髪", mode="append", trigger="ずんだもん") == (
        "ずんだもん, 緑の髪, a woman with long hair."
    )


def test_frequency_of_words_phrases_and_tags():
    captions = [
        "zzk, a woman with long blonde hair, smiling at the camera. She is wearing a red dress.",
        "zzk, a woman with short hair sitting on a sofa. The background is blurred.",
        "zzk, 1girl, long_hair, smile",
        "ずんだもん, a girl with green hair.",
    ]
    assert phrases(captions[0]) == ["zzk", "woman", "long blonde hair", "smiling", "camera", "red dress"]
    assert phrases(captions[2]) == ["zzk", "1girl", "long hair", "smile"]  # a tag list keeps its tags
    summary = caption_frequency(captions, exclude=["zzk", "ずんだもん"])
    counts = {row.tag: (row.count, row.share) for row in summary}
    assert counts["woman"] == (2, 0.5) and counts["long hair"] == (1, 0.25)
    assert summary[0].tag == "woman"  # most frequent first
    assert "zzk" not in counts and "ずんだもん" not in counts and "the" not in counts and "is" not in counts
    assert counts["green hair"] == (1, 0.25) and counts["background"] == (1, 0.25)


def test_spec_names_tasks_and_events_round_trip():
    spec = CaptionSpec.parse({"train_data_dir": "d", "task": "more_detailed"})
    assert spec.task == "<MORE_DETAILED_CAPTION>" and spec.captioner == "florence2-large"
    assert CaptionSpec.parse({"train_data_dir": "d"}).task == "<DETAILED_CAPTION>"
    with pytest.raises(SpecError, match="trigger_style"):
        CaptionSpec.parse({"train_data_dir": "d", "trigger_style": "middle"})
    event = CaptionedEvent(
        images=1, captions_written=1, captioner="x", tag_summary=[], examples=[("a.png", "zzk")]
    )
    assert parse_event(event.model_dump_json()) == event


def test_download_progress_reports_bytes():
    events: list = []
    bar = download_progress(events.append, "florence-community/Florence-2-base", every_s=0)(
        total=3 * 2**20, name="huggingface_hub.snapshot_download", disable=True
    )
    bar.update(2**20)
    bar.update(2 * 2**20)
    other = download_progress(events.append, "x", every_s=0)(total=10, name="transfer", disable=True)
    other.update(10)
    assert [(e.current, e.total) for e in events] == [(1, 3), (3, 3)]
    assert events[-1].message == "downloading florence-community/Florence-2-base: 3/3 MB"


# ---- whole jobs through Florence-2's generate ----


def test_dataset_captioned_in_batches(tmp_path, says_dir):
    root = _dataset(tmp_path / "data")
    result, events = _caption(root, says_dir, trigger_word="zzk", mode="append", batch_size=2)
    assert isinstance(result, CaptionedEvent) and events[-1] is result, result
    assert [e.current for e in events if getattr(e, "stage", None) == "captioning"] == [2, 3]
    assert _read(root, 0) == "zzk, a woman with long hair. She is smiling at the camera."
    assert _read(root, 1) == "zzk, 1girl, smile, a woman with long hair. She is smiling at the camera."
    assert result.images == 3 and result.captions_written == 3
    counts = {row.tag: row.count for row in result.tag_summary}
    assert counts["woman"] == 3 and counts["long hair"] == 3 and counts["smile"] == 1 and "zzk" not in counts
    assert result.examples[0] == ("10_zzk/0000.png", _read(root, 0))
    again, _ = _caption(root, says_dir, trigger_word="zzk", mode="replace")
    assert again.captions_written == 1 and _read(root, 1) == _read(root, 0)  # unchanged files not rewritten


@pytest.mark.parametrize(
    ("settings", "first", "second"),
    [
        (
            {
                "trigger_word": "ずんだもん",
                "trigger_style": "photo_of",
                "prefix": "anime style",
                "max_words": 6,
            },
            "a photo of ずんだもん, anime style, a woman with long hair.",
            "a photo of ずんだもん, anime style, a woman with long hair.",
        ),
        (
            {"trigger_word": "zzk", "mode": "prepend", "max_words": 4},
            "zzk, a woman with long",
            "zzk, a woman with long, 1girl, smile",
        ),
        ({"mode": "keep"}, "a woman with long hair. She is smiling at the camera.", "zzk, 1girl, smile"),
    ],
)
def test_trigger_prefix_word_limit_and_modes(tmp_path, says_dir, settings, first, second):
    root = _dataset(tmp_path / "data")
    result, _ = _caption(root, says_dir, **settings)
    assert isinstance(result, CaptionedEvent), result
    assert (_read(root, 0), _read(root, 1)) == (first, second)


def test_batches_caption_each_image_as_alone(tmp_path, random_dir):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    root = _dataset(tmp_path / "data", n=4)
    result, _ = _caption(root, random_dir, batch_size=3, max_new_tokens=10, num_beams=2)
    assert isinstance(result, CaptionedEvent), result
    processor = AutoProcessor.from_pretrained(random_dir)
    model = Florence2ForConditionalGeneration.from_pretrained(random_dir).eval()
    alone = []
    for i in range(4):
        with Image.open(root / "10_zzk" / f"{i:04d}.png") as img:
            inputs = processor(text="<DETAILED_CAPTION>", images=img.convert("RGB"), return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=10, num_beams=2, do_sample=False)
        alone.append(clean_caption(processor.batch_decode(ids, skip_special_tokens=True)[0]))
    assert [_read(root, i) for i in range(4)] == alone
    assert len(set(alone)) > 1  # the images do steer the model: a mix-up in the batch would show


def test_cancel_and_bad_captioners_fail_in_one_line(tmp_path, says_dir):
    root = _dataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in (root / "10_zzk").iterdir()}
    cancel = threading.Event()
    cancel.set()
    spec = CaptionSpec.parse({"train_data_dir": str(root), "captioner": str(says_dir)})
    cancelled = caption_dataset(spec, lambda e: None, cancel)
    assert isinstance(cancelled, FailedEvent) and cancelled.kind == "cancelled"
    assert {p.name: p.read_bytes() for p in (root / "10_zzk").iterdir()} == before

    broken = tmp_path / "broken"
    broken.mkdir()
    cases = [(tmp_path / "nowhere", "does not exist"), (broken, "lacks config.json")]
    for folder, message in cases:
        failed, _ = _caption(root, folder)
        assert failed.kind == "bad_input" and message in failed.reason and "\n" not in failed.reason
    (broken / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    failed, _ = _caption(root, broken)
    assert "not a Florence-2 model" in failed.reason
    (broken / "config.json").write_text(
        (says_dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    failed, _ = _caption(root, broken)  # a config without weights or processor files
    assert failed.kind == "bad_input" and "cannot load the captioner" in failed.reason
    assert "\n" not in failed.reason
    with pytest.raises(CaptionerError, match="does not exist"):
        resolve_captioner(str(tmp_path / "nowhere"))
    assert {p.name: p.read_bytes() for p in (root / "10_zzk").iterdir()} == before


def test_worker_runs_a_caption_job(tmp_path, says_dir):
    root = _dataset(tmp_path / "data")
    events: list = []
    spec = {"train_data_dir": str(root), "captioner": str(says_dir), "trigger_word": "zzk"}
    final = Worker().run({"type": "caption", "id": 7, "spec": spec}, events.append)
    assert isinstance(final, CaptionedEvent) and final.seconds is not None and final.seconds > 0
    assert any(isinstance(e, StageEvent) and e.stage == "captioning" for e in events)
    assert _read(root, 2) == "zzk, a woman with long hair. She is smiling at the camera."
    bad = Worker().run(
        {"type": "caption", "spec": {"train_data_dir": str(root), "mode": "merge"}}, events.append
    )
    assert isinstance(bad, FailedEvent) and bad.kind == "bad_input" and "mode" in bad.reason


def test_cli_caption_json(tmp_path, says_dir, capsys):
    root = _dataset(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "caption", str(root), "--captioner", str(says_dir),
         "--trigger", "ずんだもん", "--mode", "replace", "--max-words", "5", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    final = parse_event(proc.stdout.strip().splitlines()[-1])
    assert isinstance(final, CaptionedEvent) and final.images == 3
    assert _read(root, 1) == "ずんだもん, a woman with long hair."
    assert json.loads(proc.stdout.strip().splitlines()[-1])["type"] == "captioned"
    from bot.cli import main

    assert main(["caption", str(root), "--captioner", str(tmp_path / "none")]) == 1  # in-process: faster
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: captioner folder '{tmp_path / 'none'}' does not exist; give florence2-large, "
        "florence2-base or a folder holding a Florence-2 model"
    )


def test_the_bot_queues_a_caption_job_a_worker_runs(tmp_path, says_dir):
    import asyncio

    from botutil import write_config
    from test_dispatch import drive, finished

    from bot import jobs, store
    from bot.dispatch import make_dispatcher
    from bot.files import member_path
    from bot.scheduler import Scheduler

    cfg = write_config(tmp_path, "[quota]\nqueued_jobs = 5\n[scheduling]\npoll_seconds = 0.05\n")
    db = store.open_store(cfg.store)
    data = member_path(cfg.data_dir, "alice", "datasets", "ds")
    _dataset(data)
    with pytest.raises(jobs.JobError, match="trigger_style"):
        jobs.submit_caption(db, cfg, "alice", "ds", {"trigger_style": "sideways"})
    with pytest.raises(jobs.JobError, match="no dataset named 'nope'"):
        jobs.submit_caption(db, cfg, "alice", "nope")
    job = jobs.submit_caption(db, cfg, "alice", "ds", {"captioner": str(says_dir), "trigger_word": "zzk"})
    assert job.kind == "caption" and job.spec_dict["cache_dir"] == str(cfg.data_dir / "cache")
    asyncio.run(drive(Scheduler(db, cfg, make_dispatcher(cfg)), lambda: finished(db), timeout=120))
    job = store.get_job(db, job.id)
    assert job.state == "done", job.failure
    result = parse_event(job.result)
    assert isinstance(result, CaptionedEvent) and result.images == 3 and result.seconds > 0
    assert _read(data, 0) == "zzk, a woman with long hair. She is smiling at the camera."


def test_cli_caption_reports_to_a_person(tmp_path, says_dir, capsys):
    from bot.cli import main

    root = _dataset(tmp_path / "data")
    assert (
        main(["caption", str(root), "--captioner", str(says_dir), "--trigger", "zzk", "--mode", "replace"])
        == 0
    )
    out = capsys.readouterr().out
    assert "3 images captioned, 3 caption files written" in out
    assert "0000.png: zzk, a woman with long hair. She is smiling at the camera." in out  # an example
    assert re.search(r"^\s+3\s+100%\s+long hair$", out, re.M)  # the phrase table

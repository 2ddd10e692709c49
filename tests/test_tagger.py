"""WD14-style tagging with a tiny ONNX model of the real taggers' signature and tags file."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from runner.data.tagger import Tagger, TaggerError, format_tag, prepare, resolve_tagger, tag_dataset  # noqa: E402
from runner.spec import FailedEvent, TaggedEvent, TagSpec, parse_event  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (name, category) in selected_tags.csv order; the tiny model's 2×2 BGR input holds one probability per tag.
TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("hatsune_miku", 4), ("blue_hair", 0), ("long_hair", 0), ("smile", 0),
    ("^_^", 0), ("star_(symbol)", 0), ("1girl", 0), ("outdoors", 0),
]  # fmt: skip
INDEX = {name: i for i, (name, _) in enumerate(TAGS)}


def build_tagger(folder: Path, side: int = 2, tags: list[tuple[str, int]] | None = None) -> Path:
    """A model with WD14's signature ([N, side, side, 3] float32 BGR 0–255 in, one score a tag out)
    whose scores are its input pixels / 255, so a test picks each tag's probability by colour."""
    tags = tags or [(f"tag_{i}", 0) for i in range(side * side * 3)]
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input_1", "shape"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["predictions_sigmoid"]),
        ],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])],
        [
            helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows((1000 + i, name, cat, 500 - i) for i, (name, cat) in enumerate(tags))
    return folder


def image_with(probs: dict[str, float], size: int = 2) -> Image.Image:
    """An RGB picture the tiny model scores with ``probs`` (BGR input: tag i is pixel i//3, BGR channel i%3)."""
    bgr = np.zeros((2, 2, 3), dtype=np.uint8)
    for name, p in probs.items():
        i = INDEX[name]
        bgr[i // 3 // 2, i // 3 % 2, i % 3] = round(p * 255)
    img = Image.fromarray(bgr[:, :, ::-1].copy())
    return img.resize((size, size), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("tagger"), tags=TAGS)


def test_preprocessing_is_the_reference_apps(tmp_path):
    wide = Image.new("RGBA", (8, 4), (255, 0, 0, 255))
    wide.putpixel((0, 0), (0, 255, 0, 0))  # transparent
    x = prepare(wide, 8)
    assert x.shape == (8, 8, 3) and x.dtype == np.float32
    assert (x[:2] == 255).all() and (x[6:] == 255).all()  # padded to a square with white, centred
    assert x[3, 4].tolist() == [0.0, 0.0, 255.0]  # red as BGR, 0–255, not normalised
    assert x[2, 0].tolist() == [255.0, 255.0, 255.0]  # alpha composited on white
    big = prepare(Image.new("RGB", (32, 32), (10, 20, 30)), 8)
    assert big.shape == (8, 8, 3) and np.allclose(big[4, 4], [30, 20, 10], atol=1)
    tagger = Tagger(build_tagger(tmp_path / "t8", side=8))
    assert tagger.size == 8  # read from the model
    scores = tagger.predict([wide])[0]
    assert np.allclose(scores, x.reshape(-1) / 255)


def test_thresholds_categories_and_rating(tagger_dir):
    tagger = Tagger(tagger_dir)
    probs = tagger.predict(
        [image_with({"hatsune_miku": 0.9, "blue_hair": 0.5, "long_hair": 0.3, "smile": 0.8, "explicit": 0.7})]
    )[0]
    assert tagger.tags(probs, 0.35, 0.85) == ["hatsune miku", "smile", "blue hair"]
    assert tagger.tags(probs, 0.35, 0.95) == ["smile", "blue hair"]
    assert tagger.tags(probs, 0.25, 0.85, keep_rating=True) == [
        "explicit", "hatsune miku", "smile", "blue hair", "long hair",
    ]  # fmt: skip


def test_tag_text_keeps_kaomoji_and_escapes_parentheses():
    assert format_tag("^_^") == "^_^" and format_tag("long_hair") == "long hair"
    assert format_tag("star_(symbol)") == "star \\(symbol\\)"


def test_batches_give_the_same_tags_as_single_images(tagger_dir):
    tagger = Tagger(tagger_dir)
    images = [image_with({"smile": 0.1 * i, "1girl": 1 - 0.1 * i}, size=5) for i in range(5)]
    batched = tagger.predict(images)
    single = np.concatenate([tagger.predict([img]) for img in images])
    assert np.allclose(batched, single)


def _dataset(root: Path) -> Path:
    folder = root / "10_sks"
    folder.mkdir(parents=True)
    base = {"hatsune_miku": 0.95, "blue_hair": 0.9, "1girl": 0.8, "^_^": 0.6}
    extras = [{"outdoors": 0.7}, {"smile": 0.7}, {"star_(symbol)": 0.92}, {}]
    for i, extra in enumerate(extras):
        image_with(base | extra).save(folder / f"{i:04d}.png")
    (folder / "0003.txt").write_text("red eyes, 1girl\n", encoding="utf-8")
    return root


def _tag(root: Path, tagger_dir: Path, **kw) -> tuple[TaggedEvent | FailedEvent, list]:
    events: list = []
    spec = TagSpec.parse({"train_data_dir": str(root), "tagger": str(tagger_dir), **kw})
    return tag_dataset(spec, events.append), events


def _caption(root: Path, i: int) -> str:
    return (root / "10_sks" / f"{i:04d}.txt").read_text(encoding="utf-8").strip()


def test_captions_trigger_removal_frequency_and_suggestions(tmp_path, tagger_dir):
    root = _dataset(tmp_path / "data")
    result, events = _tag(root, tagger_dir, trigger_word="sks", remove=["1girl"], add=["solo"], batch_size=2)
    assert isinstance(result, TaggedEvent) and events[-1] is result
    assert [e.current for e in events if getattr(e, "stage", None) == "tagging"] == [2, 3]
    assert _caption(root, 0) == "sks, solo, hatsune miku, blue hair, outdoors, ^_^"
    assert _caption(root, 2) == "sks, solo, hatsune miku, star \\(symbol\\), blue hair, ^_^"
    assert _caption(root, 3) == "sks, solo, red eyes"  # kept (mode keep), trigger and additions put first
    assert result.images == 4 and result.captions_written == 4
    summary = {row.tag: (row.count, row.share) for row in result.tag_summary}
    assert summary["hatsune miku"] == (3, 0.75) and summary["outdoors"] == (1, 0.25)
    assert "sks" not in summary and "1girl" not in summary
    assert result.tag_frequency == {
        "10_sks": {
            "sks": 4, "solo": 4, "hatsune miku": 3, "blue hair": 3, "^_^": 3, "outdoors": 1, "smile": 1,
            "star \\(symbol\\)": 1, "red eyes": 1,
        }
    }  # fmt: skip
    assert result.suggested_removals == ["hatsune miku", "blue hair"]
    style, _ = _tag(root, tagger_dir, preset="style")
    assert style.suggested_removals == []


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep", "red eyes, 1girl"),
        ("replace", "hatsune miku, blue hair, 1girl, ^_^"),
        ("merge", "red eyes, 1girl, hatsune miku, blue hair, ^_^"),
    ],
)
def test_existing_captions_kept_replaced_or_merged(tmp_path, tagger_dir, mode, expected):
    root = _dataset(tmp_path / "data")
    result, _ = _tag(root, tagger_dir, mode=mode)
    assert isinstance(result, TaggedEvent)
    assert _caption(root, 3) == expected


def test_removal_matches_any_spelling(tmp_path, tagger_dir):
    root = _dataset(tmp_path / "data")
    _tag(root, tagger_dir, remove=["Blue_Hair", "star_(symbol)"], mode="replace")
    assert "blue hair" not in _caption(root, 0) and "star" not in _caption(root, 2)


def test_cancel_and_bad_taggers_fail_cleanly(tmp_path, tagger_dir):
    root = _dataset(tmp_path / "data")
    before = sorted(p.name for p in (root / "10_sks").iterdir())
    cancel = threading.Event()
    cancel.set()
    spec = TagSpec.parse({"train_data_dir": str(root), "tagger": str(tagger_dir)})
    result = tag_dataset(spec, lambda e: None, cancel)
    assert isinstance(result, FailedEvent) and result.kind == "cancelled"
    assert sorted(p.name for p in (root / "10_sks").iterdir()) == before
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"not onnx")
    missing, _ = _tag(root, half)
    assert missing.kind == "bad_input" and "selected_tags.csv" in missing.reason
    (half / "selected_tags.csv").write_text("tag_id,name,category,count\n1,a,0,1\n", encoding="utf-8")
    broken, _ = _tag(root, half)
    assert broken.kind == "bad_input" and "cannot load the tagger model" in broken.reason
    with pytest.raises(TaggerError, match="does not exist"):
        resolve_tagger(str(tmp_path / "nowhere"))
    empty, _ = _tag(tmp_path / "half", tagger_dir)
    assert empty.kind == "bad_input" and "no images" in empty.reason


def test_cli_tag_json(tmp_path, tagger_dir):
    root = _dataset(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "tag", str(root), "--tagger", str(tagger_dir), "--trigger", "sks",
         "--remove", "1girl,^_^", "--mode", "replace", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    final = parse_event(proc.stdout.strip().splitlines()[-1])
    assert isinstance(final, TaggedEvent) and final.images == 4
    assert _caption(root, 3) == "sks, hatsune miku, blue hair"
    bad = subprocess.run(
        [sys.executable, "-m", "bot.cli", "tag", str(root), "--tagger", str(tmp_path / "none"), "--threshold", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "general_threshold" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads(final.model_dump_json())["type"] == "tagged"


def test_cli_tag_reports_to_a_person(tmp_path, tagger_dir, capsys):
    from runner.cli import main

    root = _dataset(tmp_path / "data")
    assert main(["tag", str(root), "--tagger", str(tagger_dir), "--trigger", "sks", "--mode", "replace"]) == 0
    out = capsys.readouterr().out
    assert "4 images captioned, 4 caption files written" in out
    assert re.search(r"^\s+\d+\s+\d+%\s+1girl$", out, re.M)  # the tag table
    assert "--remove '" in out  # the subject tags it suggests baking into the trigger

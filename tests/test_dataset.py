import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from runner.data.dataset import (
    CaptionRules,
    Dataset,
    DatasetError,
    ImageItem,
    epoch_batches,
    load_dataset,
    load_image,
    make_buckets,
)
from runner.spec import TrainSpec

RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


def _spec(root: Path, **kw) -> TrainSpec:
    settings = dict(
        output_name="t",
        base="tiny:sd15",
        train_data_dir=str(root),
        output_dir=str(root.parent / "out"),
        resolution=(128, 128),
        min_bucket_reso=64,
        max_bucket_reso=256,
        bucket_reso_steps=32,
    )
    return TrainSpec(**(settings | kw))


def _img(path: Path, size=(64, 64), color=RED, mode="RGB", caption: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _by_name(dataset) -> dict[str, ImageItem]:
    return {item.path.name: item for item in dataset.items}


# ---- layout ----


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    _img(root / "10_cat" / "a.png", caption="Cat, sitting")
    _img(root / "10_cat" / "b.jpg", caption="cat, standing")
    _img(root / "10_cat" / "closeups" / "c.png", caption="cat, face")
    _img(root / "5_キャラ✨" / "絵.png", caption="キャラ, 笑顔 😀")
    _img(root / "misc" / "m.webp", caption="misc")
    _img(root / "wrapper" / "3_dog" / "d.bmp")
    _img(root / "top.PNG")
    _img(root / ".hidden" / "h.png")
    _img(root / "__MACOSX" / "10_cat" / "._a.png")
    (root / "10_cat" / "notes.json").write_text("{}")
    return root


def test_folders_give_subsets_and_repeats(tree):
    ds = load_dataset(_spec(tree, num_repeats=2))
    items = _by_name(ds)
    assert sorted(items) == ["a.png", "b.jpg", "c.png", "d.bmp", "m.webp", "top.PNG", "絵.png"]
    assert {n: (i.subset, i.repeats) for n, i in items.items()} == {
        "a.png": ("10_cat", 10),
        "b.jpg": ("10_cat", 10),
        "c.png": ("10_cat", 10),
        "絵.png": ("5_キャラ✨", 5),
        "m.webp": ("misc", 2),
        "d.bmp": ("3_dog", 3),
        "top.PNG": ("data", 2),
    }
    assert ds.num_train_images() == 30 + 5 + 2 + 3 + 2
    assert ds.dataset_dirs() == {
        "10_cat": {"n_repeats": 10, "img_count": 3},
        "3_dog": {"n_repeats": 3, "img_count": 1},
        "5_キャラ✨": {"n_repeats": 5, "img_count": 1},
        "data": {"n_repeats": 2, "img_count": 1},
        "misc": {"n_repeats": 2, "img_count": 1},
    }
    assert ds.skipped == []


def test_tag_frequency_and_common_tags(tree):
    ds = load_dataset(_spec(tree))
    freq = ds.tag_frequency()
    assert freq["10_cat"] == {"cat": 3, "sitting": 1, "standing": 1, "face": 1}
    assert freq["5_キャラ✨"] == {"キャラ": 1, "笑顔 😀": 1}
    assert freq["3_dog"] == {}
    assert ds.common_tags(1) == ["cat"]
    assert set(ds.common_tags(100)) == {"cat", "sitting", "standing", "face", "キャラ", "笑顔 😀", "misc"}


def test_tag_frequency_uses_the_caption_separator(tmp_path):
    root = tmp_path / "data"
    _img(root / "1_x" / "a.png", caption="red hair; blue eyes")
    ds = load_dataset(_spec(root, caption_separator=";"))
    assert ds.tag_frequency() == {"1_x": {"red hair": 1, "blue eyes": 1}}


# ---- captions ----


def test_caption_files(tmp_path):
    root = tmp_path / "data" / "1_x"
    _img(root / "plain.png")
    (root / "plain.txt").write_text("plain caption")
    _img(root / "bom.png")
    (root / "bom.txt").write_bytes("\ufeffbom, tag".encode())
    _img(root / "lines.png")
    (root / "lines.txt").write_text("  first line \n\nsecond line\n")
    _img(root / "upper.png")
    (root / "UPPER.TXT").write_text("upper case extension")
    _img(root / "sjis.png")
    (root / "sjis.txt").write_bytes("キャラ, 笑顔".encode("cp932"))
    _img(root / "none.png")
    _img(root / "bad.png")
    (root / "bad.txt").write_bytes(b"\x81\x7f\xff")
    ds = load_dataset(_spec(tmp_path / "data"))
    captions = {n: i.caption for n, i in _by_name(ds).items()}
    assert captions == {
        "plain.png": "plain caption",
        "bom.png": "bom, tag",
        "lines.png": "first line, second line",
        "upper.png": "upper case extension",
        "sjis.png": "キャラ, 笑顔",
        "none.png": "",
    }
    assert ds.skipped == [("1_x/bad.png", "caption 'bad.txt' is not UTF-8 text; save it as UTF-8")]


def test_caption_extension_and_fallback(tmp_path):
    root = tmp_path / "data" / "1_x"
    _img(root / "a.png")
    (root / "a.caption").write_text("from caption")
    (root / "a.tags").write_text("from tags")
    _img(root / "b.png")
    (root / "b.txt").write_text("from txt")
    ds = load_dataset(_spec(tmp_path / "data", caption_extension="tags"))
    assert {n: i.caption for n, i in _by_name(ds).items()} == {"a.png": "from tags", "b.png": "from txt"}
    ds = load_dataset(_spec(tmp_path / "data", caption_extension=".md"))
    assert {n: i.caption for n, i in _by_name(ds).items()} == {"a.png": "from caption", "b.png": "from txt"}


# ---- buckets ----


def test_make_buckets_is_kohyas_set():
    small = [
        (64, 192),
        (64, 224),
        (64, 256),
        (96, 160),
        (128, 128),
        (160, 96),
        (192, 64),
        (224, 64),
        (256, 64),
    ]
    assert make_buckets((128, 128), 64, 256, 32) == small
    # kohya's rule for 512 with its default 256–1024 in steps of 64: 17 buckets.
    sd15 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576)]
    assert make_buckets((512, 512), 256, 1024, 64) == sorted(sd15 + [(512, 512)] + [(h, w) for w, h in sd15])


def test_bucket_assignment_by_aspect_ratio(tmp_path):
    root = tmp_path / "data"
    _img(root / "2_x" / "wide.png", size=(200, 100))
    _img(root / "2_x" / "wider.png", size=(300, 100))
    _img(root / "2_x" / "tall.png", size=(100, 170))
    _img(root / "2_x" / "square.png", size=(40, 40))  # small images are upscaled
    ds = load_dataset(_spec(root))
    items = _by_name(ds)
    assert {n: i.bucket for n, i in items.items()} == {
        "wide.png": (160, 96),
        "wider.png": (192, 64),
        "tall.png": (96, 160),
        "square.png": (128, 128),
    }
    assert items["tall.png"].size == (100, 170)
    info = ds.bucket_info()
    assert info["buckets"] == {
        0: {"resolution": [96, 160], "count": 2},
        1: {"resolution": [128, 128], "count": 2},
        2: {"resolution": [160, 96], "count": 2},
        3: {"resolution": [192, 64], "count": 2},
    }
    expected = (abs(160 / 96 - 2) + abs(0.6 - 100 / 170)) / 4
    assert info["mean_img_ar_error"] == pytest.approx(expected)


def test_without_buckets_everything_uses_the_resolution(tmp_path):
    root = tmp_path / "data"
    _img(root / "1_x" / "wide.png", size=(200, 100))
    _img(root / "1_x" / "tall.png", size=(30, 90))
    ds = load_dataset(_spec(root, enable_bucket=False, resolution=(128, 96)))
    assert {i.bucket for i in ds.items} == {(128, 96)}
    assert load_dataset(_spec(root, enable_bucket=False), resolution=(64, 64)).items[0].bucket == (64, 64)


def test_bucket_no_upscale(tmp_path):
    root = tmp_path / "data"
    _img(root / "1_x" / "small.png", size=(100, 70))
    _img(root / "1_x" / "large.png", size=(400, 200))
    _img(root / "1_x" / "tiny.png", size=(20, 20))
    ds = load_dataset(_spec(root, bucket_no_upscale=True))
    items = _by_name(ds)
    assert items["small.png"].bucket == (96, 64)
    assert items["large.png"].bucket == (160, 64)  # scaled to the area (181x90), rounded down to steps
    assert ds.skipped == [
        ("1_x/tiny.png", "20x20 is smaller than one bucket step (32 px) and bucket_no_upscale is on")
    ]


# ---- images ----


def test_load_image_resizes_to_cover_and_centre_crops(tmp_path):
    path = tmp_path / "stripes.png"
    img = Image.new("RGB", (200, 100), RED)
    img.paste(GREEN, (50, 0, 150, 100))
    img.paste(BLUE, (150, 0, 200, 100))
    img.save(path)
    item = ImageItem(path, "", 1, "x", (200, 100), (64, 64))
    pixels, original, crop = load_image(item)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert original == (100, 200) and crop == (0, 32)  # resized to 128x64, 32 px cut on each side
    centre = pixels[:, :, 4:60]
    torch.testing.assert_close(centre.mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)
    assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6


def test_load_image_applies_exif_orientation(tmp_path):
    # Stored 80x40 with red on the left; orientation 6 means "rotate 90° clockwise to view",
    # so the upright image is 40x80 with red on top.
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (80, 40), BLUE)
    img.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)
    ds = load_dataset(_spec(tmp_path, enable_bucket=False))
    assert ds.items[0].size == (40, 80)
    item = ImageItem(path, "", 1, "x", (40, 80), (32, 64))
    pixels, original, crop = load_image(item)
    assert original == (80, 40) and crop == (0, 0)
    top, bottom = pixels[:, 4:28].mean(dim=(1, 2)), pixels[:, 36:60].mean(dim=(1, 2))
    torch.testing.assert_close(top, torch.tensor([1.0, -1.0, -1.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(bottom, torch.tensor([-1.0, -1.0, 1.0]), atol=0.1, rtol=0)


def test_load_image_composites_alpha_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (32, 0, 64, 64))
    img.save(path)
    pixels, _, _ = load_image(ImageItem(path, "", 1, "x", (64, 64), (64, 64)))
    assert torch.all(pixels[:, :, :30] == 1.0)
    assert torch.all(pixels[:, :, 34:] == -1.0)


def test_load_image_palette_with_transparency(tmp_path):
    path = tmp_path / "palette.png"
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0] * 256)
    img.save(path, transparency=0)
    pixels, _, _ = load_image(ImageItem(path, "", 1, "x", (32, 32), (32, 32)))
    assert torch.all(pixels == 1.0)


def test_load_image_error_names_the_file(tmp_path):
    path = tmp_path / "gone.png"
    path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read image 'gone.png'"):
        load_image(ImageItem(path, "", 1, "x", (64, 64), (64, 64)))


# ---- bad input ----


def test_corrupt_images_are_skipped(tmp_path):
    root = tmp_path / "data"
    _img(root / "1_x" / "good.png")
    (root / "1_x" / "text.png").write_text("this is not a png")
    good = (root / "1_x" / "good.png").read_bytes()
    (root / "1_x" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = load_dataset(_spec(root))
    assert [i.path.name for i in ds.items] == ["good.png"]
    reasons = dict(ds.skipped)
    assert set(reasons) == {"1_x/text.png", "1_x/truncated.png"}
    assert "not an image" in reasons["1_x/text.png"]
    assert "truncated" in reasons["1_x/truncated.png"]


def test_nothing_usable_lists_the_files(tmp_path):
    root = tmp_path / "data"
    (root / "1_x").mkdir(parents=True)
    (root / "1_x" / "a.png").write_text("no")
    (root / "1_x" / "b.jpg").write_text("no")
    with pytest.raises(DatasetError, match=r"none of the 2 images .* can be used: 1_x/a.png \(not an image"):
        load_dataset(_spec(root))


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="training folder '.*nope' does not exist"):
        load_dataset(_spec(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        load_dataset(_spec(tmp_path / "file"))


def test_no_images_explains_the_layout(tmp_path):
    root = tmp_path / "data"
    (root / "10_x").mkdir(parents=True)
    (root / "10_x" / "a.txt").write_text("caption without image")
    with pytest.raises(DatasetError) as err:
        load_dataset(_spec(root))
    msg = str(err.value)
    assert "no training images found" in msg and "'10_name'" in msg and ".png" in msg and ".webp" in msg
    assert "other types" not in msg
    (root / "10_x" / "a.heic").write_bytes(b"x")
    (root / "10_x" / "b.heic").write_bytes(b"x")
    (root / "10_x" / "c.gif").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"Found 2 \.heic, 1 \.gif file\(s\) of other types: convert them"):
        load_dataset(_spec(root))


def test_zero_repeats_folder(tmp_path):
    _img(tmp_path / "data" / "0_x" / "a.png")
    with pytest.raises(DatasetError, match="folder '0_x' asks for 0 repeats"):
        load_dataset(_spec(tmp_path / "data"))


# ---- epochs ----


def _items(specs: list[tuple[str, int, tuple[int, int]]]) -> list[ImageItem]:
    return [ImageItem(Path(name), "", repeats, "s", bucket, bucket) for name, repeats, bucket in specs]


def test_epoch_batches():
    ds = Dataset(_items([("a", 3, (64, 64)), ("b", 2, (64, 64)), ("c", 4, (96, 32)), ("d", 1, (32, 96))]))
    batches = epoch_batches(ds, batch_size=2, epoch=1, seed=7)
    counts = Counter(item.path.name for batch in batches for item, _ in batch)
    assert counts == {"a": 3, "b": 2, "c": 4, "d": 1}
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({item.bucket for item, _ in batch}) == 1
        assert not any(flip for _, flip in batch)
    assert len(batches) == 3 + 2 + 1  # 5 in (64, 64), 4 in (96, 32), 1 in (32, 96)

    def order(epoch, seed):
        return [[item.path.name for item, _ in b] for b in epoch_batches(ds, 2, epoch, seed)]

    assert order(1, 7) == order(1, 7)
    assert len({str(order(e, 7)) for e in range(1, 8)}) > 1
    assert len({str(order(1, s)) for s in range(8)}) > 1


def test_epoch_batches_flip():
    ds = Dataset(_items([("a", 50, (64, 64))]))
    flips = [flip for b in epoch_batches(ds, 4, 1, 0, flip_aug=True) for _, flip in b]
    assert 10 < sum(flips) < 40
    assert flips == [flip for b in epoch_batches(ds, 4, 1, 0, flip_aug=True) for _, flip in b]


# ---- caption rules ----


def _rules(tmp_path, **kw) -> CaptionRules:
    return CaptionRules(_spec(tmp_path, **kw))


def test_trigger_word_first_and_not_duplicated(tmp_path):
    rules = _rules(tmp_path, trigger_word="sks")
    rng = random.Random(0)
    assert rules.apply("1girl, smile", 1, rng) == "sks, 1girl, smile"
    assert rules.apply("1girl, SKS, smile", 1, rng) == "sks, 1girl, smile"
    assert rules.apply("", 1, rng) == "sks"
    assert rules.apply("sks dog, smile", 1, rng) == "sks, sks dog, smile"
    assert not rules.varies()
    assert _rules(tmp_path).apply("a,b ,, c", 1, rng) == "a, b, c"


def test_shuffle_keeps_trigger_and_keep_tokens(tmp_path):
    tags = [f"t{i}" for i in range(8)]
    caption = ", ".join(tags)
    rules = _rules(tmp_path, trigger_word="sks", shuffle_caption=True, keep_tokens=2)
    assert rules.varies()
    rng = random.Random(1)
    outs = [rules.apply(caption, 1, rng).split(", ") for _ in range(20)]
    for out in outs:
        assert out[:2] == ["sks", "t0"]  # the trigger counts as the first kept token
        assert sorted(out[2:]) == sorted(tags[1:])
    assert len({tuple(o) for o in outs}) > 1
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert rules.apply(caption, 1, rng_a) == rules.apply(caption, 1, rng_b)


def test_keep_tokens_without_trigger(tmp_path):
    rules = _rules(tmp_path, shuffle_caption=True, keep_tokens=1)
    rng = random.Random(0)
    outs = [rules.apply("a, b, c, d", 1, rng).split(", ") for _ in range(20)]
    assert all(o[0] == "a" and sorted(o) == ["a", "b", "c", "d"] for o in outs)


def test_tag_dropout(tmp_path):
    caption = ", ".join(f"t{i}" for i in range(100))
    rng = random.Random(0)
    assert _rules(tmp_path, trigger_word="sks", caption_tag_dropout_rate=1.0).apply(caption, 1, rng) == "sks"
    half = _rules(tmp_path, trigger_word="sks", caption_tag_dropout_rate=0.5, keep_tokens=3)
    assert half.varies()
    out = half.apply(caption, 1, rng).split(", ")
    assert out[:3] == ["sks", "t0", "t1"]
    assert 20 < len(out) < 80
    assert out == sorted(out, key=lambda t: -1 if t == "sks" else int(t[1:]))  # dropout alone keeps order


def test_caption_dropout_drops_everything(tmp_path):
    rng = random.Random(0)
    always = _rules(tmp_path, trigger_word="sks", caption_dropout_rate=1.0)
    assert always.varies()
    assert always.apply("a, b", 1, rng) == ""
    some = _rules(tmp_path, trigger_word="sks", caption_dropout_rate=0.3)
    outs = [some.apply("a, b", 1, rng) for _ in range(200)]
    assert 30 < outs.count("") < 90 and set(outs) == {"", "sks, a, b"}


def test_caption_dropout_every_n_epochs(tmp_path):
    rules = _rules(tmp_path, trigger_word="sks", caption_dropout_every_n_epochs=2)
    assert rules.varies()
    rng = random.Random(0)
    assert [rules.apply("a", e, rng) for e in range(1, 6)] == ["sks, a", "", "sks, a", "", "sks, a"]


def test_custom_separator(tmp_path):
    rules = _rules(tmp_path, trigger_word="sks", caption_separator=";")
    assert rules.apply("a;b ; c", 1, random.Random(0)) == "sks; a; b; c"

"""`loracord dataset`: a pile of members' uploads, good, odd and hostile, becomes a clean training folder."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from corpus import (
    animated_gif,
    cmyk_jpeg,
    cp932_named_zip,
    decompression_bomb_png,
    exif_rotated_jpeg,
    hostile_zip,
    jpeg_bytes,
    palette_png_with_transparency,
    picture,
    sixteen_bit_png,
    truncated_jpeg,
    zip_bomb,
)
from PIL import Image

from runner.data.dataset import load_dataset
from runner.data.intake import IntakeReport, build_dataset
from runner.spec import IntakeSpec, SpecError, TrainSpec

ROOT = Path(__file__).resolve().parents[1]


def _spec(sources: list[Path], out: Path, **kw) -> IntakeSpec:
    return IntakeSpec.parse(
        {
            "sources": [str(s) for s in sources],
            "output_dir": str(out),
            "name": "キャラ",
            "resolution": 256,
            **kw,
        }
    )


def _by_source(report: IntakeReport) -> dict[str, object]:
    return {e.source.split("/", 1)[1]: e for e in report.entries}


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> tuple[Path, IntakeReport, set[str], set[str]]:
    """One intake of everything a member may send; returns the workspace, the report and its tree before/after."""
    ws = tmp_path_factory.mktemp("upload")
    src = ws / "phone"
    src.mkdir()
    picture(1).save(src / "猫の写真😺.png")
    picture(2).save(src / "webp.webp", lossless=True)
    exif_rotated_jpeg(src / "rotated.jpg", 3)
    cmyk_jpeg(src / "cmyk.jpg")
    sixteen_bit_png(src / "sixteen.png")
    palette_png_with_transparency(src / "palette.png")
    animated_gif(src / "anim.gif")
    truncated_jpeg(src / "truncated.jpg", 4)
    decompression_bomb_png(src / "bomb.png")
    (src / "zero.png").write_bytes(b"")
    (src / "notes.png").write_text("my favourite pictures\n", encoding="utf-8")
    (src / "corrupt.jpg").write_bytes(bytes(range(256)) * 8)
    (src / "tiny.png").write_bytes(_png(picture(5, (60, 60))))
    (src / "small.png").write_bytes(_png(picture(6, (150, 150))))
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    picture(7).save(src / "captioned.jpg", quality=92)
    (src / "captioned.caption").write_text("blue sky, 1girl", encoding="utf-8")
    zip_bomb(ws / "bomb.zip")
    hostile_zip(ws / "hostile.zip", jpeg_bytes(picture(8)))
    cp932_named_zip(ws / "windows.zip", "キャラ.jpg", jpeg_bytes(picture(9)))
    before = _tree(ws)
    report = build_dataset(_spec([src, ws / "bomb.zip", ws / "hostile.zip", ws / "windows.zip"], ws / "out"))
    return ws, report, before, _tree(ws)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _stored(ws: Path, entry) -> Image.Image:
    return Image.open(ws / "out" / entry.stored)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("truncated.jpg", "truncated"),
        ("bomb.png", "pixels"),
        ("zero.png", "empty"),
        ("notes.png", "text file"),
        ("corrupt.jpg", "not an image"),
        ("tiny.png", "at least 128 px"),
        ("bomb.zip/huge.png", "zip bomb"),
        ("hostile.zip/../escape.jpg", "outside"),
        ("hostile.zip//etc/absolute.jpg", "outside"),
        ("hostile.zip/C:\\Windows\\drive.jpg", "outside"),
        ("hostile.zip/link.jpg", "link"),
        ("hostile.zip/nested.zip", "zip inside the zip"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(upload, source, words):
    _, report, _, _ = upload
    entry = {e.source.removeprefix("phone/"): e for e in report.entries}[source]
    assert entry.status == "rejected" and entry.stored is None
    assert words in entry.reason


def test_hidden_files_and_mac_litter_are_skipped_silently(upload):
    _, report, _, _ = upload
    sources = " ".join(e.source for e in report.entries)
    assert ".DS_Store" not in sources and "__MACOSX" not in sources and ".hidden" not in sources


def test_nothing_is_written_outside_the_output_folder(upload):
    ws, _, before, after = upload
    assert {p for p in after - before if not p.startswith("out")} == set()
    assert not (ws.parent / "escape.jpg").exists() and not Path("/etc/absolute.jpg").exists()


def test_conversions_are_real_and_reported(upload):
    ws, report, _, _ = upload
    e = {e.source.removeprefix("phone/"): e for e in report.entries}
    cmyk = _stored(ws, e["cmyk.jpg"])
    assert "CMYK → RGB" in e["cmyk.jpg"].changes and cmyk.mode == "RGB"
    r, g, b = cmyk.getpixel((100, 80))
    assert r > 200 and g < 60 and b < 60
    grey = _stored(ws, e["sixteen.png"]).convert("RGB").getpixel((10, 10))
    assert "16-bit → 8-bit" in e["sixteen.png"].changes and all(120 <= c <= 136 for c in grey)
    palette = _stored(ws, e["palette.png"])
    assert "transparency put on white" in e["palette.png"].changes
    assert palette.getpixel((10, 10)) == (255, 255, 255) and palette.getpixel((150, 10)) == (0, 0, 255)
    gif = _stored(ws, e["anim.gif"])
    assert "first frame of 3 kept" in e["anim.gif"].changes and gif.getpixel((5, 5)) == (0, 200, 0)
    rotated = _stored(ws, e["rotated.jpg"])
    assert "turned upright (EXIF)" in e["rotated.jpg"].changes and rotated.size == (160, 240)
    assert e["rotated.jpg"].size == (160, 240)


def test_clean_images_are_copied_untouched_under_numbered_names(upload):
    ws, report, _, _ = upload
    e = {e.source.removeprefix("phone/"): e for e in report.entries}
    webp = e["webp.webp"]
    assert webp.status == "accepted" and webp.changes == []
    assert (ws / "out" / webp.stored).read_bytes() == (ws / "phone" / "webp.webp").read_bytes()
    emoji = e["猫の写真😺.png"]
    assert emoji.status == "accepted" and Path(emoji.stored).name == f"{emoji.number:04d}.png"
    numbers = [x.number for x in report.entries if x.status != "rejected"]
    assert numbers == list(range(1, len(numbers) + 1))
    assert all(Path(x.stored).parent.name == "10_キャラ" for x in report.entries if x.stored)


def test_zip_names_in_shift_jis_and_captions_survive(upload):
    ws, report, _, _ = upload
    e = {x.source: x for x in report.entries}
    assert e["windows.zip/キャラ.jpg"].status == "accepted"
    zipped = e["hostile.zip/dir/good.jpg"]
    caption = (ws / "out" / zipped.stored).with_suffix(".txt")
    assert zipped.caption and caption.read_text(encoding="utf-8").strip() == "1girl, smile"
    folder = e["phone/captioned.jpg"]
    assert (ws / "out" / folder.stored).with_suffix(".txt").read_text(
        encoding="utf-8"
    ).strip() == "blue sky, 1girl"


def test_small_images_are_flagged_not_refused(upload):
    _, report, _, _ = upload
    small = {e.source: e for e in report.entries}["phone/small.png"]
    assert small.status == "accepted" and any("small" in w for w in small.warnings)
    big = {e.source: e for e in report.entries}["phone/webp.webp"]
    assert not any("small" in w for w in big.warnings)


def test_the_trainer_reads_exactly_what_was_accepted(upload):
    ws, report, _, _ = upload
    spec = TrainSpec.parse(
        {
            "output_name": "t",
            "base": "tiny:sd15",
            "train_data_dir": str(ws / "out"),
            "output_dir": str(ws / "lora"),
            "min_bucket_reso": 64,
            "max_bucket_reso": 512,
            "bucket_reso_steps": 64,
        }
    )
    dataset = load_dataset(spec, resolution=(256, 256))
    assert dataset.skipped == []
    stored = sorted(ws / "out" / e.stored for e in report.accepted)
    assert sorted(item.path for item in dataset.items) == stored
    assert {item.repeats for item in dataset.items} == {10}
    captions = {item.path.stem: item.caption for item in dataset.items}
    assert "1girl, smile" in captions.values() and "blue sky, 1girl" in captions.values()
    assert json.loads(Path(report.report_file).read_text(encoding="utf-8"))["entries"]


def test_near_duplicates_are_flagged_across_runs_and_numbering_continues(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    picture(11).save(first / "one.png")
    picture(12).save(first / "two.png")
    picture(11).resize((200, 150)).save(first / "one_small.jpg", quality=80)
    report = build_dataset(_spec([first], tmp_path / "out"))
    e = {x.source: x for x in report.entries}
    one = e["a/one.png"].number
    assert e["a/one_small.jpg"].duplicate_of == one and e["a/two.png"].duplicate_of is None
    Image.new("RGB", (256, 192), (200, 0, 0)).save(second / "red.png")
    Image.new("RGB", (256, 192), (90, 90, 90)).save(second / "grey.png")  # same layout, other colour
    picture(12).save(second / "two_again.png")
    again = {x.source: x for x in build_dataset(_spec([second], tmp_path / "out")).entries}
    assert [again[s].number for s in ("b/grey.png", "b/red.png", "b/two_again.png")] == [4, 5, 6]
    assert again["b/two_again.png"].duplicate_of == e["a/two.png"].number
    assert again["b/red.png"].duplicate_of is None


def test_limits_are_settings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        picture(20 + i).save(src / f"{i}.png")
    report = build_dataset(_spec([src], tmp_path / "out", max_images=3))
    assert [e.status for e in report.entries][:3] != ["rejected"] * 3
    assert "already has 3 images" in report.entries[3].reason
    small_files = build_dataset(_spec([src / "0.png"], tmp_path / "out2", max_file_mb=0.001))
    assert "the limit is" in small_files.entries[0].reason
    pixels = build_dataset(_spec([src / "0.png"], tmp_path / "out3", max_megapixels=0.01))
    assert "megapixels" in pixels.entries[0].reason


def test_zip_total_size_limit_stops_reading(tmp_path):
    with zipfile.ZipFile(tmp_path / "many.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(4):
            noise = np.random.default_rng(i).integers(0, 256, (400, 400, 3), dtype=np.uint8)
            zf.writestr(f"{i}.png", _png(Image.fromarray(noise)))  # ~480 KB each: noise does not compress
    report = build_dataset(_spec([tmp_path / "many.zip"], tmp_path / "out", max_zip_mb=0.5))
    statuses = [e.status for e in report.entries]
    assert statuses[0] != "rejected" and statuses[-1] == "rejected"
    assert "unpacks to more than" in report.entries[-1].reason


def test_heic_is_read_with_the_optional_decoder(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    picture(40).save(tmp_path / "IMG_0001.HEIC", format="HEIF")
    report = build_dataset(_spec([tmp_path / "IMG_0001.HEIC"], tmp_path / "out"))
    entry = report.entries[0]
    assert entry.status == "converted" and "HEIF → JPEG" in entry.changes and entry.stored.endswith(".jpg")


def test_heic_without_the_decoder_is_refused_clearly(tmp_path):
    pytest.importorskip("pillow_heif").register_heif_opener()
    picture(41).save(tmp_path / "IMG_0002.HEIC", format="HEIF")
    code = (
        "import sys, json; sys.modules['pillow_heif'] = None\n"
        "from runner.data.intake import build_dataset; from runner.spec import IntakeSpec\n"
        f"r = build_dataset(IntakeSpec.parse({{'sources': [{str(tmp_path / 'IMG_0002.HEIC')!r}], "
        f"'output_dir': {str(tmp_path / 'out')!r}}}))\n"
        "print(json.dumps([r.entries[0].status, r.entries[0].reason]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    status, reason = json.loads(proc.stdout)
    assert status == "rejected" and "HEIC" in reason and "JPEG" in reason


def test_contact_sheet_marks_flagged_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    picture(50).save(src / "a.png")
    picture(50).save(src / "b.png")  # #2 duplicates #1
    picture(51).save(src / "c.png")
    report = build_dataset(_spec([src], tmp_path / "out"))
    sheet = np.asarray(Image.open(report.contact_sheets[0]).convert("RGB")).astype(int)
    assert sheet.shape[1] == 1200
    cell = 1200 // 3

    def reddish(x: int) -> int:  # pixels of the cell's left frame edge that are strongly red
        col = sheet[20 : cell - 20, x + 4]
        return int(((col[:, 0] > 180) & (col[:, 1] < 80) & (col[:, 2] < 80)).sum())

    assert reddish(cell) > cell // 2  # #2 framed
    assert reddish(0) == 0 and reddish(2 * cell) == 0


def test_cli_dataset_exit_codes_and_json(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    picture(60).save(src / "ok.png")
    (src / "bad.png").write_bytes(b"junk")
    run = [sys.executable, "-m", "bot.cli", "dataset"]
    ok = subprocess.run([*run, str(src), "--out", str(tmp_path / "out"), "--repeats", "3", "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["subset"] == "3_out" and [e["status"] for e in report["entries"]] == [
        "rejected",
        "accepted",
    ]
    none = subprocess.run([*run, str(src / "bad.png"), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert none.returncode == 1 and "bad.png" in none.stdout and "Traceback" not in none.stderr
    wrong = subprocess.run([*run, str(src), "--out", str(tmp_path / "o3"), "--set", "max_images=0"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert wrong.returncode == 2 and "max_images" in wrong.stderr


def test_spec_refuses_bad_settings():
    with pytest.raises(SpecError, match="name"):
        IntakeSpec.parse({"sources": ["x"], "output_dir": "o", "name": "../up"})
    with pytest.raises(SpecError, match="sources"):
        IntakeSpec.parse({"sources": [], "output_dir": "o"})


def test_phone_location_data_is_removed(tmp_path):
    from PIL import ExifTags

    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Phone"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (35.0, 39.0, 29.0)
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "N"
    picture(30).save(src / "located.jpg", quality=95, exif=exif)
    picture(31).save(src / "plain.jpg", quality=95)
    assert Image.open(src / "located.jpg").getexif().get_ifd(ExifTags.IFD.GPSInfo)
    report = build_dataset(_spec([src], tmp_path / "out"))
    e = {x.source: x for x in report.entries}
    located = Image.open(tmp_path / "out" / e["src/located.jpg"].stored)
    assert not located.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert "location data (GPS) removed" in e["src/located.jpg"].changes
    assert (tmp_path / "out" / e["src/plain.jpg"].stored).read_bytes() == (src / "plain.jpg").read_bytes()

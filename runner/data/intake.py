"""Whatever a member uploads (files, folders, zips) → a clean kohya dataset folder, a report, a contact sheet.

Every image is decoded for real, turned upright (EXIF), made 8-bit RGB on white and numbered:
``output_dir/{repeats}_{name}/0001.jpg`` with its caption beside it as ``0001.txt``. Files that
needed nothing are copied byte for byte; the rest are re-encoded (JPEG for photos, PNG otherwise).
The number is the one on the contact sheet, so a member can say "drop 3 and 7". The report and
the contact sheet go in ``output_dir/.intake/``, which the trainer and tagger skip (hidden).

Nothing from an upload decides where a file is written: zip member names are only read, never
used as paths, so ``../``, absolute names and links cannot escape; they are refused and reported.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import imagehash
import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from ..spec import IntakeSpec
from .images import decode_caption, image_files, is_hidden, to_rgb, unreadable_reason

REPORT_DIR = ".intake"
CAPTION_EXTENSIONS = (".txt", ".caption")
_MAX_CAPTION_BYTES = 1 << 16
_COPY_AS_IS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
_LOSSY = {"JPEG", "HEIF", "AVIF", "MPO"}
_SHEET_WIDTH = 1200
_SHEET_PAGE = 48  # 8 rows of 6: one phone screen's worth of scrolling per image
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"avc1"}


class IntakeEntry(BaseModel):
    source: str = Field(description="the name as the member sent it; inside a zip: 'pics.zip/dir/a.png'")
    status: Literal["accepted", "converted", "rejected"]
    number: int | None = Field(None, description="on the contact sheet and in the stored file's name")
    stored: str | None = Field(None, description="path relative to the output folder")
    size: tuple[int, int] | None = None
    changes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None
    caption: bool = False
    duplicate_of: int | None = None


class IntakeReport(BaseModel):
    output_dir: str
    subset: str
    entries: list[IntakeEntry]
    images_in_dataset: int
    contact_sheets: list[str] = Field(default_factory=list)
    report_file: str = ""

    @property
    def accepted(self) -> list[IntakeEntry]:
        return [e for e in self.entries if e.status != "rejected"]

    def lines(self) -> list[str]:
        """The report in words a member understands, one line per input."""
        out = []
        for e in self.entries:
            if e.status == "rejected":
                out.append(f"✗ {e.source}: {e.reason}")
                continue
            what = "ok" if e.status == "accepted" else ", ".join(e.changes)
            caption = ", caption kept" if e.caption else ""
            flags = "".join(f" ⚠ {w}" for w in e.warnings)
            out.append(f"#{e.number} {e.source} ({what}{caption}){flags}")
        rejected = len(self.entries) - len(self.accepted)
        out.append(
            f"{len(self.accepted)} image(s) added, {rejected} refused; "
            f"{self.images_in_dataset} in {self.subset}/"
        )
        return out


@dataclass
class _Candidate:
    source: str
    read: Callable[[], bytes]  # raises _Refused with the reason
    caption: Callable[[], bytes | None]


class _Refused(Exception):
    """One input that cannot be used; the message is for the member."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MB"


# ---- where the files come from ----


def _caption_order(spec: IntakeSpec) -> list[str]:
    return list(dict.fromkeys([spec.caption_extension, *CAPTION_EXTENSIONS]))


def _listing(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in folder.iterdir()}


def _file_candidates(
    path: Path, spec: IntakeSpec, display: str, listing: dict[str, Path] | None = None
) -> Iterator[_Candidate | IntakeEntry]:
    listing = _listing(path.parent) if listing is None else listing
    caption_exts = _caption_order(spec)

    def read() -> bytes:
        size = path.stat().st_size
        if size > spec.max_file_mb * 2**20:
            raise _Refused(f"file is {_mb(size)}; the limit is {_mb(spec.max_file_mb * 2**20)}")
        return path.read_bytes()

    def caption() -> bytes | None:
        for ext in caption_exts:
            found = listing.get((path.stem + ext).lower())
            if found is not None and found.is_file() and not found.is_symlink():
                return found.read_bytes()[:_MAX_CAPTION_BYTES]
        return None

    yield _Candidate(display, read, caption)


def _folder_candidates(root: Path, spec: IntakeSpec, out: Path) -> Iterator[_Candidate | IntakeEntry]:
    for folder, dirs, files in os.walk(root):
        # The output folder may sit inside a source folder; what intake writes is not an input.
        dirs[:] = sorted(
            d for d in dirs if not is_hidden(d) and (Path(folder) / d).resolve() != out.resolve()
        )
        listing = _listing(Path(folder))
        for name in sorted(files):
            path = Path(folder) / name
            display = f"{root.name}/{path.relative_to(root).as_posix()}"
            if is_hidden(name) or path.suffix.lower() in _caption_order(spec):
                continue
            if path.is_symlink():
                yield _rejected(display, "a link to another file, not an image; send the file itself")
            elif path.suffix.lower() == ".zip":
                yield _rejected(display, "a zip inside a folder is not opened; send the zip on its own")
            else:
                yield from _file_candidates(path, spec, display, listing)


def _rejected(source: str, reason: str) -> IntakeEntry:
    return IntakeEntry(source=source, status="rejected", reason=reason)


def _member_name(info: zipfile.ZipInfo) -> str:
    """The member's real name: zips from Japanese Windows store cp932 without saying so."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437")
    for encoding in ("utf-8", "cp932"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return info.filename


def _unsafe(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or re.match(r"[A-Za-z]:", path) is not None or ".." in path.split("/")


def _is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _zip_entries(path: Path) -> int | None:
    """The entry count a zip's end record declares, read without parsing its directory (which for
    millions of entries takes minutes and gigabytes); None when there is no end record.
    ``zipfile._EndRecData`` is zipfile's own reader of that record (zip64 included); it is private
    but has not changed since Python 2, and there is no public way to get the count alone."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # noqa: SLF001
    return None if end is None else end[zipfile._ECD_ENTRIES_TOTAL]  # noqa: SLF001


def _zip_candidates(path: Path, spec: IntakeSpec, display: str) -> Iterator[_Candidate | IntakeEntry]:
    try:
        entries = _zip_entries(path)
        if entries is not None and entries > spec.max_zip_members:
            yield _rejected(
                display,
                f"holds {entries} files, more than the {spec.max_zip_members} a zip may hold; "
                "nothing in it was unpacked: send a zip of just the images you want to train on",
            )
            return
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        yield _rejected(display, f"not a zip that can be opened ({e}); zip the images again")
        return
    with zf:
        if len(zf.infolist()) > spec.max_zip_members:  # its end record understated the count
            yield _rejected(
                display,
                f"holds more than the {spec.max_zip_members} files a zip may hold; nothing was unpacked",
            )
            return
        members = [(info, _member_name(info)) for info in zf.infolist() if not info.is_dir()]
        by_name = {name.replace("\\", "/").lower(): info for info, name in members}
        budget = {"left": spec.max_zip_mb * 2**20}
        caption_exts = _caption_order(spec)
        for info, name in members:
            source = f"{display}/{name}"
            parts = PurePosixPath(name.replace("\\", "/")).parts
            suffix = PurePosixPath(name).suffix.lower()
            if _unsafe(name):
                yield _rejected(source, "its path points outside the zip's folder (unsafe zip); skipped")
            elif any(is_hidden(p) for p in parts) or suffix in caption_exts:
                continue
            elif _is_link(info):
                yield _rejected(source, "a link to another file, not an image; skipped")
            elif suffix == ".zip":
                yield _rejected(source, "a zip inside the zip is not opened; unzip it and send its images")
            elif info.flag_bits & 0x1:
                yield _rejected(source, "password-protected in the zip; zip it again without a password")
            else:
                stem = name.replace("\\", "/").lower()[: len(name) - len(suffix)]
                captions = [by_name.get(stem + ext) for ext in caption_exts]
                yield _Candidate(
                    source,
                    _zip_reader(zf, info, spec, budget),
                    _zip_caption(zf, next((c for c in captions if c is not None), None)),
                )


def _zip_reader(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, spec: IntakeSpec, budget: dict[str, float]
) -> Callable[[], bytes]:
    limit = int(spec.max_file_mb * 2**20)

    def read() -> bytes:
        if info.file_size > spec.max_zip_ratio * max(info.compress_size, 1):
            raise _Refused(
                f"unpacks to {info.file_size / max(info.compress_size, 1):.0f}× its packed size "
                "(a zip bomb?); skipped"
            )
        if info.file_size > limit:
            raise _Refused(f"file is {_mb(info.file_size)}; the limit is {_mb(limit)}")
        if info.file_size > budget["left"]:
            raise _Refused(
                f"the zip unpacks to more than {_mb(spec.max_zip_mb * 2**20)}; the rest of it was not read"
            )
        try:
            with zf.open(info) as f:
                # The sizes in a zip's header can lie; never read more than the limit allows.
                data = f.read(min(limit, int(budget["left"])) + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as e:
            raise _Refused(f"damaged inside the zip ({e}); zip it again") from None
        budget["left"] -= len(data)
        if len(data) > limit or budget["left"] < 0:
            raise _Refused("unpacks to more than its zip says (a zip bomb?); skipped")
        return data

    return read


def _zip_caption(zf: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        if info is None or info.file_size > _MAX_CAPTION_BYTES or _is_link(info):
            return None
        try:
            with zf.open(info) as f:
                return f.read(_MAX_CAPTION_BYTES)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError):
            return None

    return read


def _candidates(spec: IntakeSpec, out: Path) -> Iterator[_Candidate | IntakeEntry]:
    for src in spec.sources:
        path = Path(src).expanduser()
        display = path.name or src
        if not path.exists():
            yield _rejected(src, "not found")
        elif path.resolve().is_relative_to(out.resolve()):
            yield _rejected(src, "is inside the output folder; give another output folder")
        elif path.is_dir():
            yield from _folder_candidates(path, spec, out)
        elif path.suffix.lower() == ".zip":
            yield from _zip_candidates(path, spec, display)
        else:
            yield from _file_candidates(path, spec, display)


# ---- one image ----


def register_optional_decoders() -> bool:
    """HEIC through pillow-heif when it is installed (current Pillow wheels read AVIF themselves)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _not_an_image(data: bytes) -> str:
    head = data[:64]
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    if brand in _HEIC_BRANDS:
        return (
            "an iPhone HEIC photo, which this server cannot read yet (its owner can add "
            "pip install 'loracord[heic]'); send it as JPEG (iPhone: Settings › Camera › Formats › Most Compatible)"
        )
    if brand in (b"avif", b"avis"):
        return "an AVIF image this server cannot read; send it as JPEG or PNG"
    if brand in _VIDEO_BRANDS:
        return "a video, not an image; send a screenshot of the frame you want"
    if head.startswith(b"%PDF"):
        return "a PDF, not an image; export the page as PNG"
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "a text file, not an image (was it renamed?)"
    return "not an image that can be read (damaged, or a type that is not supported)"


@dataclass
class _Decoded:
    rgb: Image.Image
    changes: list[str]
    source_format: str
    as_is: bool  # the original bytes can be stored unchanged


def _decode(data: bytes, spec: IntakeSpec) -> _Decoded:
    if not data:
        raise _Refused("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "?"
                w, h = img.size
                if w * h > spec.max_megapixels * 1e6:
                    raise _Refused(
                        f"{w}×{h} is {w * h / 1e6:.0f} megapixels; the limit is {spec.max_megapixels:g}. "
                        "Send a smaller version"
                    )
                frames = getattr(img, "n_frames", 1)
                img.load()
                exif = img.getexif()
                rotated = exif.get(ExifTags.Base.Orientation, 1) != 1
                # Phones record where a photo was taken; the server owner has no business with it.
                located = bool(exif.get_ifd(ExifTags.IFD.GPSInfo))
                rgb, changes = to_rgb(ImageOps.exif_transpose(img))
    except _Refused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Refused("too many pixels to open safely (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise _Refused(_not_an_image(data)) from None
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, …)
        raise _Refused(unreadable_reason(e)) from None
    if min(rgb.size) < spec.min_side:
        raise _Refused(
            f"only {rgb.width}×{rgb.height} px; at least {spec.min_side} px on the short side is needed"
        )
    if rotated:
        changes.insert(0, "turned upright (EXIF)")
    if frames > 1:
        changes.append(f"first frame of {frames} kept")
    if located:
        changes.append("location data (GPS) removed")
    as_is = not changes and fmt in _COPY_AS_IS
    return _Decoded(rgb, changes, fmt, as_is)


def _store(decoded: _Decoded, data: bytes, folder: Path, number: int) -> tuple[Path, list[str]]:
    if decoded.as_is:
        path = folder / f"{number:04d}{_COPY_AS_IS[decoded.source_format]}"
        path.write_bytes(data)
        return path, []
    lossy = decoded.source_format in _LOSSY
    path = folder / f"{number:04d}{'.jpg' if lossy else '.png'}"
    target = "JPEG" if lossy else "PNG"
    if lossy:
        decoded.rgb.save(path, "JPEG", quality=95)
    else:
        decoded.rgb.save(path, "PNG")
    return path, ([] if decoded.source_format == target else [f"{decoded.source_format} → {target}"])


def _caption_text(raw: bytes | None, source: str, warnings_: list[str]) -> str | None:
    if raw is None:
        return None
    try:
        return decode_caption(raw).strip()
    except UnicodeDecodeError:
        warnings_.append(f"the caption of {source} is not UTF-8 text and was left out")
        return None


# ---- the whole intake ----


@dataclass
class _Look:
    """What makes two pictures the same to a member: layout (perceptual hash) and colours."""

    phash: imagehash.ImageHash
    colours: np.ndarray  # 4×4 average colours

    @classmethod
    def of(cls, rgb: Image.Image) -> _Look:
        tiny = np.asarray(rgb.resize((4, 4), Image.Resampling.BOX), dtype=np.float32)
        return cls(imagehash.phash(rgb), tiny)

    def distance(self, other: _Look) -> int:
        # A perceptual hash ignores colour (a red and a grey square hash alike), so a recoloured
        # picture counts as different; a re-encoded or resized one does not.
        if np.abs(self.colours - other.colours).mean() > 24:
            return 64
        return self.phash - other.phash


def subset_folder(spec: IntakeSpec) -> Path:
    out = Path(spec.output_dir).expanduser()
    return out / f"{spec.num_repeats}_{spec.name or out.resolve().name or 'images'}"


def _existing(folder: Path) -> dict[int, Path]:
    numbered = {}
    for path in image_files(folder)[0] if folder.is_dir() else []:
        if path.parent == folder and path.stem.isdigit():
            numbered[int(path.stem)] = path
    return numbered


def build_dataset(spec: IntakeSpec) -> IntakeReport:
    """Take every input in ``spec.sources`` into ``subset_folder(spec)``; never raises for bad input."""
    register_optional_decoders()
    out = Path(spec.output_dir).expanduser()
    folder = subset_folder(spec)
    folder.mkdir(parents=True, exist_ok=True)
    existing = _existing(folder)
    count = len(image_files(folder)[0])
    number = max(existing, default=0) + 1
    hashes: list[tuple[int, _Look]] = []
    thumbs: dict[int, Image.Image] = {}
    for n, path in existing.items():
        try:
            with Image.open(path) as img:
                rgb, _ = to_rgb(ImageOps.exif_transpose(img))
        except Exception:  # a file someone put there by hand; it is the trainer's to refuse
            continue
        hashes.append((n, _Look.of(rgb)))
        thumbs[n] = _thumbnail(rgb)

    entries: list[IntakeEntry] = []
    for cand in _candidates(spec, out):
        if isinstance(cand, IntakeEntry):
            entries.append(cand)
            continue
        if count >= spec.max_images:
            entries.append(
                _rejected(cand.source, f"the dataset already has {count} images, the most allowed")
            )
            continue
        try:
            data = cand.read()
            decoded = _decode(data, spec)
        except _Refused as e:
            entries.append(_rejected(cand.source, str(e)))
            continue
        except OSError as e:
            entries.append(_rejected(cand.source, f"cannot be read ({e.strerror or e})"))
            continue
        entry = _accept(cand, data, decoded, spec, folder, number, hashes)
        thumbs[number] = _thumbnail(decoded.rgb)
        entries.append(entry)
        number += 1
        count += 1

    flagged = {e.number: e.warnings for e in entries if e.number is not None and e.warnings}
    report = IntakeReport(output_dir=str(out), subset=folder.name, entries=entries, images_in_dataset=count)
    report_dir = out / REPORT_DIR
    report_dir.mkdir(exist_ok=True)
    report.contact_sheets = [
        str(p) for p in write_contact_sheets(thumbs, flagged, report_dir / "contact_sheet")
    ]
    report.report_file = str(report_dir / "report.json")
    Path(report.report_file).write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return report


def _accept(
    cand: _Candidate,
    data: bytes,
    decoded: _Decoded,
    spec: IntakeSpec,
    folder: Path,
    number: int,
    hashes: list[tuple[int, _Look]],
) -> IntakeEntry:
    w, h = decoded.rgb.size
    entry_warnings = []
    if w * h < spec.resolution**2 / 2:
        scale = math.sqrt(spec.resolution**2 / (w * h))
        entry_warnings.append(
            f"small ({w}×{h}) for {spec.resolution} px training: enlarged {scale:.1f}×, may look soft"
        )
    look = _Look.of(decoded.rgb)
    near = min(((look.distance(other), n) for n, other in hashes), default=None)
    duplicate_of = None
    if near is not None and near[0] <= spec.duplicate_distance:
        duplicate_of = near[1]
        entry_warnings.append(
            f"same picture as #{duplicate_of}" if near[0] == 0 else f"looks almost like #{duplicate_of}"
        )
    hashes.append((number, look))
    caption = _caption_text(cand.caption(), cand.source, entry_warnings)
    path, format_change = _store(decoded, data, folder, number)
    if caption:
        (folder / f"{number:04d}{spec.caption_extension}").write_text(caption + "\n", encoding="utf-8")
    changes = decoded.changes + format_change
    return IntakeEntry(
        source=cand.source,
        status="converted" if changes else "accepted",
        number=number,
        stored=path.relative_to(Path(spec.output_dir).expanduser()).as_posix(),
        size=(w, h),
        changes=changes,
        warnings=entry_warnings,
        caption=bool(caption),
        duplicate_of=duplicate_of,
    )


# ---- contact sheet ----


def _thumbnail(rgb: Image.Image) -> Image.Image:
    thumb = rgb.copy()
    thumb.thumbnail((400, 400), Image.Resampling.LANCZOS)
    return thumb


def write_contact_sheets(
    thumbs: dict[int, Image.Image], flagged: dict[int, list[str]], stem: Path
) -> list[Path]:
    """Numbered thumbnails, flagged ones framed in red with a short note; one JPEG per 48 images."""
    numbers = sorted(thumbs)
    pages = [numbers[i : i + _SHEET_PAGE] for i in range(0, len(numbers), _SHEET_PAGE)]
    paths = []
    for index, page in enumerate(pages, 1):
        path = stem.with_name(f"{stem.name}.jpg" if index == 1 else f"{stem.name}_{index}.jpg")
        _sheet(page, thumbs, flagged).save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


def _sheet(numbers: list[int], thumbs: dict[int, Image.Image], flagged: dict[int, list[str]]) -> Image.Image:
    cols = 3 if len(numbers) <= 9 else 4 if len(numbers) <= 16 else 6
    cell = _SHEET_WIDTH // cols
    band = cell // 6  # the note under a flagged image
    rows = math.ceil(len(numbers) / cols)
    sheet = Image.new("RGB", (_SHEET_WIDTH, rows * (cell + band)), "white")
    draw = ImageDraw.Draw(sheet)
    big = ImageFont.load_default(size=cell // 6)
    small = ImageFont.load_default(size=max(12, band // 2))
    red = (220, 30, 30)
    for i, n in enumerate(numbers):
        x, y = (i % cols) * cell, (i // cols) * (cell + band)
        thumb = thumbs[n].copy()
        thumb.thumbnail((cell - 12, cell - 12))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        notes = flagged.get(n)
        if notes:
            draw.rectangle([x + 2, y + 2, x + cell - 3, y + cell - 3], outline=red, width=6)
            note = _short_note(notes)
            draw.text((x + cell // 2, y + cell + band // 2), note, fill=red, font=small, anchor="mm")
        left, top, right, bottom = draw.textbbox((x + 10, y + 10), str(n), font=big)
        draw.rectangle([left - 6, top - 6, right + 6, bottom + 6], fill=red if notes else (0, 0, 0))
        draw.text((x + 10, y + 10), str(n), fill="white", font=big)
    return sheet


def _short_note(notes: list[str]) -> str:
    words = []
    for note in notes:
        m = re.search(r"#(\d+)", note)
        words.append(f"like #{m.group(1)}" if m else note.split(" ", 1)[0])
    return ", ".join(words)

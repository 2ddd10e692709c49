"""What members upload, good and bad, built in the test: phone photos, odd modes, junk, hostile zips."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A smooth random picture; different seeds give perceptually different images (flat colours would not)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(path: Path, seed: int) -> Image.Image:
    """A landscape JPEG whose EXIF says 'rotate 90° clockwise to view' (orientation 6), as phones write."""
    stored = picture(seed, (240, 160))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(jpeg_bytes(stored, exif=exif))
    return stored


def cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (200, 160), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK


def sixteen_bit_png(path: Path) -> None:
    Image.fromarray(np.full((160, 200), 128 * 256, np.uint16)).save(path)  # mid grey in 16 bits


def palette_png_with_transparency(path: Path) -> None:
    img = Image.new("P", (200, 160), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (100, 0, 200, 160))  # right half blue, left half colour 0 = transparent
    img.save(path, transparency=0)


def animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (200, 160), c) for c in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated_jpeg(path: Path, seed: int) -> None:
    data = jpeg_bytes(picture(seed))
    path.write_bytes(data[: len(data) // 2])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def decompression_bomb_png(path: Path, side: int = 30000) -> None:
    """A 1-bit PNG of side×side black pixels: ~100 KB on disk, gigabytes once decoded."""
    row = b"\0" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def zip_bomb(path: Path, megabytes: int = 64) -> None:
    """One member that unpacks to ``megabytes`` of zeros from a few dozen KB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("huge.png", "w") as f:
        chunk = b"\0" * 2**20
        for _ in range(megabytes):
            f.write(chunk)


def hostile_zip(path: Path, good: bytes) -> None:
    """Traversal (../, absolute, drive letter), a symlink, a nested zip and macOS litter, plus one good image."""
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as inner:
        inner.writestr("inner.jpg", good)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../escape.jpg", good)
        zf.writestr("/etc/absolute.jpg", good)
        zf.writestr("C:\\Windows\\drive.jpg", good)
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "../../../../etc/passwd")
        zf.writestr("nested.zip", nested.getvalue())
        zf.writestr("__MACOSX/._good.jpg", b"\0\5\26\7 resource fork")
        zf.writestr(".hidden.jpg", good)
        zf.writestr("dir/good.jpg", good)
        zf.writestr("dir/good.txt", "1girl, smile\n")


def cp932_named_zip(path: Path, name: str, data: bytes) -> None:
    """A zip as Japanese Windows writes it: the name in Shift-JIS, without the UTF-8 flag."""
    raw = name.encode("cp932")
    placeholder = b"X" * len(raw)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(placeholder.decode("ascii"), data)
    path.write_bytes(path.read_bytes().replace(placeholder, raw))

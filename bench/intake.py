"""Dataset intake throughput (images/s) through ``runner.data.intake.build_dataset``: loose files and a zip.

The uploads are generated photos-like JPEGs (all different, so none is dropped as a duplicate),
each with a caption file, as a member's phone sends them.

    python -m bench.intake --images 40 --size 1536x1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from runner.data.intake import build_dataset
from runner.spec import IntakeSpec

from .common import emit
from .data import make_image


def uploads(folder: Path, count: int, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        img, caption = make_image(1000 + i, size)
        img.save(folder / f"IMG_{i:04d}.jpg", quality=90)
        (folder / f"IMG_{i:04d}.txt").write_text(caption, encoding="utf-8")
    return folder


def timed(sources: list[Path], out: Path, count: int) -> float:
    spec = IntakeSpec(sources=[str(s) for s in sources], output_dir=str(out), name="sks", max_images=count)
    started = time.monotonic()
    report = build_dataset(spec)
    seconds = time.monotonic() - started
    if len(report.accepted) != count:
        raise SystemExit(f"intake kept {len(report.accepted)} of {count} images: {report.lines()[:5]}")
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="loracord-intakebench-") as tmp:
        root = Path(tmp)
        files = uploads(root / "upload", args.images, (w, h))
        archive = root / "upload.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(files.iterdir()):
                zf.write(p, p.name)
        timed([files], root / "warm-up", args.images)  # imports and decoder set-up stay out of the figures
        folder_s = timed([files], root / "out-folder", args.images)
        zip_s = timed([archive], root / "out-zip", args.images)
    return emit(
        "loracord",
        "intake",
        settings={"images": args.images, "size": f"{w}x{h}", "format": "JPEG + .txt captions"},
        images_per_s_folder=round(args.images / folder_s, 2),
        images_per_s_zip=round(args.images / zip_s, 2),
        seconds=round(folder_s + zip_s, 2),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--size", default="1536x1024")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where members' files live: ``DATA/members/<member>/{datasets,loras,gen}/…``.

Every path built from a member's input goes through `member_path`, which refuses anything that
would land outside that member's folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from runner.data.images import image_files, is_hidden
from runner.spec import SpecError

_REPEATS_FOLDER = re.compile(r"(\d+)_.*", re.S)
_MEMBER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class PathError(ValueError):
    """A name that would leave the member's folder; the message says which."""


class DiskFull(OSError):
    """Less free disk than ``[data] min_free_gb``; the message is for members and the operator."""


def check_free_disk(data_dir: Path, min_free_gb: float, needed: int = 0) -> None:
    """Refuse before anything is written when the data folder's disk would go below the minimum
    (``needed``: the bytes about to be written)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    if free - needed < min_free_gb * 2**30:
        raise DiskFull(
            f"the server's disk is nearly full ({free / 2**30:.1f} GB free, {min_free_gb:g} GB needed); "
            "nothing was saved: try again once the owner has made room"
        )


def storage_bytes(data_dir: Path, member: str) -> int:
    """What the member's LoRAs (every saved epoch, its previews, the library) take on disk.

    Read from the disk rather than the database so that whatever is deleted frees its quota at
    once; hard links (the final file, library entries) share one inode and are counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in ("loras", "library"):
        for path in member_dir(data_dir, member).joinpath(folder).rglob("*"):
            try:
                st = path.lstat()
            except FileNotFoundError:  # deleted while counting
                continue
            if path.is_symlink() or not path.is_file() or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def member_dir(data_dir: Path, member: str) -> Path:
    if not _MEMBER_ID.fullmatch(member):
        raise PathError(f"member id '{member}' may only use letters, digits, '_' and '-'")
    return data_dir / "members" / member


def member_path(data_dir: Path, member: str, *parts: str) -> Path:
    root = member_dir(data_dir, member).resolve()
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise PathError(f"'{part}' cannot be used as a name here: no slashes, no '..'")
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise PathError(f"'{'/'.join(parts)}' points outside your folder")
    return path


def dataset_images(folder: Path, default_repeats: int = 1) -> tuple[int, int]:
    """(images, images × repeats) of a kohya-layout folder, for estimates before training.

    The repeats rule is runner.data.dataset's (the nearest ``N_name`` folder above an image), which
    cannot be imported here because it loads torch.
    """
    images, _ = image_files(folder)
    weighted = 0
    for image in images:
        repeats = default_repeats
        for name in reversed(image.parent.relative_to(folder).parts):
            m = _REPEATS_FOLDER.fullmatch(name)
            if m:
                repeats = int(m.group(1))
                break
        weighted += repeats
    return len(images), weighted


def import_dataset(source: Path, target: Path) -> None:
    """Copy the operator's folder into the member's datasets, so jobs never read outside DATA."""
    if not source.is_dir():
        raise SpecError(f"dataset folder '{source}' does not exist or is not a folder")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        source, target, symlinks=False, ignore=lambda _, names: [n for n in names if is_hidden(n)]
    )


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

"""The members' LoRA libraries: a picked epoch becomes ``DATA/members/<id>/library/<name>.safetensors``
(so A1111's ``<lora:name:w>`` matches the file). ``/gen`` finds LoRAs only here, by name, never by
path. Shared by the Discord side (``/loras``, the thread's buttons) and the web pages.

The table is ``discord_library`` (its schema is a migration in ``bot.store``).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

from sqlite_utils import Database

from . import store
from .config import Config
from .files import member_path


@dataclass
class Lora:
    owner: str
    name: str
    path: str
    job_id: int | None
    epoch: int | None
    base: str | None
    shared: int
    size: int
    created_at: float


_LORA = [f.name for f in fields(Lora)]


def put_lora(db: Database, lora: Lora) -> None:
    db["discord_library"].upsert({k: getattr(lora, k) for k in _LORA}, pk=("owner", "name"))


def loras_for(db: Database, member: str) -> list[Lora]:
    """The member's own LoRAs, then those others shared, each list by name."""
    sql = (
        "SELECT * FROM discord_library WHERE owner = ? OR shared = 1 "
        "ORDER BY owner != ?, name COLLATE NOCASE, created_at"
    )
    return [Lora(**{k: r[k] for k in _LORA}) for r in db.query(sql, [member, member])]


def get_lora(db: Database, owner: str, name: str) -> Lora | None:
    rows = list(db.query("SELECT * FROM discord_library WHERE owner = ? AND name = ?", [owner, name]))
    return Lora(**{k: rows[0][k] for k in _LORA}) if rows else None


def lora_rowid(db: Database, lora: Lora) -> int:
    """A short, stable handle for a library entry in a ``custom_id`` (names can be 80 characters)."""
    sql = "SELECT rowid FROM discord_library WHERE owner = ? AND name = ?"
    return db.execute(sql, [lora.owner, lora.name]).fetchone()[0]


def lora_by_rowid(db: Database, rowid: int) -> Lora | None:
    rows = list(db.query("SELECT * FROM discord_library WHERE rowid = ?", [rowid]))
    return Lora(**{k: rows[0][k] for k in _LORA}) if rows else None


def set_shared(db: Database, owner: str, name: str, shared: bool) -> None:
    db.execute(
        "UPDATE discord_library SET shared = ? WHERE owner = ? AND name = ?", [int(shared), owner, name]
    )


def delete_lora(db: Database, owner: str, name: str | None = None) -> list[Lora]:
    """Remove one entry (or all of a member's); returns what was removed so its files can go too."""
    gone = [lo for lo in loras_for(db, owner) if lo.owner == owner and name in (None, lo.name)]
    for lo in gone:
        db.execute("DELETE FROM discord_library WHERE owner = ? AND name = ?", [owner, lo.name])
    return gone


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # same disk: no second copy of a large file
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def keep_epoch(
    db: Database, cfg: Config, job: store.Job, epoch: int | None, lora_file: str | None = None
) -> Lora:
    """Put epoch ``epoch`` of training job ``job`` (or ``lora_file``) in its owner's library under the job's name."""
    if lora_file is None:
        arts = [a for a in store.artifacts(db, job.id) if a["kind"] == "lora" and a["epoch"] == epoch]
        if not arts:
            raise LookupError(f"epoch {epoch} of job #{job.id} was not saved")
        lora_file = arts[-1]["path"]
    target = member_path(cfg.data_dir, job.owner, "library", f"{job.name}.safetensors")
    _link_or_copy(Path(lora_file), target)
    bases = {v: k for k, v in cfg.bases.items()}
    old = get_lora(db, job.owner, job.name)
    lora = Lora(
        owner=job.owner,
        name=job.name,
        path=str(target),
        job_id=job.id,
        epoch=epoch,
        base=bases.get(job.spec_dict.get("base", "")),
        shared=old.shared if old else 0,
        size=target.stat().st_size,
        created_at=time.time(),
    )
    put_lora(db, lora)
    return lora


def delete(db: Database, cfg: Config, lo: Lora) -> None:
    """Remove a library entry and the files of the training behind it (every saved epoch and its
    previews), so the member's storage quota gets all of that space back."""
    delete_lora(db, lo.owner, lo.name)
    Path(lo.path).unlink(missing_ok=True)
    if lo.job_id is not None:
        shutil.rmtree(member_path(cfg.data_dir, lo.owner, "loras", str(lo.job_id)), ignore_errors=True)
        store.delete_artifacts(db, lo.owner, lo.job_id)


def resolve(db: Database, member: str, name: str) -> Lora:
    """A LoRA the member may use, by its library name: their own first, then one shared by others."""
    name = name.strip()
    choices = loras_for(db, member)
    for lo in choices:
        if lo.name == name or lo.name.casefold() == name.casefold():
            return lo
    mine = ", ".join(lo.name for lo in choices if lo.owner == member) or "none yet (train one with /train)"
    raise LookupError(f"there is no LoRA named '{name}' in your library or shared with you. Yours: {mine}")

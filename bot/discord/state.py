"""What the Discord side remembers beside the jobs: draft datasets and their threads, where each
job's messages are (the members' LoRA libraries are ``bot.library``).

Tables of their own in the bot's SQLite store (their schema is a migration in ``bot.store``), so a
restart finds every card, progress message and library entry again; jobs themselves stay there too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from typing import Any

from sqlite_utils import Database


@dataclass
class Draft:
    id: int
    owner: str
    name: str
    base: str
    thread_id: int
    card_id: int | None
    settings: str
    job_id: int | None
    tag_job_id: int | None
    progress_id: int | None
    created_at: float

    @property
    def settings_dict(self) -> dict[str, Any]:
        return json.loads(self.settings)

    @property
    def dataset(self) -> str:
        """The dataset folder's name under the member's datasets: the draft id, never member text."""
        return str(self.id)


_DRAFT = [f.name for f in fields(Draft)]


def _draft(rows: list[dict[str, Any]]) -> Draft | None:
    return Draft(**{k: rows[0][k] for k in _DRAFT}) if rows else None


def new_draft(
    db: Database, owner: str, name: str, base: str, thread_id: int, settings: dict[str, Any]
) -> Draft:
    row = {
        "owner": owner,
        "name": name,
        "base": base,
        "thread_id": thread_id,
        "settings": json.dumps(settings, ensure_ascii=False),
        "created_at": time.time(),
    }
    draft_id = db["discord_drafts"].insert(row).last_pk
    return get_draft(db, draft_id)


def get_draft(db: Database, draft_id: int) -> Draft | None:
    return _draft(list(db.query("SELECT * FROM discord_drafts WHERE id = ?", [draft_id])))


def draft_in_thread(db: Database, thread_id: int) -> Draft | None:
    return _draft(list(db.query("SELECT * FROM discord_drafts WHERE thread_id = ?", [thread_id])))


def draft_of_job(db: Database, job_id: int) -> Draft | None:
    sql = "SELECT * FROM discord_drafts WHERE job_id = ? OR tag_job_id = ?"
    return _draft(list(db.query(sql, [job_id, job_id])))


def latest_draft(db: Database, owner: str) -> Draft | None:
    sql = "SELECT * FROM discord_drafts WHERE owner = ? AND job_id IS NULL ORDER BY id DESC LIMIT 1"
    return _draft(list(db.query(sql, [owner])))


def open_drafts(db: Database, owner: str) -> list[Draft]:
    """The member's drafts not started yet, oldest first."""
    sql = "SELECT * FROM discord_drafts WHERE owner = ? AND job_id IS NULL ORDER BY id"
    return [Draft(**{k: r[k] for k in _DRAFT}) for r in db.query(sql, [owner])]


def stale_drafts(db: Database, before: float) -> list[Draft]:
    """Drafts of any member made before ``before`` and never started."""
    sql = "SELECT * FROM discord_drafts WHERE job_id IS NULL AND created_at < ? ORDER BY id"
    return [Draft(**{k: r[k] for k in _DRAFT}) for r in db.query(sql, [before])]


def update_draft(db: Database, draft_id: int, **values: Any) -> Draft:
    if "settings" in values:
        values["settings"] = json.dumps(values["settings"], ensure_ascii=False)
    db["discord_drafts"].update(draft_id, values)
    return get_draft(db, draft_id)


def drafts_of(db: Database, owner: str) -> list[Draft]:
    return [
        Draft(**{k: r[k] for k in _DRAFT})
        for r in db.query("SELECT * FROM discord_drafts WHERE owner = ?", [owner])
    ]


def delete_draft(db: Database, draft_id: int) -> None:
    db.execute("DELETE FROM discord_drafts WHERE id = ?", [draft_id])


def delete_drafts(db: Database, owner: str) -> None:
    db.execute("DELETE FROM discord_drafts WHERE owner = ?", [owner])


def claim_tap(db: Database, button: str, member: str) -> bool:
    """True the first time ``member`` uses ``button`` (a component's custom_id); False after,
    so a double tap starts one job. Call it in the transaction that starts the job."""
    sql = "INSERT INTO discord_taps (button, member, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
    return db.execute(sql, [button, member, time.time()]).rowcount == 1


# ---- where a job's result goes ----


def set_post(db: Database, job_id: int, channel_id: int, message_id: int | None, spoiler: bool) -> None:
    # Plain SQL: sqlite-utils' upsert reads the schema first, on every /gen.
    db.execute(
        "INSERT INTO discord_posts (job_id, channel_id, message_id, spoiler) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(job_id) DO UPDATE SET channel_id = excluded.channel_id, "
        "message_id = excluded.message_id, spoiler = excluded.spoiler",
        [job_id, channel_id, message_id, int(spoiler)],
    )


def get_post(db: Database, job_id: int) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM discord_posts WHERE job_id = ?", [job_id]))
    return rows[0] if rows else None

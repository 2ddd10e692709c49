"""SQLite (WAL) through sqlite-utils: the single source of truth, and every query there is.

The schema lives in ``MIGRATIONS``, applied in order at start-up (``PRAGMA user_version`` holds
the last one applied), so an old database is brought up to date in place. The connection runs
in autocommit mode; ``immediate`` takes the write lock for a read-check-write that must not
interleave with another process (the CLI and a running ``loracord run`` share the file).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlite_utils import Database

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")


def _m1_schema(db: Database) -> None:
    db["members"].create({"id": str, "roles": str, "created_at": float}, pk="id")
    db["datasets"].create(
        {"id": int, "owner": str, "name": str, "path": str, "images": int, "created_at": float},
        pk="id",
        foreign_keys=[("owner", "members", "id")],
    )
    db["datasets"].create_index(["owner", "name"], unique=True)
    db["jobs"].create(
        {
            "id": int,
            "kind": str,  # train | gen (| tag, …)
            "owner": str,
            "name": str,
            "state": str,
            "spec": str,  # JSON as the worker receives it
            "rate_key": str,  # jobs with the same key cost the same per step
            "steps": int,  # planned steps (× images for generation)
            "estimate_s": float,
            "submitted_at": float,
            "started_at": float,  # of the current attempt
            "finished_at": float,
            "worker": str,
            "attempts": int,
            "last_epoch": int,
            "run_seconds": float,  # GPU time over all attempts
            "cancel_requested": int,
            "progress": str,  # JSON of the last progress event
            "failure": str,
            "result": str,  # JSON of the done event
        },
        pk="id",
        not_null={"kind", "owner", "state", "spec", "submitted_at"},
        defaults={"attempts": 0, "last_epoch": 0, "run_seconds": 0.0, "cancel_requested": 0},
        foreign_keys=[("owner", "members", "id")],
    )
    db["jobs"].create_index(["state", "kind"])
    db["jobs"].create_index(["owner", "state"])
    db["jobs"].create_index(["rate_key", "state"])
    db["job_events"].create(
        {"id": int, "job_id": int, "at": float, "type": str, "data": str},
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
    )
    db["job_events"].create_index(["job_id"])
    db["artifacts"].create(
        {
            "id": int,
            "job_id": int,
            "owner": str,
            "kind": str,  # lora | image
            "epoch": int,
            "path": str,
            "sha256": str,
            "size": int,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
    )
    db["artifacts"].create_index(["job_id"])
    db["artifacts"].create_index(["path"], unique=True)
    db["ledger"].create({"id": int, "owner": str, "job_id": int, "at": float, "gpu_seconds": float}, pk="id")
    db["ledger"].create_index(["owner", "at"])
    db["quota_overrides"].create(
        {"scope": str, "subject": str, "key": str, "value": float}, pk=("scope", "subject", "key")
    )
    db["settings"].create({"key": str, "value": str}, pk="key")


def _m2_discord(db: Database) -> None:
    """The Discord side's tables: draft datasets and their threads, where each job's result is
    posted, the members' LoRA libraries. ``if_not_exists``: bots before this migration made them
    at start-up."""
    db["discord_drafts"].create(
        {
            "id": int,
            "owner": str,
            "name": str,  # the LoRA's name, as the member typed it
            "base": str,  # a [bases] name
            "thread_id": int,
            "card_id": int,  # the dataset card message
            "settings": str,  # JSON: trigger, preset, repeats, tags to remove, training overrides
            "job_id": int,  # the training job once started
            "tag_job_id": int,
            "progress_id": int,  # the progress message once started
            "created_at": float,
        },
        pk="id",
        if_not_exists=True,
    )
    db["discord_drafts"].create_index(["thread_id"], if_not_exists=True)
    db["discord_drafts"].create_index(["job_id"], if_not_exists=True)
    db["discord_posts"].create(
        {"job_id": int, "channel_id": int, "message_id": int, "spoiler": int}, pk="job_id", if_not_exists=True
    )
    db["discord_library"].create(
        {
            "owner": str,
            "name": str,
            "path": str,
            "job_id": int,
            "epoch": int,
            "base": str,
            "shared": int,
            "size": int,
            "created_at": float,
        },
        pk=("owner", "name"),
        if_not_exists=True,
    )


def _m3_outbox(db: Database) -> None:
    """What the bot still has to post to Discord for a job's events: written in the scheduler's
    path, delivered by the bot when Discord answers, so an outage delays posts and loses none."""
    db["discord_outbox"].create(
        {
            "id": int,
            "job_id": int,
            "event": str,  # the event's JSON, as the worker sent it
            "created_at": float,
            "attempts": int,
            "next_at": float,  # not tried again before this time (back-off after a failure)
            "sent_at": float,  # set once Discord took it; None: still to deliver
            "error": str,  # the last failure; with dropped=1, why it will never be posted
            "dropped": int,
        },
        pk="id",
    )
    db["discord_outbox"].create_index(["sent_at", "dropped", "id"])


def _m4_preview_seconds(db: Database) -> None:
    """A training job's estimate of its preview rounds, so the GPU time it measures can be split
    into training steps and previews (each is priced at its own rate)."""
    db["jobs"].add_column("preview_s", float)


def _m5_taps(db: Database) -> None:
    """Buttons that start work, each member's first tap: a double tap finds its row and starts nothing."""
    db["discord_taps"].create({"button": str, "member": str, "at": float}, pk=("button", "member"))


def _m6_web(db: Database) -> None:
    """The web pages: sessions opened by signed links (the token's hash, never the token), what
    admins did and who, and each training step's loss for the loss chart."""
    db["web_sessions"].create(
        {
            "token_hash": str,
            "member": str,
            "admin": int,
            "csrf": str,
            "created_at": float,
            "expires_at": float,
        },
        pk="token_hash",
    )
    db["web_sessions"].create_index(["expires_at"])
    db["admin_actions"].create(
        {"id": int, "at": float, "who": str, "via": str, "action": str, "detail": str}, pk="id"
    )
    db["job_losses"].create({"job_id": int, "step": int, "epoch": int, "loss": float}, pk=("job_id", "step"))


MIGRATIONS: list[Callable[[Database], None]] = [
    _m1_schema,
    _m2_discord,
    _m3_outbox,
    _m4_preview_seconds,
    _m5_taps,
    _m6_web,
]


def open_store(path: str | Path) -> Database:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    db = Database(conn)
    db.enable_wal()
    conn.execute("PRAGMA busy_timeout = 30000")
    # WAL with synchronous=NORMAL cannot corrupt; a power cut may lose the last commits only.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(db)
    return db


def migrate(db: Database) -> int:
    with immediate(db):
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            step(db)
            db.execute(f"PRAGMA user_version = {number}")
    return len(MIGRATIONS)


@contextmanager
def immediate(db: Database) -> Iterator[None]:
    """One write transaction, taken up front so a check and its write see the same data. Inside
    another it is part of that one (SQLite does not nest transactions)."""
    if db.conn.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# ---- members ----


def ensure_member(db: Database, member: str, roles: list[str] | None = None) -> None:
    db.execute(
        "INSERT INTO members (id, roles, created_at) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
        "roles = coalesce(excluded.roles, members.roles)",
        [member, None if roles is None else json.dumps(roles), time.time()],
    )


def member_roles(db: Database, member: str) -> list[str]:
    row = db.execute("SELECT roles FROM members WHERE id = ?", [member]).fetchone()
    return json.loads(row[0]) if row and row[0] else []


# ---- datasets ----


def add_dataset(db: Database, owner: str, name: str, path: str, images: int) -> int:
    cur = db.execute(
        "INSERT INTO datasets (owner, name, path, images, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(owner, name) DO UPDATE SET path = excluded.path, images = excluded.images "
        "RETURNING id",
        [owner, name, path, images, time.time()],
    )
    return cur.fetchone()[0]


# ---- jobs ----


@dataclass
class Job:
    id: int
    kind: str
    owner: str
    name: str | None
    state: str
    spec: str
    rate_key: str | None
    steps: int | None
    estimate_s: float | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    attempts: int
    last_epoch: int
    run_seconds: float
    cancel_requested: int
    progress: str | None
    failure: str | None
    result: str | None
    preview_s: float | None  # of estimate_s: the preview rounds of a training job

    @property
    def spec_dict(self) -> dict[str, Any]:
        return json.loads(self.spec)

    @property
    def progress_dict(self) -> dict[str, Any] | None:
        return json.loads(self.progress) if self.progress else None


_JOB_COLUMNS = [f.name for f in fields(Job)]
# The columns in Job's order: a row becomes a Job positionally, with no dict per row (the queue is
# read on every /gen and /queue, hundreds of rows each time under a crowd).
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"


def insert_job(
    db: Database,
    kind: str,
    owner: str,
    name: str | None,
    spec: dict[str, Any],
    rate_key: str,
    steps: int,
    estimate_s: float,
    preview_s: float = 0.0,
) -> int:
    cur = db.execute(
        "INSERT INTO jobs (kind, owner, name, state, spec, rate_key, steps, estimate_s, preview_s, "
        "submitted_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?) RETURNING id",
        [
            kind,
            owner,
            name,
            json.dumps(spec, ensure_ascii=False),
            rate_key,
            steps,
            estimate_s,
            preview_s,
            time.time(),
        ],
    )
    return cur.fetchone()[0]


def set_job_spec(db: Database, job_id: int, spec: dict[str, Any]) -> None:
    db.execute("UPDATE jobs SET spec = ? WHERE id = ?", [json.dumps(spec, ensure_ascii=False), job_id])


def get_job(db: Database, job_id: int) -> Job | None:
    row = db.execute(f"{_JOB_SELECT} WHERE id = ?", [job_id]).fetchone()
    return Job(*row) if row else None


def list_jobs(
    db: Database, states: tuple[str, ...] = STATES, owner: str | None = None, limit: int = 1000
) -> list[Job]:
    sql = f"{_JOB_SELECT} WHERE state IN ({', '.join('?' * len(states))})"
    params: list[Any] = list(states)
    if owner is not None:
        sql += " AND owner = ?"
        params.append(owner)
    sql += " ORDER BY submitted_at, id LIMIT ?"
    return [Job(*r) for r in db.execute(sql, [*params, limit]).fetchall()]


def count_jobs(db: Database, state: str) -> int:
    return db.execute("SELECT count(*) FROM jobs WHERE state = ?", [state]).fetchone()[0]


def short_jobs_ahead(db: Database, job_ids: list[int]) -> dict[int, tuple[int, float]]:
    """For each of ``job_ids`` that is queued and not training: how many such jobs are ahead of it
    and the sum of their estimates (``jobs.fair_order`` runs them first, in submit order). One
    pass over the queue in SQLite, whatever its length, instead of its rows read into Python."""
    if not job_ids:
        return {}
    sql = (
        "SELECT id, ahead, ahead_s FROM (SELECT id, row_number() OVER w - 1 AS ahead, "
        "coalesce(sum(estimate_s) OVER w, 0) - coalesce(estimate_s, 0) AS ahead_s FROM jobs "
        "WHERE state = 'queued' AND kind != 'train' WINDOW w AS (ORDER BY submitted_at, id)) "
        f"WHERE id IN ({', '.join('?' * len(job_ids))})"
    )
    return {i: (n, seconds) for i, n, seconds in db.execute(sql, job_ids).fetchall()}


def job_counts(db: Database) -> dict[tuple[str, str], int]:
    """Jobs per (kind, state), for /healthz and /metrics."""
    rows = db.execute("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state")
    return {(kind, state): n for kind, state, n in rows}


def transition(db: Database, job_id: int, allowed_from: tuple[str, ...], to: str, **values: Any) -> bool:
    """Move a job to ``to`` only if it is in one of ``allowed_from`` now (compare-and-set, so two
    processes can never both start, or both finish, the same job)."""
    sets = ", ".join(["state = ?", *(f"{k} = ?" for k in values)])
    sql = f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({', '.join('?' * len(allowed_from))})"
    cur = db.execute(sql, [to, *values.values(), job_id, *allowed_from])
    return cur.rowcount == 1


def update_job(db: Database, job_id: int, **values: Any) -> None:
    db["jobs"].update(job_id, values)


def add_event(db: Database, job_id: int, type_: str, data: dict[str, Any]) -> None:
    db.execute(
        "INSERT INTO job_events (job_id, at, type, data) VALUES (?, ?, ?, ?)",
        [job_id, time.time(), type_, json.dumps(data, ensure_ascii=False)],
    )


def job_events(db: Database, job_id: int) -> list[dict[str, Any]]:
    return [
        {"at": r["at"], "type": r["type"], **json.loads(r["data"])}
        for r in db.query("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", [job_id])
    ]


# ---- the Discord outbox ----


@dataclass
class Post:
    id: int
    job_id: int
    event: dict[str, Any]
    attempts: int


def add_post(db: Database, job_id: int, event: dict[str, Any]) -> int:
    now = time.time()
    row = {"job_id": job_id, "event": json.dumps(event, ensure_ascii=False), "created_at": now}
    return db["discord_outbox"].insert({**row, "attempts": 0, "next_at": now, "dropped": 0}).last_pk


def due_posts(db: Database, now: float | None = None, limit: int = 50) -> list[Post]:
    """Posts not yet delivered, oldest first, with each job's earliest post first: a post whose
    back-off has not run out holds back the later posts of its job (a job's epochs, then its end)."""
    rows = db.query(
        "SELECT * FROM discord_outbox WHERE sent_at IS NULL AND dropped = 0 ORDER BY id LIMIT ?", [limit]
    )
    now = time.time() if now is None else now
    held: set[int] = set()
    due = []
    for r in rows:
        if r["job_id"] in held:
            continue
        if r["next_at"] > now:
            held.add(r["job_id"])
            continue
        due.append(Post(r["id"], r["job_id"], json.loads(r["event"]), r["attempts"]))
    return due


def next_post_at(db: Database) -> float | None:
    """When the next post falls due: the earliest back-off among the first pending post of each job."""
    row = db.execute(
        "SELECT MIN(next_at) FROM discord_outbox o WHERE sent_at IS NULL AND dropped = 0 AND id = "
        "(SELECT MIN(id) FROM discord_outbox WHERE job_id = o.job_id AND sent_at IS NULL AND dropped = 0)"
    ).fetchone()
    return row[0]


def retry_posts_now(db: Database) -> None:
    """Cut every waiting post's back-off short (Discord answers again)."""
    db.execute("UPDATE discord_outbox SET next_at = 0 WHERE sent_at IS NULL AND dropped = 0")


def post_sent(db: Database, post_id: int) -> None:
    db["discord_outbox"].update(post_id, {"sent_at": time.time(), "error": None})


def post_failed(db: Database, post_id: int, error: str, retry_at: float | None) -> None:
    """Record a failed delivery: tried again at ``retry_at``, or never (``None``: dropped)."""
    db.execute(
        "UPDATE discord_outbox SET attempts = attempts + 1, error = ?, next_at = COALESCE(?, next_at), "
        "dropped = ? WHERE id = ?",
        [error, retry_at, int(retry_at is None), post_id],
    )


def seconds_per_step(db: Database, rate_key: str, recent: int = 20) -> float | None:
    """Measured GPU seconds per step of the last finished jobs that share ``rate_key`` (less the
    estimate of their preview rounds, which are priced apart)."""
    row = db.execute(
        "SELECT sum(seconds), sum(steps) FROM (SELECT run_seconds - coalesce(preview_s, 0) AS seconds, "
        "steps FROM jobs WHERE rate_key = ? AND state = 'done' AND steps > 0 "
        "AND run_seconds > coalesce(preview_s, 0) ORDER BY finished_at DESC LIMIT ?)",
        [rate_key, recent],
    ).fetchone()
    return row[0] / row[1] if row and row[1] else None


# ---- artifacts ----


def add_artifact(
    db: Database, job_id: int, owner: str, kind: str, path: str, sha256: str, size: int, epoch: int | None
) -> None:
    db.execute(
        "INSERT INTO artifacts (job_id, owner, kind, epoch, path, sha256, size, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, "
        "size = excluded.size, epoch = excluded.epoch",
        [job_id, owner, kind, epoch, path, sha256, size, time.time()],
    )


def artifacts(db: Database, job_id: int) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM artifacts WHERE job_id = ? ORDER BY id", [job_id]))


def artifact(db: Database, artifact_id: int) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM artifacts WHERE id = ?", [artifact_id]))
    return rows[0] if rows else None


def delete_artifacts(db: Database, owner: str, job_id: int | None = None) -> None:
    """Forget the files of one job of ``owner`` (all their jobs when None) once they are deleted."""
    if job_id is None:
        db.execute("DELETE FROM artifacts WHERE owner = ?", [owner])
    else:
        db.execute("DELETE FROM artifacts WHERE owner = ? AND job_id = ?", [owner, job_id])


# ---- GPU time ----


def charge(db: Database, owner: str, job_id: int, gpu_seconds: float) -> None:
    db.execute(
        "INSERT INTO ledger (owner, job_id, at, gpu_seconds) VALUES (?, ?, ?, ?)",
        [owner, job_id, time.time(), gpu_seconds],
    )


def gpu_seconds_since(db: Database, since: float, owner: str | None = None) -> dict[str, float]:
    """GPU seconds charged per member since ``since`` (only ``owner`` when given)."""
    sql = "SELECT owner, sum(gpu_seconds) FROM ledger WHERE at >= ?"
    params: list[Any] = [since]
    if owner is not None:
        sql += " AND owner = ?"
        params.append(owner)
    return dict(db.execute(sql + " GROUP BY owner", params).fetchall())


# ---- quota overrides and settings ----


def set_quota_override(db: Database, scope: str, subject: str, key: str, value: float | None) -> None:
    if value is None:
        db.execute(
            "DELETE FROM quota_overrides WHERE scope = ? AND subject = ? AND key = ?", [scope, subject, key]
        )
    else:
        db["quota_overrides"].upsert(
            {"scope": scope, "subject": subject, "key": key, "value": value}, pk=("scope", "subject", "key")
        )


def quota_overrides(db: Database, scope: str, subjects: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if not subjects:
        return out
    sql = f"SELECT * FROM quota_overrides WHERE scope = ? AND subject IN ({', '.join('?' * len(subjects))})"
    for r in db.query(sql, [scope, *subjects]):
        out.setdefault(r["subject"], {})[r["key"]] = r["value"]
    return out


def get_setting(db: Database, key: str, default: Any = None) -> Any:
    row = db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
    return json.loads(row[0]) if row else default


def set_setting(db: Database, key: str, value: Any) -> None:
    db["settings"].upsert({"key": key, "value": json.dumps(value)}, pk="key")


# ---- the web pages ----


def add_loss(db: Database, job_id: int, step: int, epoch: int, loss: float) -> None:
    """One step's loss; a resumed run that repeats a step overwrites it."""
    db.execute(
        "INSERT INTO job_losses (job_id, step, epoch, loss) VALUES (?, ?, ?, ?) ON CONFLICT(job_id, step) "
        "DO UPDATE SET epoch = excluded.epoch, loss = excluded.loss",
        [job_id, step, epoch, loss],
    )


def losses(db: Database, job_id: int) -> list[tuple[int, int, float]]:
    """(step, epoch, loss) of a job, by step."""
    sql = "SELECT step, epoch, loss FROM job_losses WHERE job_id = ? ORDER BY step"
    return [tuple(r) for r in db.execute(sql, [job_id]).fetchall()]


def add_admin_action(db: Database, who: str, via: str, action: str, detail: str = "") -> None:
    db.execute(
        "INSERT INTO admin_actions (at, who, via, action, detail) VALUES (?, ?, ?, ?, ?)",
        [time.time(), who, via, action, detail],
    )


def admin_actions(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM admin_actions ORDER BY id DESC LIMIT ?", [limit]))


@dataclass
class WebSession:
    member: str
    admin: bool
    csrf: str
    expires_at: float


def add_session(db: Database, token_hash: str, session: WebSession) -> None:
    now = time.time()
    db.execute("DELETE FROM web_sessions WHERE expires_at < ?", [now])  # no table that only grows
    db.execute(
        "INSERT INTO web_sessions (token_hash, member, admin, csrf, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [token_hash, session.member, int(session.admin), session.csrf, now, session.expires_at],
    )


def get_session(db: Database, token_hash: str) -> WebSession | None:
    sql = "SELECT member, admin, csrf, expires_at FROM web_sessions WHERE token_hash = ? AND expires_at > ?"
    row = db.execute(sql, [token_hash, time.time()]).fetchone()
    return WebSession(row[0], bool(row[1]), row[2], row[3]) if row else None


def delete_session(db: Database, token_hash: str) -> None:
    db.execute("DELETE FROM web_sessions WHERE token_hash = ?", [token_hash])


def all_quota_overrides(db: Database) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM quota_overrides ORDER BY scope, subject, key"))

"""What an admin can do to the server, from Discord's ``/admin`` or the web's admin page: each
action is recorded in the store with who did it, from where, and when (``store.admin_actions``)."""

from __future__ import annotations

from sqlite_utils import Database

from . import jobs, store
from .config import quota_value


def pause(db: Database, who: str, via: str) -> int:
    """Start no new jobs; returns how many still run."""
    store.set_setting(db, "paused", True)
    store.add_admin_action(db, who, via, "pause")
    return store.count_jobs(db, "running")


def resume(db: Database, who: str, via: str) -> None:
    store.set_setting(db, "paused", False)
    store.add_admin_action(db, who, via, "resume")


def drain(db: Database, who: str, via: str) -> int:
    """Pause and cancel every job still waiting; returns how many were cancelled."""
    store.set_setting(db, "paused", True)
    waiting = store.list_jobs(db, ("queued",))
    for job in waiting:
        jobs.request_cancel(db, job.id)
    store.add_admin_action(db, who, via, "drain", f"{len(waiting)} waiting job(s) cancelled")
    return len(waiting)


def cancel(db: Database, job_id: int, who: str, via: str) -> str:
    """Cancel any job: 'cancelled' (it was waiting) or 'stopping'; JobError when it cannot be."""
    what = jobs.request_cancel(db, job_id)
    store.add_admin_action(db, who, via, "cancel", f"job #{job_id}: {what}")
    return what


def set_quota(
    db: Database, who: str, via: str, scope: str, subject: str, key: str, text: str
) -> float | None:
    """A role's or member's limit from what the admin typed (a number, 'unlimited' or 'default');
    ConfigError, naming what is allowed, for anything else."""
    if scope not in ("role", "member"):
        raise ValueError(f"scope is 'role' or 'member', not '{scope}'")
    number = quota_value(key, text)
    store.set_quota_override(db, scope, subject, key, number)
    store.add_admin_action(db, who, via, "quota", f"{scope} {subject}: {key} = {text.strip()}")
    return number


def record(db: Database, who: str, via: str, action: str, detail: str = "") -> None:
    """An action done elsewhere (a purge) goes in the same record."""
    store.add_admin_action(db, who, via, action, detail)

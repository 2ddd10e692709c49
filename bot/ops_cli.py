"""The operator's commands: ``loracord run``, ``loracord jobs …``, ``loracord quota …``,
``loracord web-link``.

They share the database with a running ``loracord run`` (SQLite WAL): a job submitted or
cancelled here is picked up by its scheduler at its next poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runner.cli import parse_value

from . import admin_ops, jobs, store
from .config import UNLIMITED, Config, ConfigError, Quota, load_config, quota_value
from .files import DiskFull, PathError, check_free_disk, import_dataset, member_path

CLI_ADMIN = "owner"  # who the admin record names for the operator's commands (and web-link's default)


def _settings(pairs: list[str] | None) -> dict[str, Any]:
    settings = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise jobs.JobError(f"--set needs key=value, got '{item}'")
        settings[key.strip()] = parse_value(value.strip())
    return settings


def _open(args: argparse.Namespace) -> tuple[Config, Any]:
    cfg = load_config(args.config)
    return cfg, store.open_store(cfg.store)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _job_dict(job: store.Job, position: int | None = None, eta_s: float | None = None) -> dict[str, Any]:
    d = asdict(job)
    d["spec"] = job.spec_dict
    d["progress"] = job.progress_dict
    d["result"] = json.loads(job.result) if job.result else None
    if position is not None:
        d.update(position=position, eta_s=round(eta_s or 0.0, 1))
    return d


# ---- run ----


def cmd_run(args: argparse.Namespace) -> int:
    from .dispatch import make_dispatcher
    from .scheduler import Scheduler
    from .web import WebServer

    cfg, db = _open(args)
    if not args.no_discord:
        cfg.discord_token()  # no token, or no server to serve: say so before anything starts
        cfg.discord.check_served()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheduler = Scheduler(db, cfg, make_dispatcher(cfg))
        logging.info("serving %s with %s workers on %s", cfg.store, cfg.workers.dispatch, cfg.workers.devices)
        async with WebServer(cfg, db, scheduler) as web:  # links, /healthz, /metrics on [web] host:port
            if args.no_discord:
                await scheduler.run(stop)
            else:
                from .discord.app import serve

                await serve(cfg, db, scheduler, web, stop)
        t = scheduler.timing
        logging.info(
            "stopped; scheduler overhead per dispatch %.2f ms (n=%d), per event %.2f ms, "
            "job end → next start %.1f ms (n=%d)",
            1000 * sum(t.dispatch_s) / max(len(t.dispatch_s), 1),
            len(t.dispatch_s),
            1000 * sum(t.handle_s) / max(len(t.handle_s), 1),
            1000 * sum(t.end_to_start_s) / max(len(t.end_to_start_s), 1),
            len(t.end_to_start_s),
        )

    asyncio.run(main())
    return 0


# ---- jobs ----


def cmd_submit(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    settings = _settings(args.set)
    if args.what == "train":
        dataset = args.data
        source = Path(args.data)
        if source.is_dir():  # an operator's folder: copied into the member's datasets first
            dataset = source.resolve().name
            size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
            try:
                check_free_disk(cfg.data_dir, cfg.data.min_free_gb, size)
            except DiskFull as e:
                raise jobs.JobError(f"not queued: {e}") from None
            import_dataset(source, member_path(cfg.data_dir, args.user, "datasets", dataset))
        settings.update({k: v for k, v in (("trigger_word", args.trigger), ("preset", args.preset)) if v})
        job = jobs.submit_train(db, cfg, args.user, dataset, args.base, args.name, settings, args.role)
    else:
        job = jobs.submit_gen(db, cfg, args.user, args.prompt, args.base, settings, args.role)
    queued = {p.job.id: p for p in jobs.plan(db, cfg).queued}
    p = queued.get(job.id)
    if args.json:
        print(json.dumps(_job_dict(job, p and p.position, p and p.eta_s), ensure_ascii=False))
    else:
        where = f", position {p.position}, starts in about {_duration(p.eta_s)}" if p else ""
        print(f"job {job.id} queued: costs about {_duration(job.estimate_s or 0)} of GPU time{where}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    plan = jobs.plan(db, cfg)
    rows = [_job_dict(j) for j in plan.running]
    rows += [_job_dict(p.job, p.position, p.eta_s) for p in plan.queued]
    if args.all:
        rows += [_job_dict(j) for j in store.list_jobs(db, ("done", "failed", "cancelled"))]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    if store.get_setting(db, "paused", False):
        print("queue paused (loracord jobs resume): running jobs finish, nothing new starts")
    print(f"{'id':>5} {'kind':5} {'member':20} {'state':9} {'pos':>3} {'where':28} name")
    for r in rows:
        if r["state"] == "queued":
            where = f"starts in ~{_duration(r['eta_s'])}"
        elif r["state"] == "running" and r["progress"]:
            pr = r["progress"]
            where = f"ep {pr['epoch']} step {pr['step']}/{pr['total_steps']} ~{_duration(pr['eta_s'])} left"
        elif r["state"] == "running":
            where = f"on {r['worker']}"
        else:
            where = (r["failure"] or "")[:28]
        pos = r.get("position") or ""
        print(
            f"{r['id']:>5} {r['kind']:5} {r['owner'][:20]:20} {r['state']:9} {pos:>3} {where:28} {r['name'] or ''}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    job = store.get_job(db, args.id)
    if job is None:
        raise jobs.JobError(f"no job {args.id}")
    planned = {p.job.id: p for p in jobs.plan(db, cfg).queued}.get(job.id)
    d = _job_dict(job, planned and planned.position, planned and planned.eta_s)
    d["events"] = store.job_events(db, job.id)
    d["artifacts"] = store.artifacts(db, job.id)
    if args.json:
        print(json.dumps(d, ensure_ascii=False, indent=1))
        return 0
    for key in (
        "id",
        "kind",
        "owner",
        "name",
        "state",
        "position",
        "eta_s",
        "worker",
        "attempts",
        "last_epoch",
    ):
        if d.get(key) is not None:
            print(f"{key:12} {d[key]}")
    print(
        f"{'estimate':12} {_duration(job.estimate_s or 0)} for {job.steps} steps; used {_duration(job.run_seconds)}"
    )
    if job.failure:
        print(f"{'failure':12} {job.failure}")
    for e in d["events"]:
        detail = e.get("message") or e.get("reason") or e.get("lora_file") or ""
        print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['type']:9} {detail}")
    for a in d["artifacts"]:
        print(f"  {a['kind']:5} {a['size']:>10} {a['sha256'][:12]} {a['path']}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _, db = _open(args)
    (admin_ops.pause if args.paused else admin_ops.resume)(db, CLI_ADMIN, "cli")
    print("queue paused: running jobs finish, nothing new starts" if args.paused else "queue resumed")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    what = admin_ops.cancel(db, args.id, CLI_ADMIN, "cli")
    grace = cfg.workers.cancel_grace_seconds
    stopping = f"is being stopped (within a step; a worker that has not stopped it in {grace:g} s is killed)"
    print(f"job {args.id} {'cancelled' if what == 'cancelled' else stopping}")
    return 0


def cmd_web_link(args: argparse.Namespace) -> int:
    from .web.links import Links, load_secret, local_url
    from .web.sessions import Logins

    cfg, _ = _open(args)
    base = cfg.web.public_url or local_url(cfg.web.host, cfg.web.port)
    links = Links(cfg.data_dir, load_secret(cfg), base, cfg.web.link_hours * 3600)
    logins = Logins(links, cfg.web.login_minutes * 60, cfg.web.session_hours * 3600)
    page = args.page or ("/admin" if args.admin else "/")
    print(logins.link(args.user, args.admin, page))
    print(
        f"(works for {cfg.web.login_minutes:g} minutes; the session it opens lasts {cfg.web.session_hours:g} h)"
    )
    return 0


# ---- quota ----


def cmd_quota_show(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    u = jobs.usage(db, cfg, args.user)
    d = {
        "member": args.user,
        "roles": store.member_roles(db, args.user),
        "quota": u.quota.model_dump(),
        "running": u.running,
        "queued": u.queued,
        "gpu_seconds_used_24h": round(u.gpu_seconds_used, 1),
        "gpu_seconds_reserved": round(u.gpu_seconds_reserved, 1),
        "gpu_seconds_left": round(u.gpu_seconds_left, 1),
        "storage_mb": round(u.storage_bytes / 2**20, 2),
    }
    if args.json:
        print(json.dumps(d, ensure_ascii=False, indent=1))
        return 0
    q = u.quota
    print(f"member {args.user} (roles: {', '.join(d['roles']) or 'none'})")
    print(
        f"  GPU time   {u.gpu_seconds_used:.0f} s used + {u.gpu_seconds_reserved:.0f} s queued of {q.daily_gpu_seconds:g} s a day ({max(u.gpu_seconds_left, 0):.0f} s left)"
    )
    print(f"  jobs       {u.running} running of {q.concurrent_jobs}, {u.queued} queued of {q.queued_jobs}")
    print(f"  storage    {d['storage_mb']} MB of {q.storage_mb:g} MB")
    print(f"  per job    {q.total_steps} steps, {q.images_per_dataset} images a dataset")
    return 0


def cmd_quota_set(args: argparse.Namespace) -> int:
    _, db = _open(args)
    scope, subject = ("member", args.user) if args.user else ("role", args.role)
    changes = []
    for item in args.values:  # all checked before any is written
        key, sep, value = item.partition("=")
        if not sep or key not in Quota.names():
            raise jobs.JobError(f"'{item}': use key=value with a key from {', '.join(Quota.names())}")
        quota_value(key, value)
        changes.append((key, value))
    for key, value in changes:
        admin_ops.set_quota(db, CLI_ADMIN, "cli", scope, subject, key, value)
    print(f"quota for {scope} {subject} updated")
    return 0


# ---- parser ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracord")
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", required=True, help="the server's TOML file (see config.example.toml)")

    r = sub.add_parser("run", parents=[config], help="the bot: store, scheduler and workers")
    r.add_argument("--no-discord", action="store_true", help="without Discord: for operators and tests")
    r.set_defaults(func=cmd_run)

    j = sub.add_parser("jobs", help="submit, list, show and cancel jobs").add_subparsers(
        dest="jobs", required=True
    )
    s = j.add_parser("submit", parents=[config], help="queue a job for a member")
    s.add_argument("--user", required=True, help="the member's id (their Discord user id)")
    s.add_argument("--role", action="append", help="the member's role ids, for role quotas (repeatable)")
    s.add_argument("--json", action="store_true")
    what = s.add_subparsers(dest="what", required=True)
    t = what.add_parser("train", help="train a LoRA")
    t.add_argument("data", help="a folder (copied into the member's datasets) or the name of one of theirs")
    t.add_argument("--base", required=True, help="a name from the config's [bases]")
    t.add_argument("--name", required=True, help="the LoRA's name")
    t.add_argument("--trigger", help="trigger word")
    t.add_argument("--preset", choices=["character", "style", "concept"])
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any training setting (repeatable)")
    g = what.add_parser("gen", help="generate images")
    g.add_argument("prompt")
    g.add_argument("--base", required=True, help="a name from the config's [bases]")
    g.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="steps, count, seed, width, … (repeatable)"
    )
    ls = j.add_parser("list", parents=[config], help="running and queued jobs with positions and ETAs")
    ls.add_argument("--all", action="store_true", help="finished jobs too")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    sh = j.add_parser("show", parents=[config], help="one job with its events and files")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)
    c = j.add_parser("cancel", parents=[config], help="cancel a queued job, or stop a running one")
    c.add_argument("id", type=int)
    c.set_defaults(func=cmd_cancel)
    s.set_defaults(func=cmd_submit)
    pause = j.add_parser("pause", parents=[config], help="start no new jobs (running ones finish)")
    pause.set_defaults(func=cmd_pause, paused=True)
    j.add_parser("resume", parents=[config], help="start jobs again").set_defaults(
        func=cmd_pause, paused=False
    )

    w = sub.add_parser(
        "web-link", parents=[config], help="a sign-in link to the web pages (the owner's, with --admin)"
    )
    w.add_argument("--user", default=CLI_ADMIN, help="whose pages: a member's Discord id (default: 'owner')")
    w.add_argument("--admin", action="store_true", help="with the server's admin page")
    w.add_argument("--page", help="the page to open, e.g. /loras/12 (default: / or /admin)")
    w.set_defaults(func=cmd_web_link)
    q = sub.add_parser("quota", help="show or set quotas").add_subparsers(dest="quota", required=True)
    qs = q.add_parser("show", parents=[config], help="a member's quota and what is used")
    qs.add_argument("--user", required=True)
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(func=cmd_quota_show)
    qset = q.add_parser("set", parents=[config], help="override quotas for a member or a role")
    who = qset.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--role")
    qset.add_argument(
        "values",
        nargs="+",
        metavar="KEY=VALUE",
        help=f"keys: {', '.join(Quota.names())}; a number, '{UNLIMITED}' (the key's ceiling) or 'default' (removes)",
    )
    qset.set_defaults(func=cmd_quota_set)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, jobs.JobError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

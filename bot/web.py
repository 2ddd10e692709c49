"""The bot's web side (aiohttp): signed, expiring download links, ``/healthz`` and ``/metrics``.

Download links serve files of the data folder only: ``/files/<path>?exp=<unix time>&sig=<mac>``,
where the MAC is HMAC-SHA256 over the path and the expiry with a secret from ``[web]
secret_file`` or, unset, one generated once into the data folder. A changed or expired link is
refused (403), a file that is gone is 404; hidden files, ``..`` and symlinks that leave the data
folder are never served. The Discord side signs with ``web.links.sign(path)``, feeds
``web.metrics.observe_ack(seconds)`` and sets ``web.discord_connected``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import time
from base64 import urlsafe_b64encode
from email.utils import encode_rfc2231
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlite_utils import Database

from . import store
from .config import Config, ConfigError

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger(__name__)
SECRET_FILE = ".web-secret"  # hidden, so no link can ever serve it
ACK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)  # Discord's limit is 3 s
_NOT_VALID = "this link is not valid (it was changed or cut short); ask the bot for a new one"
_UNSAFE_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\]')


class LinkError(ValueError):
    """A link or path that is refused; ``status`` is the HTTP answer (403 refused, 404 gone)."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


def load_secret(cfg: Config) -> bytes:
    """The link-signing key: ``[web] secret_file``, else made once in the data folder (0600)."""
    path = cfg.web.secret_file
    if path is None:
        path = cfg.data_dir / SECRET_FILE
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made by an earlier run (or another process just now)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the link secret {path} ([web] secret_file): {e.strerror}") from None
    if len(text) < 16:
        raise ConfigError(
            f"the link secret in {path} is too short ({len(text)} characters): put at least 32 random "
            "characters there, e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return text.encode()


class Links:
    """Signs and checks download links for files under ``root``."""

    def __init__(self, root: Path, secret: bytes, base_url: str, ttl_s: float):
        self.root = root.resolve()
        self.secret = secret
        self.base_url = base_url
        self.ttl_s = ttl_s

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"Links(root={self.root}, base_url={self.base_url!r})"

    def signature(self, rel: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{rel}\n{expires}".encode(), hashlib.sha256).digest()
        return urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(self, path: str | Path, expires_at: float | None = None) -> str:
        """A link to ``path`` (relative to the data folder, or absolute inside it) that works
        until ``expires_at`` (unix time; default ``[web] link_hours`` from now)."""
        p = Path(path)
        if p.is_absolute():
            if not p.is_relative_to(self.root):
                raise LinkError(f"{p} is not in the data folder {self.root}; only files there can be linked")
            p = p.relative_to(self.root)
        rel = p.as_posix()
        self.locate(rel)
        expires = int(expires_at if expires_at is not None else time.time() + self.ttl_s)
        return f"{self.base_url}/files/{quote(rel)}?exp={expires}&sig={self.signature(rel, expires)}"

    def verify(self, rel: str, expires: str | None, signature: str | None) -> None:
        """Refuse (403) a link whose path or expiry was changed, or that has expired."""
        try:
            exp = int(expires or "")
        except ValueError:
            raise LinkError(_NOT_VALID) from None
        if not hmac.compare_digest(self.signature(rel, exp).encode(), (signature or "").encode()):
            raise LinkError(_NOT_VALID)
        if exp < time.time():
            raise LinkError("this link has expired; ask the bot for a new one")

    def locate(self, rel: str) -> Path:
        """The real file ``rel`` names inside the data folder (403 outside or hidden, 404 gone)."""
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or "\0" in rel or any(p.startswith(".") for p in parts):
            raise LinkError(f"'{rel}' is not a file the bot serves: no hidden files, '..' or absolute paths")
        real = self.root.joinpath(*parts).resolve()
        if not real.is_relative_to(self.root):
            raise LinkError(f"'{rel}' leads outside the data folder")
        if not real.is_file():
            raise LinkError(f"'{rel}' is gone (deleted, or never made)", status=404)
        return real


def content_disposition(name: str) -> str:
    # RFC 6266 wants filename* (RFC 5987) for non-ASCII names; aiohttp's helper is the multipart
    # (RFC 7578) form, which browsers read differently. The plain filename is for old clients.
    fallback = _UNSAFE_FALLBACK.sub("_", name)
    return f'attachment; filename="{fallback}"; filename*={encode_rfc2231(name, "utf-8")}'


class _StoreCollector(Collector):
    """Reads the store (and the scheduler's workers) at scrape time, so numbers are never stale."""

    def __init__(self, db: Database, scheduler: Scheduler | None):
        self.db, self.scheduler = db, scheduler

    def collect(self) -> Any:
        counts = store.job_counts(self.db)
        kinds = sorted({kind for kind, _ in counts})
        states = dict.fromkeys([*store.STATES, *(state for _, state in counts)])
        queue = GaugeMetricFamily("loracord_queue_length", "Jobs waiting to start, by kind", labels=["kind"])
        jobs = GaugeMetricFamily(
            "loracord_jobs", "Jobs in the store by kind and state", labels=["kind", "state"]
        )
        for kind in kinds:
            queue.add_metric([kind], counts.get((kind, "queued"), 0))
            for state in states:
                jobs.add_metric([kind, state], counts.get((kind, state), 0))
        yield queue
        yield jobs
        used = sum(store.gpu_seconds_since(self.db, 0).values())
        yield CounterMetricFamily("loracord_gpu_seconds", "GPU seconds charged for jobs", value=used)
        if self.scheduler is not None:
            dispatcher = self.scheduler.dispatcher
            up = GaugeMetricFamily("loracord_worker_up", "1 while a worker can take jobs", labels=["worker"])
            for worker in dispatcher.workers:
                up.add_metric([worker], float(dispatcher.ready(worker)))
            yield up
            yield CounterMetricFamily(
                "loracord_worker_restarts",
                "Workers that died and were restarted",
                value=self.scheduler.restarts,
            )


class Metrics:
    """The Prometheus registry of one bot process."""

    def __init__(self, db: Database, scheduler: Scheduler | None = None):
        self.registry = CollectorRegistry()
        self._ack = Histogram(
            "loracord_interaction_ack_seconds",
            "Time from a Discord interaction's creation to its acknowledgement",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(db, scheduler))

    def observe_ack(self, seconds: float) -> None:
        """Record how long one interaction took to be acknowledged (the Discord layer calls this)."""
        self._ack.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _AccessLog(AbstractAccessLogger):
    """Signed links are bearer tokens, so the log shows paths without their query; probes that
    succeed are not logged at all."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in ("/healthz", "/metrics") and response.status < 400:
            return
        self.logger.info(
            '%s "%s %s" %d %.3fs', request.remote, request.method, request.path, response.status, time
        )


class WebServer:
    """aiohttp on ``[web] host:port`` for the bot process: ``await start()`` … ``await stop()``."""

    def __init__(self, cfg: Config, db: Database, scheduler: Scheduler | None = None):
        self.cfg, self.db, self.scheduler = cfg, db, scheduler
        self.links = Links(
            cfg.data_dir, load_secret(cfg), cfg.web.public_url or "", cfg.web.link_hours * 3600
        )
        self.metrics = Metrics(db, scheduler)
        self.discord_connected: bool | None = None  # None: this process runs without Discord
        self.port: int | None = None
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/files/{path:.+}", self._file),
                web.get("/healthz", self._healthz),
                web.get("/metrics", self._metrics),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = self.cfg.web.host, self.cfg.web.port
        runner = web.AppRunner(self.app, access_log_class=_AccessLog)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {host}:{port} ([web] host and port): {e.strerror or e}; "
                "pick another port, or stop what uses it (another loracord run?)"
            ) from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        if not self.cfg.web.public_url:
            self.links.base_url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        log.info("web: listening on %s port %d; links start with %s", host, self.port, self.links.base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- handlers ----

    async def _file(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        try:
            self.links.verify(rel, request.query.get("exp"), request.query.get("sig"))
            path = self.links.locate(rel)
        except LinkError as e:
            return web.Response(status=e.status, text=str(e) + "\n")
        # FileResponse streams in chunks (sendfile where it can) and answers Range requests.
        headers = {hdrs.CONTENT_DISPOSITION: content_disposition(PurePosixPath(rel).name)}
        return web.FileResponse(path, headers=headers)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, report): the store answers a query, every worker is alive, Discord is
        connected (when this process runs Discord), and the scheduler reports no problem (low
        disk, a database write that fails), else ``problems`` says which."""
        try:
            counts = store.job_counts(self.db)
            db = {
                "ok": True,
                "queued": sum(n for (_, s), n in counts.items() if s == "queued"),
                "running": sum(n for (_, s), n in counts.items() if s == "running"),
            }
        except sqlite3.Error as e:
            db = {"ok": False, "error": str(e)}
        workers = {}
        if self.scheduler is not None:
            dispatcher = self.scheduler.dispatcher
            workers = {w: "alive" if dispatcher.ready(w) else "dead" for w in dispatcher.workers}
        discord = {None: "disabled", True: "connected", False: "disconnected"}[self.discord_connected]
        ok = db["ok"] and all(s == "alive" for s in workers.values()) and discord != "disconnected"
        report = {"ok": ok, "store": db, "workers": workers, "discord": discord}
        problems = dict(self.scheduler.problems) if self.scheduler is not None else {}
        if problems:  # a full disk or an unwritable database: nothing starts or is recorded
            report.update(ok=False, problems=problems)
        return report["ok"], report

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, report = self.health()
        return web.json_response(report, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE_LATEST
        return response

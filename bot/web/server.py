"""The bot's web side (aiohttp): the members' and the owner's pages, signed download links,
``/healthz`` and ``/metrics``.

Pages are rendered on the server (Jinja2, autoescaped) with a little plain JavaScript from
``static/`` where a page must be live; nothing is loaded from another site. Every response carries
the security headers (a CSP without inline script, no framing, no referrer) and private pages are
never cached. The Discord side signs with ``web.links.sign(path)`` and ``web.logins.link(member)``,
feeds ``web.metrics.observe_ack(seconds)``, sets ``web.discord_connected`` and ``web.on_epoch_picked``
(so a pick on the web is said in the training's thread).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import aiohttp_jinja2
import jinja2
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST
from sqlite_utils import Database

from .. import store
from ..config import Config, ConfigError
from . import members, owner, sessions
from .links import LinkError, Links, content_disposition, load_secret, local_url
from .metrics import Metrics

if TYPE_CHECKING:
    from ..scheduler import Scheduler

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SERVER = web.AppKey("server", object)
# No inline script or style, no other site, no framing: a member's text that slipped through
# escaping still could not run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
EpochPicked = Callable[[store.Job, int, str], Awaitable[None]]


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


def _secure(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # No address of ours (a sign-in link) reaches another site; "no-referrer" would also make
    # browsers send "Origin: null" on our own forms, which the CSRF check must refuse.
    response.headers["Referrer-Policy"] = "same-origin"
    if request.path.startswith("/static/"):
        response.headers.setdefault(hdrs.CACHE_CONTROL, "public, max-age=3600")
    else:
        response.headers[hdrs.CACHE_CONTROL] = "no-store"


@web.middleware
async def _security(request: web.Request, handler: sessions.Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as e:  # aiohttp's own 404/405 too
        _secure(request, e)
        raise
    _secure(request, response)
    return response


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
        self.logins = sessions.Logins(self.links, cfg.web.login_minutes * 60, cfg.web.session_hours * 3600)
        self.metrics = Metrics(db, scheduler)
        self.discord_connected: bool | None = None  # None: this process runs without Discord
        self.on_epoch_picked: EpochPicked | None = None  # the Discord side says it in the thread
        self.member_name: Callable[[str], str] = str  # the Discord side knows names; ids without it
        self.port: int | None = None
        self.closing = asyncio.Event()  # ends the live pages' streams, so stopping never waits on them
        self.app = web.Application(middlewares=[_security, self._session])
        self.app[SERVER] = self
        aiohttp_jinja2.setup(
            self.app,
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            filters={"timestamp": _utc},
        )
        self.app.add_routes(
            [
                web.get("/files/{path:.+}", self._file),
                web.get("/healthz", self._healthz),
                web.get("/metrics", self._metrics),
                web.get("/login", self._login),
                web.post("/logout", self._logout),
                web.static("/static", HERE / "static"),
                *members.routes(self),
                *owner.routes(self),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.closing.clear()
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
            self.links.base_url = local_url(host, self.port)
        log.info("web: listening on %s port %d; links start with %s", host, self.port, self.links.base_url)

    async def stop(self) -> None:
        self.closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- sessions ----

    @web.middleware
    async def _session(self, request: web.Request, handler: sessions.Handler) -> web.StreamResponse:
        """The member behind the cookie (``request[members.SESSION]``, None when signed out);
        a POST without the session's CSRF token, or from another site, is refused."""
        session = sessions.session_of(self.db, request) if not request.path.startswith("/static/") else None
        request[members.SESSION] = session
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if not sessions.same_origin(request, self.cfg.web.public_url):
                return members.page_error(
                    request, 403, "This form was sent from another site; nothing was changed."
                )
            if session is None:
                return members.page_error(request, 401, members.SIGNED_OUT)
            form = await request.post()
            token = request.headers.get("X-CSRF-Token") or form.get("csrf") or ""
            if not isinstance(token, str) or not hmac.compare_digest(token, session.csrf):
                return members.page_error(
                    request,
                    403,
                    "This form has expired (the page was open too long); reload it and try again.",
                )
        return await handler(request)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        try:
            member, admin, next_ = self.logins.verify(dict(request.query))
        except LinkError as e:
            return members.page_error(request, 403, str(e).capitalize() + ".")
        token, _ = self.logins.open_session(self.db, member, admin)
        # A redirect, so the signed link leaves the address bar and the history.
        response = web.Response(status=303, headers={hdrs.LOCATION: next_})
        response.set_cookie(
            sessions.COOKIE,
            token,
            max_age=int(self.logins.session_s),
            httponly=True,
            samesite="Lax",
            secure=(self.cfg.web.public_url or "").startswith("https://"),
            path="/",
        )
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        sessions.end_session(self.db, request)
        response = members.page_error(
            request, 200, "You are signed out. Open a new link from the bot to come back."
        )
        response.del_cookie(sessions.COOKIE, path="/")
        return response

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

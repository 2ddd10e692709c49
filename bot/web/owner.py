"""The owner's page (``/admin``): the queue and running jobs with cancel, the workers, GPU time per
member over the fair window, quotas and role overrides, pause/resume/drain, and the record of
what admins did. Only a session opened by an admin link (Manage Server, as ``/admin`` asks, or
``loracord web-link --admin`` on the server) reaches it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp_jinja2
from aiohttp import hdrs, web

from .. import admin_ops, jobs, store
from ..config import ConfigError, Quota
from . import views
from .members import page_error, refusal, signed_in

if TYPE_CHECKING:
    from .server import WebServer

_NOTES = {
    "paused": "Paused: no new job starts; running ones go on.",
    "resumed": "The queue runs again.",
    "drained": "Paused, and every waiting job was cancelled.",
    "cancelled": "Cancel sent.",
    "quota": "Saved.",
}


def _admin(request: web.Request) -> store.WebSession:
    session = signed_in(request)
    if not session.admin:
        raise refusal(
            request, web.HTTPForbidden, "This page is for the server's admins (Manage Server).", session
        )
    return session


def _back(note: str) -> web.Response:
    return web.Response(status=303, headers={hdrs.LOCATION: f"/admin?done={note}"})


def routes(server: WebServer) -> list[web.RouteDef]:
    db, cfg = server.db, server.cfg

    def who(session: store.WebSession) -> str:
        return session.member

    async def page(request: web.Request) -> web.Response:
        session = _admin(request)
        context = {
            "session": session,
            "o": views.overview(db, cfg, server.scheduler),
            "keys": Quota.names(),
            "note": _NOTES.get(request.query.get("done", ""), ""),
            "name": server.member_name,
        }
        return aiohttp_jinja2.render_template("admin.html", request, context)

    async def usage(request: web.Request) -> web.Response:
        _admin(request)
        o = views.overview(db, cfg, server.scheduler)
        return web.json_response(
            {"members": [server.member_name(m) for m, _ in o.usage], "seconds": [s for _, s in o.usage]}
        )

    async def queue_action(request: web.Request) -> web.Response:
        session = _admin(request)
        what = request.match_info["what"]
        if what == "pause":
            admin_ops.pause(db, who(session), "web")
        elif what == "resume":
            admin_ops.resume(db, who(session), "web")
        else:
            admin_ops.drain(db, who(session), "web")
        return _back({"pause": "paused", "resume": "resumed", "drain": "drained"}[what])

    async def cancel(request: web.Request) -> web.Response:
        session = _admin(request)
        try:
            admin_ops.cancel(db, int(request.match_info["job"]), who(session), "web")
        except (ValueError, jobs.JobError) as e:
            return page_error(request, 400, f"Nothing changed: {e}.")
        return _back("cancelled")

    async def quota(request: web.Request) -> web.Response:
        session = _admin(request)
        form = await request.post()
        get = lambda k: str(form.get(k, "")).strip()  # noqa: E731
        if not get("subject").isdigit():
            return page_error(request, 400, "Not saved: give the role's or member's Discord id (digits).")
        try:
            admin_ops.set_quota(
                db, who(session), "web", get("scope"), get("subject"), get("key"), get("value")
            )
        except (ValueError, ConfigError) as e:
            return page_error(request, 400, f"Not saved: {e}.")
        return _back("quota")

    return [
        web.get("/admin", page),
        web.get("/admin/usage.json", usage),
        web.post("/admin/{what:pause|resume|drain}", queue_action),
        web.post("/admin/jobs/{job}/cancel", cancel),
        web.post("/admin/quota", quota),
    ]

"""The members' pages: their LoRAs, one training's epochs at full size with its grids and loss
curve, Use epoch N, download, share and delete, and the live progress of a running job.

A member reaches only their own trainings: every handler looks the job up and checks its owner,
so changing an id in the address finds nothing (404, the same as a job that does not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import aiohttp_jinja2
from aiohttp import hdrs, web

from .. import jobs, library, store
from . import views
from .links import content_disposition

if TYPE_CHECKING:
    from .server import WebServer

log = logging.getLogger(__name__)
SESSION = web.RequestKey("session", object)  # store.WebSession, or None when signed out
SIGNED_OUT = (
    "You are not signed in (or your session ended). In Discord, use /loras and tap Open in browser: "
    "the link signs you in."
)
LIVE_SECONDS = 1.0  # how often the live box is refreshed from the store
LIVE_MAX_S = 3 * 3600  # a page left open stops streaming after this; a reload starts again


def page_error(request: web.Request, status: int, message: str) -> web.Response:
    return aiohttp_jinja2.render_template(
        "message.html", request, {"message": message, "session": None}, status=status
    )


def refusal(
    request: web.Request, kind: type[web.HTTPException], message: str, session: store.WebSession | None
) -> web.HTTPException:
    """An HTTP error with a page that says why, to raise from a handler."""
    page = aiohttp_jinja2.render_string("message.html", request, {"message": message, "session": session})
    return kind(text=page, content_type="text/html")


def signed_in(request: web.Request) -> store.WebSession:
    session = request[SESSION]
    if session is None:
        raise refusal(request, web.HTTPUnauthorized, SIGNED_OUT, None)
    return session


def _own_job(server: WebServer, request: web.Request, session: store.WebSession) -> store.Job:
    try:
        job_id = int(request.match_info["job"])
    except ValueError:
        job_id = -1
    job = store.get_job(server.db, job_id)
    if job is None or job.kind != "train" or job.owner != session.member:
        raise refusal(request, web.HTTPNotFound, "There is no training of yours with that number.", session)
    return job


def _back(job: store.Job, note: str) -> web.Response:
    """After a form: back to the training's page, which says what happened (post/redirect/get)."""
    return web.Response(status=303, headers={hdrs.LOCATION: f"/loras/{job.id}?done={note}"})


_NOTES = {
    "shared": "Shared: everyone here can use it in /gen.",
    "unshared": "Private again.",
    "picked": "is now in your library, and the thread says so.",
    "grid": "The grid is queued; it appears here when it is made.",
}


def routes(server: WebServer) -> list[web.RouteDef]:
    db, cfg = server.db, server.cfg

    @aiohttp_jinja2.template("home.html")
    async def home(request: web.Request) -> dict[str, Any]:
        session = signed_in(request)
        runs = views.member_runs(db, session.member)
        kept = {lo.job_id: lo for lo in library.loras_for(db, session.member) if lo.owner == session.member}
        return {
            "session": session,
            "runs": runs,
            "kept": kept,
            "base_of": lambda j: views.base_name(cfg, j.spec_dict),
        }

    async def lora(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        run = views.run(db, cfg, job)
        data = views.dataset(job.spec_dict)
        note = _NOTES.get(request.query.get("done", ""), "")
        if request.query.get("done") == "picked" and run.kept:
            note = f"Epoch {run.kept.epoch} {note}"
        context = {
            "session": session,
            "run": run,
            "data": data,
            "note": note,
            "hashes": views.file_hashes(run.kept.path) if run.kept else {},
            "grids": [
                a for g in _grid_jobs(db, job) for a in store.artifacts(db, g.id) if a["kind"] == "image"
            ],
        }
        return aiohttp_jinja2.render_template("lora.html", request, context)

    async def image(request: web.Request) -> web.StreamResponse:
        session = signed_in(request)
        job = _own_job(server, request, session)
        art = store.artifact(db, int(request.match_info["art"]))
        if art is None or art["kind"] != "image" or not _made_of(db, job, art["job_id"]):
            raise web.HTTPNotFound(text="no such image of this training")
        return web.FileResponse(art["path"])

    async def contact(request: web.Request) -> web.Response:
        job = _own_job(server, request, signed_in(request))
        images = views.dataset(job.spec_dict).images
        body = await asyncio.to_thread(views.contact_sheet, images)
        return web.Response(body=body, content_type="image/jpeg")

    async def loss(request: web.Request) -> web.Response:
        job = _own_job(server, request, signed_in(request))
        return web.json_response(views.loss_series(db, job.id))

    async def download(request: web.Request) -> web.StreamResponse:
        job = _own_job(server, request, signed_in(request))
        epoch = request.query.get("epoch")
        if epoch is None:
            kept = views.kept_of(db, job)
            if kept is None:
                raise web.HTTPNotFound(text="this training has no LoRA in your library yet")
            path, name = kept.path, f"{kept.name}.safetensors"
        else:
            arts = [
                a for a in store.artifacts(db, job.id) if a["kind"] == "lora" and str(a["epoch"]) == epoch
            ]
            if not arts:
                raise web.HTTPNotFound(text=f"epoch {epoch} of this training was not saved")
            path, name = arts[-1]["path"], f"{job.name}-{int(epoch):06d}.safetensors"
        return web.FileResponse(path, headers={hdrs.CONTENT_DISPOSITION: content_disposition(name)})

    async def use(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        form = await request.post()
        try:
            epoch = int(str(form.get("epoch", "")))
            lo = library.keep_epoch(db, cfg, job, epoch)
        except (ValueError, LookupError) as e:
            return page_error(request, 400, f"Nothing changed: {e}.")
        if server.on_epoch_picked is not None:
            try:
                await server.on_epoch_picked(job, epoch, lo.name)
            except Exception:  # Discord down: the library changed all the same
                log.exception("could not tell the thread of job %s about epoch %s", job.id, epoch)
        return _back(job, "picked")

    async def share(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        kept = views.kept_of(db, job)
        if kept is None:
            return page_error(request, 400, "Pick an epoch first: only a LoRA in your library can be shared.")
        on = request.match_info["what"] == "share"
        library.set_shared(db, kept.owner, kept.name, on)
        return _back(job, "shared" if on else "unshared")

    async def delete(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        if job.state in store.ACTIVE:
            return page_error(request, 400, f"{job.name} is still training; cancel it first.")
        kept = views.kept_of(db, job)
        if kept is not None:
            library.delete(db, cfg, kept)
        return web.Response(status=303, headers={hdrs.LOCATION: "/?deleted=1"})

    async def cancel(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        try:
            jobs.request_cancel(db, job.id, session.member)
        except jobs.JobError as e:
            return page_error(request, 400, f"Nothing changed: {e}.")
        return _back(job, "")

    async def grid(request: web.Request) -> web.Response:
        session = signed_in(request)
        job = _own_job(server, request, session)
        form = await request.post()
        try:
            weights = [float(w) for w in str(form.get("weights", "")).replace(" ", "").split(",") if w]
            jobs.submit_grid(db, cfg, session.member, job.id, weights)
        except (ValueError, jobs.JobError) as e:
            return page_error(request, 400, f"No grid was queued: {e}.")
        return _back(job, "grid")

    async def events(request: web.Request) -> web.StreamResponse:
        """Server-sent events: the live box's numbers every LIVE_SECONDS until the job ends."""
        session = signed_in(request)
        job = _own_job(server, request, session)
        response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/event-stream"})
        await response.prepare(request)
        last = None
        with contextlib.suppress(ConnectionResetError):  # the page was closed: nobody to tell
            for _ in range(int(LIVE_MAX_S / LIVE_SECONDS)):
                job = store.get_job(db, job.id) or job
                now = views.live(db, job)
                if now != last:
                    await response.write(f"data: {json.dumps(now)}\n\n".encode())
                    last = now
                if job.state not in store.ACTIVE:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.closing.wait(), LIVE_SECONDS)
                if server.closing.is_set():  # the bot stops: the browser reconnects to the next one
                    break
        return response

    return [
        web.get("/", home),
        web.get("/loras/{job}", lora),
        web.get(r"/loras/{job}/image/{art:\d+}", image),
        web.get("/loras/{job}/dataset.jpg", contact),
        web.get("/loras/{job}/loss.json", loss),
        web.get("/loras/{job}/download", download),
        web.get("/loras/{job}/events", events),
        web.post("/loras/{job}/use", use),
        web.post("/loras/{job}/{what:share|unshare}", share),
        web.post("/loras/{job}/delete", delete),
        web.post("/loras/{job}/cancel", cancel),
        web.post("/loras/{job}/grid", grid),
    ]


def _is_grid_of(grid: store.Job, job: store.Job) -> bool:
    return (
        grid.kind == "grid"
        and grid.owner == job.owner
        and grid.spec_dict.get("lora_dir") == job.spec_dict.get("output_dir")
    )


def _grid_jobs(db: Any, job: store.Job) -> list[store.Job]:
    return [g for g in store.list_jobs(db, ("done",), owner=job.owner) if _is_grid_of(g, job)]


def _made_of(db: Any, job: store.Job, job_id: int) -> bool:
    """Whether job ``job_id`` is the training ``job`` itself or a grid made of it."""
    if job_id == job.id:
        return True
    other = store.get_job(db, job_id)
    return other is not None and _is_grid_of(other, job)

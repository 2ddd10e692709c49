"""The web pages' rules on a real aiohttp server and store, without a browser: sign-in links open a
session for one member (HttpOnly, SameSite cookie; only the token's hash is stored), forms need
the session's CSRF token and our own origin, members' text is escaped, every response carries the
security headers, the owner's page is an admin's alone and records what they do, the scheduler
keeps each step's loss for the chart, and the dataset's tags or words are counted.
(tests/test_web_browser.py drives the same pages in Chromium.)"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
from botutil import write_config
from PIL import Image, PngImagePlugin
from safetensors.numpy import save_file

from bot import library, store
from bot.dispatch import WorkerDied, WorkerEvent
from bot.scheduler import Scheduler
from bot.web import WebServer, views
from runner.spec import ProgressEvent

NAME = "<b onmouseover=alert(1)>キャラ"  # no slash: a LoRA name is a file name


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


def client() -> aiohttp.ClientSession:
    # unsafe: keep cookies of an IP address (127.0.0.1), as browsers do
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def picture(path: Path, color: tuple[int, int, int], parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (64, 48), color).save(path, pnginfo=info)


def trained(
    cfg, db, owner: str = "111", captions: tuple[str, ...] = ("sks, red hair, smile", "sks, red hair")
) -> store.Job:
    """A finished training as the scheduler records one: two epochs with a preview each, their LoRA
    files (kohya's metadata hashes), the dataset folder with captions, and the steps' losses."""
    data = cfg.data_dir / "members" / owner / "datasets" / "1" / "1_x"
    out = cfg.data_dir / "members" / owner / "loras" / "1"
    data.mkdir(parents=True)
    out.mkdir(parents=True)
    for i, text in enumerate(captions):
        Image.new("RGB", (200, 120), (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(text, encoding="utf-8")
    spec = {
        "output_name": NAME,
        "train_data_dir": str(data.parent),
        "output_dir": str(out),
        "base": "tiny:sd15",
        "trigger_word": "sks",
        "network_dim": 4,
        "sample_prompts": ["sks, red hair"],
    }
    store.ensure_member(db, owner)
    job_id = store.insert_job(db, "train", owner, NAME, spec, "k", 4, 10.0)
    store.transition(db, job_id, ("queued",), "running")
    for epoch in (1, 2):
        lora = out / f"x-{epoch:06d}.safetensors"
        save_file(
            {"w": np.full((2, 2), epoch, np.float32)}, lora, metadata={"sshs_model_hash": f"hash{epoch}"}
        )
        img = out / f"sample-{epoch}.png"
        picture(img, (epoch * 100, 0, 0), f"sks, red hair\nSteps: 20, Seed: {epoch}")
        digest = hashlib.sha256(lora.read_bytes()).hexdigest()
        store.add_artifact(db, job_id, owner, "lora", str(lora), digest, lora.stat().st_size, epoch)
        store.add_artifact(db, job_id, owner, "image", str(img), "-", img.stat().st_size, epoch)
        event = {
            "epoch": epoch,
            "step": 2 * epoch,
            "lora_file": str(lora),
            "sample_images": [str(img)],
            "sample_prompts": ["sks, red hair"],
        }
        store.add_event(db, job_id, "epoch", event)
        for step in (2 * epoch - 1, 2 * epoch):
            store.add_loss(db, job_id, step, epoch, 1.0 / step)
    store.transition(db, job_id, ("running",), "done")
    job = store.get_job(db, job_id)
    library.keep_epoch(db, cfg, job, 2)
    return job


@pytest.fixture
def site(tmp_path):
    cfg = write_config(tmp_path, '[web]\nhost = "127.0.0.1"\nport = 0\n')
    return cfg, store.open_store(cfg.store)


@async_test
async def test_a_sign_in_link_opens_a_session_for_that_member_alone(site):
    cfg, db = site
    job = trained(cfg, db)
    async with WebServer(cfg, db) as web, client() as http:
        link = web.logins.link("111", False, f"/loras/{job.id}")
        async with http.get(link, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == f"/loras/{job.id}"
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=43200" in cookie
        token = cookie.split("=", 1)[1].split(";")[0]
        rows = list(db.query("SELECT * FROM web_sessions"))
        assert [r["token_hash"] for r in rows] == [hashlib.sha256(token.encode()).hexdigest()]
        assert token not in json.dumps(rows)
        async with http.get(web.links.base_url + f"/loras/{job.id}") as r:
            page = await r.text()
            assert r.status == 200 and "Epoch 2" in page and "hash2" in page
        # Someone else's id in the address finds nothing; so does a job that does not exist.
        other = trained(cfg, db, owner="222")
        for path in (f"/loras/{other.id}", f"/loras/{other.id}/download?epoch=1", "/loras/999", "/loras/x"):
            async with http.get(web.links.base_url + path) as r:
                assert r.status == 404, path
        async with http.get(web.links.base_url + "/admin") as r:
            assert r.status == 403
    with pytest.raises(ValueError, match="not a page"):
        web.logins.link("111", False, "//evil.example/")


@async_test
async def test_forms_need_the_sessions_token_and_this_sites_origin(site):
    cfg, db = site
    job = trained(cfg, db)
    picked = []

    async def say_in_thread(j, epoch, name):
        picked.append((j.id, epoch, name))

    async with WebServer(cfg, db) as web, client() as http:
        web.on_epoch_picked = say_in_thread
        async with http.get(web.logins.link("111")) as r:
            assert r.status == 200
        session = next(iter(db.query("SELECT csrf FROM web_sessions")))
        url = web.links.base_url + f"/loras/{job.id}/use"
        for form, headers in (
            ({"epoch": "1"}, {}),
            ({"epoch": "1", "csrf": "wrong"}, {}),
            ({"epoch": "1", "csrf": session["csrf"]}, {"Origin": "https://evil.example"}),
            ({"epoch": "1", "csrf": session["csrf"]}, {"Origin": "null"}),  # a sandboxed or opaque page
        ):
            async with http.post(url, data=form, headers=headers, allow_redirects=False) as r:
                assert r.status == 403
        assert library.get_lora(db, "111", NAME).epoch == 2 and picked == []
        origin = web.links.base_url
        async with http.post(
            url, data={"epoch": "1", "csrf": session["csrf"]}, headers={"Origin": origin}
        ) as r:
            assert r.status == 200 and "Epoch 1 is now in your library" in await r.text()
        kept = library.get_lora(db, "111", NAME)
        assert kept.epoch == 1 and picked == [(job.id, 1, NAME)]
        assert (
            Path(kept.path).read_bytes()
            == (Path(job.spec_dict["output_dir"]) / "x-000001.safetensors").read_bytes()
        )
        async with http.post(url, data={"epoch": "7", "csrf": session["csrf"]}) as r:
            assert r.status == 400 and "was not saved" in await r.text()
        async with http.post(web.links.base_url + "/logout", data={"csrf": session["csrf"]}) as r:
            assert r.status == 200
        assert db["web_sessions"].count == 0
        async with http.get(web.links.base_url + f"/loras/{job.id}") as r:
            assert r.status == 401 and "Open in browser" in await r.text()


@async_test
async def test_members_text_is_escaped_and_every_answer_has_the_security_headers(site):
    cfg, db = site
    job = trained(cfg, db, captions=('<img src=x onerror="alert(2)">, sks', "sks"))
    async with WebServer(cfg, db) as web, client() as http:
        await (await http.get(web.logins.link("111"))).read()
        for path in ("/", f"/loras/{job.id}", "/nothing-here", "/static/app.js"):
            async with http.get(web.links.base_url + path) as r:
                body = await r.text()
                assert "<b onmouseover" not in body and "<img src=x" not in body
                csp = r.headers["Content-Security-Policy"]
                assert (
                    "script-src 'self';" in csp
                    and "frame-ancestors 'none'" in csp
                    and "unsafe-inline" not in csp
                )
                assert (
                    r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "same-origin"
                )
                private = "no-store" if not path.startswith("/static/") else "public, max-age=3600"
                assert r.headers["Cache-Control"] == private, path
        async with http.get(web.links.base_url + f"/loras/{job.id}") as r:
            page = await r.text()
        assert "&lt;b onmouseover=alert(1)&gt;キャラ" in page
        assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in page
        assert "<script>" not in page.replace('<script src="', "")  # only our own files, no inline script


@async_test
async def test_the_owners_page_is_for_admins_and_records_what_they_do(site, tmp_path):
    cfg, db = site
    trained(cfg, db)
    waiting = store.insert_job(db, "gen", "111", None, {"prompt": "x"}, "g", 20, 3.0)
    async with WebServer(cfg, db) as web, client() as member, client() as owner:
        await (await member.get(web.logins.link("111"))).read()
        async with member.get(web.links.base_url + "/admin") as r:
            assert r.status == 403
        # The owner's link from the CLI, as the README says.
        out = subprocess.run(
            [sys.executable, "-m", "bot.cli", "web-link", "--config", str(cfg.path), "--admin"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        link = out.replace(f"{urlsplit(out).scheme}://{urlsplit(out).netloc}", web.links.base_url)
        async with owner.get(link) as r:
            page = await r.text()
            assert r.status == 200 and f'data-job="{waiting}"' in page and "▶️ The queue runs." in page
        csrf = next(iter(db.query("SELECT csrf FROM web_sessions WHERE admin = 1")))["csrf"]
        base = web.links.base_url
        async with member.post(
            base + "/admin/pause",
            data={"csrf": next(iter(db.query("SELECT csrf FROM web_sessions WHERE admin = 0")))["csrf"]},
        ) as r:
            assert r.status == 403 and not store.get_setting(db, "paused", False)
        async with owner.post(base + "/admin/pause", data={"csrf": csrf}) as r:
            assert r.status == 200 and "Paused" in await r.text()
        assert store.get_setting(db, "paused") is True
        async with owner.post(
            base + "/admin/quota",
            data={"csrf": csrf, "scope": "role", "subject": "42", "key": "daily_gpu_seconds", "value": "-5"},
        ) as r:
            assert r.status == 400 and "daily_gpu_seconds takes a number from 0" in await r.text()
        async with owner.post(
            base + "/admin/quota",
            data={
                "csrf": csrf,
                "scope": "role",
                "subject": "42",
                "key": "daily_gpu_seconds",
                "value": "unlimited",
            },
        ) as r:
            assert r.status == 200
        assert store.quota_overrides(db, "role", ["42"])["42"]["daily_gpu_seconds"] > 0
        async with owner.post(base + f"/admin/jobs/{waiting}/cancel", data={"csrf": csrf}) as r:
            assert r.status == 200
        assert store.get_job(db, waiting).state == "cancelled"
        async with owner.get(base + "/admin/usage.json") as r:
            assert await r.json() == {"members": [], "seconds": []}
        more = [store.insert_job(db, "gen", "111", None, {"prompt": "x"}, "g", 20, 3.0) for _ in range(2)]
        async with owner.post(base + "/admin/resume", data={"csrf": csrf}) as r:
            assert r.status == 200 and store.get_setting(db, "paused") is False
        async with owner.post(base + "/admin/drain", data={"csrf": csrf}) as r:
            assert r.status == 200 and "every waiting job was cancelled" in await r.text()
        assert store.get_setting(db, "paused") is True
        assert [store.get_job(db, j).state for j in more] == ["cancelled", "cancelled"]
    actions = [(a["who"], a["via"], a["action"], a["detail"]) for a in reversed(store.admin_actions(db))]
    assert actions == [
        ("owner", "web", "pause", ""),
        ("owner", "web", "quota", "role 42: daily_gpu_seconds = unlimited"),
        ("owner", "web", "cancel", f"job #{waiting}: cancelled"),
        ("owner", "web", "resume", ""),
        ("owner", "web", "drain", "2 waiting job(s) cancelled"),
    ]


class _Workers:
    workers = ["0:cpu"]

    def ready(self, worker: str) -> bool:
        return True


@async_test
async def test_the_scheduler_keeps_each_steps_loss_and_a_resumed_step_replaces_it(site):
    cfg, db = site
    sched = Scheduler(db, cfg, _Workers())
    store.ensure_member(db, "111")
    job_id = store.insert_job(db, "train", "111", "x", {}, "k", 4, 1.0)
    store.transition(db, job_id, ("queued",), "running")

    def progress(step: int, loss: float) -> WorkerEvent:
        event = ProgressEvent(step=step, total_steps=4, epoch=1, loss=loss, lr=1e-4, eta_s=1, samples_per_s=1)
        return WorkerEvent("0:cpu", job_id, event)

    for step, loss in ((1, 0.5), (2, 0.4), (2, 0.3)):  # step 2 again: a resumed run
        await sched.handle(progress(step, loss))
    assert store.losses(db, job_id) == [(1, 1, 0.5), (2, 1, 0.3)]
    assert views.loss_series(db, job_id) == {"step": [1, 2], "epoch": [1, 1], "loss": [0.5, 0.3]}
    # The owner's page: the worker's device, its job, and why it died when it did.
    (worker,) = views.overview(db, cfg, sched).workers
    assert (worker.device, worker.up, worker.restarts) == ("cpu", True, 0)
    await sched.handle(WorkerDied("0:cpu", "was killed by the kernel (out of memory)"))
    (worker,) = views.overview(db, cfg, sched).workers
    assert (worker.restarts, worker.last_error) == (1, "was killed by the kernel (out of memory)")


def test_the_dataset_shows_tags_or_words_by_the_images_they_are_in(tmp_path):
    folder = tmp_path / "d" / "1_x"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (300, 200), (i * 20, 0, 0)).save(folder / f"{i}.jpg")
    spec = {"train_data_dir": str(tmp_path / "d")}
    for i in range(10):
        (folder / f"{i}.txt").write_text("sks, smile, red hair" if i < 7 else "sks, frown", encoding="utf-8")
    tags = views.dataset(spec)
    assert tags.by == "tag" and tags.words == [("sks", 10), ("red hair", 7), ("smile", 7), ("frown", 3)]
    for i in range(10):
        (folder / f"{i}.txt").write_text(
            f"A photo of sks with red hair standing in a park number {i}.", encoding="utf-8"
        )
    words = views.dataset(spec)
    assert words.by == "word" and ("sks", 10) in words.words and ("photo", 10) in words.words
    assert all(w not in ("a", "of", "with", "in") for w, _ in words.words)
    sheet = Image.open(io.BytesIO(views.contact_sheet(words.images)))
    assert sheet.size == (8 * views.CONTACT_CELL, 2 * views.CONTACT_CELL)
    # the first thumbnail is the first image, cropped square (centre pixel keeps its colour)
    assert sheet.getpixel((views.CONTACT_CELL // 2, views.CONTACT_CELL // 2))[1:] == (0, 0)


def test_sessions_end_when_they_expire(site):
    cfg, db = site
    store.add_session(db, "h", store.WebSession("111", False, "c", time.time() - 1))
    assert store.get_session(db, "h") is None
    store.add_session(db, "h2", store.WebSession("111", True, "c", time.time() + 60))
    assert db["web_sessions"].count == 1  # the expired one went when the next was opened
    assert store.get_session(db, "h2").admin is True


@async_test
async def test_share_unshare_and_delete_from_the_page(site):
    cfg, db = site
    job = trained(cfg, db)
    async with WebServer(cfg, db) as web, client() as http:
        await (await http.get(web.logins.link("111"))).read()
        csrf = next(iter(db.query("SELECT csrf FROM web_sessions")))["csrf"]
        base = web.links.base_url + f"/loras/{job.id}"
        async with http.post(base + "/share", data={"csrf": csrf}) as r:
            assert r.status == 200 and "Shared" in await r.text()
        assert library.get_lora(db, "111", NAME).shared == 1
        assert [lo.name for lo in library.loras_for(db, "222")] == [NAME]  # others can use it now
        async with http.post(base + "/unshare", data={"csrf": csrf}) as r:
            assert r.status == 200 and "Private again" in await r.text()
        assert library.get_lora(db, "111", NAME).shared == 0
        kept = Path(library.get_lora(db, "111", NAME).path)
        async with http.post(base + "/delete", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/?deleted=1"
        assert library.get_lora(db, "111", NAME) is None and not kept.exists()
        assert not Path(job.spec_dict["output_dir"]).exists() and store.artifacts(db, job.id) == []

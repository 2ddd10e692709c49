"""bot/web.py on a real aiohttp server on 127.0.0.1 with a real store: signed links (Unicode
names, ranges, expiry, tampering, traversal, symlinks), /healthz states and /metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from email.message import Message
from email.utils import collapse_rfc2231_value
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from botutil import write_config
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from bot import jobs, store
from bot.config import ConfigError, load_config
from bot.dispatch import make_dispatcher
from bot.scheduler import Scheduler
from bot.web import SECRET_FILE, LinkError, WebServer

WEB = '[web]\nhost = "127.0.0.1"\nport = 0\n'


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


@pytest.fixture
def server(tmp_path):
    cfg = write_config(tmp_path, WEB)
    return cfg, store.open_store(cfg.store)


def put(cfg, rel: str, data: bytes) -> os.PathLike:
    path = cfg.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def get(url: str | URL, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


def disposition_params(header: str) -> tuple[str, str, tuple[str, str, str]]:
    """(type, filename, filename*) as the standard library's RFC 2231 parser reads them."""
    message = Message()
    message["Content-Disposition"] = header
    (kind, _), *params = message.get_params(header="content-disposition")
    plain = next(v for k, v in params if k == "filename" and isinstance(v, str))
    extended = next(v for k, v in params if k == "filename" and isinstance(v, tuple))
    return kind, plain, extended


def with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {**dict(parse_qsl(parts.query)), **changes}
    return parts._replace(query=urlencode({k: v for k, v in query.items() if v is not None})).geturl()


@async_test
async def test_link_serves_japanese_name_whole_and_by_range(server):
    cfg, db = server
    name = "キャラ 01 #1+%&?.safetensors"
    data = os.urandom(3 * 2**20 + 17)
    path = put(cfg, f"members/alice/loras/1/{name}", data)
    async with WebServer(cfg, db) as web:
        for url in (web.links.sign(f"members/alice/loras/1/{name}"), web.links.sign(path)):
            assert url.startswith(f"http://127.0.0.1:{web.port}/files/")
            status, body, headers = await get(url)
            assert status == 200 and body == data
            kind, plain, extended = disposition_params(headers["Content-Disposition"])
            assert kind == "attachment" and plain.isascii() and plain.endswith(" 01 #1+%&?.safetensors")
            assert collapse_rfc2231_value(extended) == name  # what browsers save it as (RFC 6266)
        status, body, headers = await get(url, Range="bytes=1000-1999")
        assert status == 206 and body == data[1000:2000]
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"


@async_test
async def test_expired_and_tampered_links_are_refused(server):
    cfg, db = server
    put(cfg, "members/alice/a.png", b"alice's")
    put(cfg, "members/bob/b.png", b"bob's")
    async with WebServer(cfg, db) as web:
        good = web.links.sign("members/alice/a.png", time.time() + 60)
        assert (await get(good))[0] == 200
        status, body, _ = await get(web.links.sign("members/alice/a.png", time.time() - 1))
        assert status == 403 and b"expired" in body
        query = dict(parse_qsl(urlsplit(good).query))
        flipped = ("B" if query["sig"][0] == "A" else "A") + query["sig"][1:]
        tampered = [
            with_query(good, exp=str(int(query["exp"]) + 3600)),  # a later expiry
            with_query(good, sig=flipped),
            with_query(good, sig=None),
            with_query(good, exp="soon"),
            with_query(good, sig="キャラ"),
            good.replace("members/alice/a.png", "members/bob/b.png"),  # another file, same signature
        ]
        for url in tampered:
            status, body, _ = await get(url)
            assert status == 403 and b"not valid" in body, url
        gone = web.links.sign("members/alice/a.png")
        (cfg.data_dir / "members/alice/a.png").unlink()
        status, body, _ = await get(gone)
        assert status == 404 and b"gone" in body


@async_test
async def test_nothing_outside_the_data_folder_is_signed_or_served(server, tmp_path):
    cfg, db = server
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for members")
    put(cfg, "members/alice/ok.txt", b"ok")
    (cfg.data_dir / "members/alice/out.txt").symlink_to(outside / "secret.txt")
    (cfg.data_dir / "members/alice/dir").symlink_to(outside, target_is_directory=True)
    async with WebServer(cfg, db) as web:
        for bad in (
            "../outside/secret.txt",
            "members/../../outside/secret.txt",
            outside / "secret.txt",
            "members/alice/out.txt",
            "members/alice/dir/secret.txt",
            SECRET_FILE,
            "members/alice",
        ):
            with pytest.raises(LinkError):
                web.links.sign(bad)
        # Links signed by a buggy caller (or before a file became a symlink) are still refused.
        exp = int(time.time()) + 60
        base = f"http://127.0.0.1:{web.port}/files/"
        for rel, raw in [
            ("members/alice/out.txt", "members/alice/out.txt"),
            ("members/alice/dir/secret.txt", "members/alice/dir/secret.txt"),
            ("members/../../outside/secret.txt", "members/%2E%2E/%2E%2E/outside/secret.txt"),
            (SECRET_FILE, SECRET_FILE),
        ]:
            # encoded=True: the client sends the '..' as written instead of resolving it itself.
            status, body, _ = await get(
                URL(f"{base}{raw}?exp={exp}&sig={web.links.signature(rel, exp)}", encoded=True)
            )
            assert status == 403 and b"not for members" not in body, rel
        ok = web.links.sign("members/alice/ok.txt")
        (cfg.data_dir / "members/alice/ok.txt").unlink()
        (cfg.data_dir / "members/alice/ok.txt").symlink_to(outside / "secret.txt")
        status, body, _ = await get(ok)
        assert status == 403 and b"outside" in body


@async_test
async def test_secret_is_kept_across_restarts_and_never_logged(tmp_path, caplog):
    caplog.set_level("DEBUG")
    cfg = write_config(tmp_path, WEB)
    db = store.open_store(cfg.store)
    put(cfg, "members/alice/a.txt", b"kept")
    async with WebServer(cfg, db) as first:
        url = first.links.sign("members/alice/a.txt")
    secret_path = cfg.data_dir / SECRET_FILE
    secret = secret_path.read_text().strip()
    assert len(secret) >= 32 and secret_path.stat().st_mode & 0o077 == 0
    async with WebServer(cfg, db) as second:  # the same secret: old links keep working
        assert (await get(url.replace(f":{first.port}/", f":{second.port}/")))[0] == 200
    assert secret not in caplog.text and secret not in repr(second.links)
    (tmp_path / "link.key").write_text("x" * 40)
    cfg = write_config(tmp_path, WEB + 'secret_file = "link.key"\n')
    async with WebServer(cfg, db) as third:  # a configured secret replaces the generated one
        assert (await get(url.replace(f":{first.port}/", f":{third.port}/")))[0] == 403
    (tmp_path / "link.key").write_text("short")
    with pytest.raises(ConfigError, match="too short"):
        WebServer(cfg, db)


@async_test
async def test_start_stop_and_a_port_in_use(server, tmp_path):
    cfg, db = server
    web = WebServer(cfg, db)
    await web.start()
    port = web.port
    assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    await web.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{port}/healthz")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = write_config(tmp_path, f'[web]\nhost = "127.0.0.1"\nport = {taken.getsockname()[1]}\n')
        with pytest.raises(ConfigError, match=r"\[web\] host and port"):
            await WebServer(busy, db).start()


def test_web_config_is_checked(tmp_path):
    cfg = write_config(tmp_path, '[web]\npublic_url = "https://bot.example/dl/"\nlink_hours = 2\n')
    assert cfg.web.public_url == "https://bot.example/dl" and cfg.web.port == 8080
    for bad, words in [('public_url = "bot.example"', "not a URL"), ("port = 70000", "web.port")]:
        (tmp_path / "server.toml").write_text(f"[web]\n{bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(tmp_path / "server.toml")


@async_test
async def test_public_url_is_the_base_of_links(tmp_path):
    cfg = write_config(tmp_path, WEB + 'public_url = "https://bot.example/dl"\n')
    put(cfg, "members/alice/a.txt", b"x")
    async with WebServer(cfg, store.open_store(cfg.store)) as web:
        url = web.links.sign("members/alice/a.txt")
        assert url.startswith("https://bot.example/dl/files/members/alice/a.txt?exp=")
        assert (await get(url.replace("https://bot.example/dl", f"http://127.0.0.1:{web.port}")))[0] == 200


@async_test
async def test_healthz_reports_store_and_discord(server):
    cfg, db = server
    async with WebServer(cfg, db) as web:
        url = f"http://127.0.0.1:{web.port}/healthz"
        store.ensure_member(db, "alice")
        store.insert_job(db, "train", "alice", "x", {}, "k", 10, 5.0)
        status, body, _ = await get(url)
        assert status == 200
        assert json.loads(body) == {
            "ok": True,
            "store": {"ok": True, "queued": 1, "running": 0},
            "workers": {},
            "discord": "disabled",
        }
        web.discord_connected = False
        status, body, _ = await get(url)
        assert status == 503 and json.loads(body)["discord"] == "disconnected"
        web.discord_connected = True
        assert (await get(url))[0] == 200
        db.conn.close()
        status, body, _ = await get(url)
        report = json.loads(body)
        assert status == 503 and report["store"]["ok"] is False and report["store"]["error"]


@async_test
async def test_healthz_and_metrics_see_a_worker_die_and_come_back(tmp_path):
    cfg = write_config(tmp_path, WEB)
    db = store.open_store(cfg.store)
    scheduler = Scheduler(db, cfg, make_dispatcher(cfg))
    stop = asyncio.Event()
    run = asyncio.create_task(scheduler.run(stop))
    try:
        async with WebServer(cfg, db, scheduler) as web:
            health = f"http://127.0.0.1:{web.port}/healthz"
            seen = await poll(health, lambda s, r: s == 200 and r["workers"] == {"0:cpu": "alive"})
            assert seen
            os.kill(scheduler.dispatcher.pid("0:cpu"), signal.SIGKILL)
            # A worker dying right after its start is replaced after a pause: it is seen dead.
            assert await poll(health, lambda s, r: s == 503 and r["workers"] == {"0:cpu": "dead"})
            families = await scrape(web)
            assert sample(families, "loracord_worker_up", worker="0:cpu") == 0
            assert sample(families, "loracord_worker_restarts_total") == 1
            assert await poll(health, lambda s, r: s == 200)
            assert sample(await scrape(web), "loracord_worker_up", worker="0:cpu") == 1
    finally:
        stop.set()
        await run


async def poll(url, check, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, body, _ = await get(url)
        if check(status, json.loads(body)):
            return True
        await asyncio.sleep(0.05)
    return False


async def scrape(web: WebServer) -> dict:
    status, body, headers = await get(f"http://127.0.0.1:{web.port}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict, name: str, **labels: str) -> float:
    (value,) = [
        s.value for f in families.values() for s in f.samples if s.name == name and s.labels == labels
    ]
    return value


@async_test
async def test_metrics_reflect_the_store_and_ack_latencies(server):
    cfg, db = server
    for member in ("alice", "bob"):
        store.ensure_member(db, member)
    train = [store.insert_job(db, "train", m, "x", {}, "k", 10, 5.0) for m in ("alice", "alice", "bob")]
    gen = store.insert_job(db, "gen", "bob", None, {}, "g", 20, 2.0)
    jobs.request_cancel(db, train[2])
    store.charge(db, "alice", train[0], 12.5)
    store.charge(db, "bob", gen, 1.5)
    async with WebServer(cfg, db) as web:
        for seconds in (0.02, 0.2, 0.2, 4.0):
            web.metrics.observe_ack(seconds)
        m = await scrape(web)
        assert sample(m, "loracord_queue_length", kind="train") == 2
        assert sample(m, "loracord_queue_length", kind="gen") == 1
        assert sample(m, "loracord_jobs", kind="train", state="cancelled") == 1
        assert sample(m, "loracord_jobs", kind="gen", state="done") == 0
        assert sample(m, "loracord_gpu_seconds_total") == 14.0
        assert sample(m, "loracord_interaction_ack_seconds_count") == 4
        assert sample(m, "loracord_interaction_ack_seconds_sum") == pytest.approx(4.42)
        assert sample(m, "loracord_interaction_ack_seconds_bucket", le="0.25") == 3
        assert sample(m, "loracord_interaction_ack_seconds_bucket", le="3.0") == 3
        assert "loracord_worker_up" not in m  # no scheduler in this process
        # Read at scrape time: a change in the store shows at the next scrape.
        jobs.move(db, train[0], "running", started_at=time.time())
        m = await scrape(web)
        assert sample(m, "loracord_queue_length", kind="train") == 1
        assert sample(m, "loracord_jobs", kind="train", state="running") == 1


def test_the_web_side_never_loads_torch():
    code = "import sys, bot.web; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr

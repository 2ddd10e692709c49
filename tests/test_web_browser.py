"""The web pages in a real headless Chromium (Debian's, driven by Playwright) against ``loracord run``
as members run it: the bot in its own process, on the Discord stub, with the tiny SD1.5 base and a
CPU worker. Alice trains through Discord, opens the link from /loras, compares epochs, picks one
(the thread hears of it) and downloads it; a changed or expired link, another member's LoRA and the
admin page are refused to whom they are not for; the owner cancels a job from the page.

Every page is photographed at a phone's size and a desktop's under the test's output folder;
``LORACORD_DOCS_SCREENSHOTS=1`` also writes the ones docs/web.md shows to ``docs/web/``.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import discord
import pytest
from botutil import write_config
from discord_stub import DiscordStub, Upload
from PIL import Image

from bot import library, store
from bot.config import TOKEN_ENV
from bot.web import Links, load_secret
from bot.web.sessions import Logins

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "web"
DOC_SHOTS = {"my-loras-phone", "lora-phone", "viewer-phone", "live-phone", "admin-desktop", "admin-phone"}
# Chromium as root in a container, with nothing reaching out to the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Loop:
    """One event loop in a thread for the stub, so the tests' synchronous Playwright can run beside it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (128, 128), color).save(out, "PNG")
    return out.getvalue()


class Site:
    """The stub, ``loracord run`` on it, the store (read beside the bot, as the CLI does) and a browser."""

    def __init__(self, root: Path, loop: Loop, browser: Any):
        self.root, self.loop, self.browser = root, loop, browser
        self.shots = root / "screens"
        self.shots.mkdir()
        self.stub: DiscordStub = loop.run(self._stub())
        self.cfg = write_config(
            root,
            "[quota]\nqueued_jobs = 5\ndaily_gpu_seconds = 100000\n[scheduling]\npoll_seconds = 0.05\n"
            f'[web]\nport = 0\n[discord]\napi_base = "{self.stub.api_base}"\ngateway = "{self.stub.gateway_url}"\n'
            f"guilds = [{self.stub.guild_id}]\nprogress_seconds = 0.2\n",
        )
        env = {**os.environ, TOKEN_ENV: self.stub.token, "OMP_NUM_THREADS": "1"}
        self.log = open(root / "bot.log", "wb")  # noqa: SIM115 (open for the module's whole run)
        self.bot = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "run", "--config", str(self.cfg.path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        # on_ready: the commands are synced and the gateway session is up (its log line, as an owner sees it)
        log = self.root / "bot.log"
        self.wait(
            lambda: "Discord: logged in as" in log.read_text(errors="replace"), 60, "the bot to be ready"
        )
        self.db = store.open_store(self.cfg.store)
        self.alice = self.call(self.stub.add_member, "alice")
        self.bob = self.call(self.stub.add_member, "bob")
        mods = self.call(self.stub.add_role, "mods", discord.Permissions(manage_guild=True))
        self.mod = self.call(self.stub.add_member, "mod", roles=[mods])

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the stub's loop: the stub is not thread-safe, and what it changes wakes its waiters."""

        async def go() -> Any:
            return fn(*args, **kwargs)

        return self.loop.run(go())

    async def _stub(self) -> DiscordStub:
        stub = DiscordStub()
        await stub.start()
        return stub

    def wait(self, check: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while not (found := check()):
            if self.bot is not None and self.bot.poll() is not None:
                raise AssertionError(f"loracord run exited ({self.bot.returncode}): {self.log_text()}")
            assert time.monotonic() < deadline, f"gave up waiting for {what}\n{self.log_text()}"
            time.sleep(0.1)
        return found

    def log_text(self) -> str:
        return (self.root / "bot.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.bot.terminate()
        try:
            self.bot.wait(30)
        except subprocess.TimeoutExpired:
            self.bot.kill()
        self.log.close()
        self.loop.run(self.stub.close())

    # ---- Discord, as members use it ----

    def train(self, who: Any, name: str, epochs: int) -> tuple[int, store.Job]:
        """/train in a thread, two images, settings, Start: (thread id, the queued job)."""
        stub = self.stub

        async def go() -> int:
            ix = await stub.command(
                who, "train", {"name": name, "trigger": "sks", "preset": "character", "base": "tiny"}
            )
            await ix.original_message()
            tid = int(stub.threads()[-1]["id"])
            card = (await stub.wait_until(lambda: stub.channel_messages(tid), 30, "the card"))[0]
            await stub.post_message(
                who,
                tid,
                "pics",
                files=[Upload("a.png", png((200, 40, 40))), Upload("b.png", png((40, 40, 200)))],
            )
            await stub.wait_until(
                lambda: card.embeds and "**2** images" in card.embeds[0]["description"], 240, "intake"
            )
            opened = await stub.click(who, card, next(c for c in card.custom_ids() if c.endswith(":set")))
            values = {
                "Epochs": str(epochs),
                "Repeats per image": "1",
                "Dim / alpha": "4/2",
                "Learning rate": "1e-3",
                "Resolution": "64",
            }
            await (await stub.submit_modal(who, opened, values)).original_message()
            for key, value in (("mixed_precision", "no"), ("sample_steps", "2"), ("train_batch_size", "1")):
                done = await stub.command(who, "train-set", {"key": key, "value": value}, channel_id=tid)
                await done.original_message()
            start = await stub.click(who, card, next(c for c in card.custom_ids() if c.endswith(":start")))
            assert "Queued as job" in (await start.original_message()).content
            return tid

        tid = self.loop.run(go())
        job = self.wait(
            lambda: next((j for j in store.list_jobs(self.db, owner=str(who.id)) if j.name == name), None)
        )
        return tid, job

    def login_link(self, who: Any) -> str:
        """The Open in browser button of the member's /loras answer."""

        async def go() -> str:
            ix = await self.stub.command(who, "loras")
            message = await ix.original_message()
            buttons = [c for c in message.walk_components() if c.get("style") == 5]
            assert [b["label"] for b in buttons] == ["Open in browser"]
            return buttons[0]["url"]

        return self.loop.run(go())

    def thread_says(self, tid: int, text: str) -> Any:
        return self.call(
            lambda: next((m for m in self.stub.channel_messages(tid) if text in m.content), None)
        )

    # ---- the browser ----

    def page(self, who: Any, size: dict[str, int] = PHONE) -> Any:
        """A fresh browser (its own cookies) signed in as ``who`` through their /loras link."""
        context = self.browser.new_context(viewport=size, accept_downloads=True)
        page = context.new_page()
        page.goto(self.login_link(who))
        return page

    def shot(self, page: Any, name: str) -> None:
        """The page at a phone's and a desktop's width; a phone page must not scroll sideways."""
        for label, size in (("phone", PHONE), ("desktop", DESKTOP)):
            page.set_viewport_size(size)
            page.wait_for_timeout(150)
            if label == "phone":
                overflow = page.evaluate("document.documentElement.scrollWidth")
                assert overflow <= PHONE["width"], f"{name} is {overflow} px wide on a 390 px phone"
            path = self.shots / f"{name}-{label}.png"
            page.screenshot(path=str(path), full_page=True)
            if os.environ.get("LORACORD_DOCS_SCREENSHOTS") and path.stem in DOC_SHOTS:
                DOCS.mkdir(exist_ok=True)
                shutil.copyfile(path, DOCS / path.name)
        page.set_viewport_size(PHONE)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    loop = Loop()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        s = Site(root, loop, browser)
        try:
            s.tid, s.job = s.train(s.alice, "キャラ", epochs=2)
            s.wait(lambda: s.thread_says(s.tid, "is ready"), 240, "the end of training")
            yield s
            assert s.call(lambda: s.stub.violations) == []
        finally:
            s.close()
            browser.close()
            loop.close()


def test_a_member_compares_epochs_picks_one_and_the_thread_hears_of_it(site: Site):
    page = site.page(site.alice)
    assert urlsplit(page.url).path == "/" and "sig=" not in page.url  # the signed link left the address bar
    card = page.locator(f'li.card[data-job="{site.job.id}"]')
    assert "epoch 2 in your library" in card.inner_text()
    site.shot(page, "my-loras")
    card.locator("a").click()
    page.wait_for_url(f"**/loras/{site.job.id}")
    assert page.locator("#epochs article.epoch").evaluate_all("els => els.map(e => e.dataset.epoch)") == [
        "2",
        "1",
    ]
    assert page.locator("#epoch-2 .badge").inner_text() == "✓ in your library"
    # Full size: each preview is the file the worker rendered, served whole.
    first = page.locator("#epoch-1 figure img").first
    width = first.evaluate("img => img.naturalWidth")
    art = next(a for a in store.artifacts(site.db, site.job.id) if a["kind"] == "image" and a["epoch"] == 1)
    assert width == Image.open(art["path"]).width
    # The epoch × prompt grid: a row per epoch; tapping a cell opens it whole, swiping goes on.
    assert page.locator("#compare tbody tr").count() == 2
    page.locator("#compare tbody img").first.click()
    viewer = page.locator(".lightbox")
    assert viewer.is_visible()
    shown = viewer.locator("img").get_attribute("src")
    page.keyboard.press("ArrowRight")
    assert viewer.locator("img").get_attribute("src") != shown
    site.shot(page, "viewer")
    page.keyboard.press("Escape")
    assert page.locator(".lightbox").count() == 0
    # A1111's parameters of each image, with a copy button.
    details = page.locator("#epoch-1 details").first
    details.locator("summary").click()
    assert "Steps: 2" in details.locator("pre").inner_text()
    # The loss curve from the recorded steps.
    page.wait_for_selector("#loss canvas")
    steps = len(store.losses(site.db, site.job.id))
    assert steps > 0 and page.locator("#loss").get_attribute("data-points") == str(steps)
    site.shot(page, "lora")

    page.locator("#epoch-1 form button", has_text="Use epoch 1").click()
    page.wait_for_url(lambda url: url.endswith("done=picked"))
    assert "Epoch 1 is now in your library" in page.locator(".note").inner_text()
    assert page.locator("#epoch-1 .badge").is_visible()
    kept = library.get_lora(site.db, str(site.alice.id), "キャラ")
    assert kept.epoch == 1
    epoch1 = next(a for a in store.artifacts(site.db, site.job.id) if a["kind"] == "lora" and a["epoch"] == 1)
    assert Path(kept.path).read_bytes() == Path(epoch1["path"]).read_bytes()
    said = site.wait(lambda: site.thread_says(site.tid, "picked in the browser"), 30, "the thread's message")
    assert "now epoch 1" in said.content

    with page.expect_download() as download:
        page.locator("#library a", has_text="Download").click()
    got = Path(download.value.path()).read_bytes()
    assert got == Path(kept.path).read_bytes() and download.value.suggested_filename == "キャラ.safetensors"

    # Epoch × weight: the form queues a grid job on the same GPU queue; the page shows its image.
    page.locator('#weights input[name="weights"]').fill("0, 1")
    page.locator("#weights button", has_text="Make a grid").click()
    page.wait_for_url(lambda url: url.endswith("done=grid"))
    grid = site.wait(
        lambda: next(
            (j for j in store.list_jobs(site.db, owner=str(site.alice.id)) if j.kind == "grid"), None
        )
    )
    assert (
        grid.spec_dict["weights"] == [0.0, 1.0]
        and grid.spec_dict["lora_dir"] == site.job.spec_dict["output_dir"]
    )
    site.wait(lambda: store.get_job(site.db, grid.id).state == "done", 180, "the grid")
    page.reload()
    image = page.locator("#weights img")
    (art,) = store.artifacts(site.db, grid.id)
    assert image.evaluate("img => img.naturalWidth") == Image.open(art["path"]).width
    image.click()
    assert page.locator(".lightbox img").get_attribute("src").endswith(f"/image/{art['id']}")
    page.keyboard.press("Escape")
    site.shot(page, "weights")


def test_a_changed_or_expired_link_opens_nothing(site: Site):
    link = site.login_link(site.alice)
    parts = urlsplit(link)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}"
    context = site.browser.new_context(viewport=PHONE)
    page = context.new_page()
    for changed in (
        {"m": str(site.bob.id)},
        {"a": "1"},
        {"exp": str(int(query["exp"]) + 3600)},
        {"sig": "x" + query["sig"][1:]},
    ):
        response = page.goto(f"{base}/login?{urlencode({**query, **changed})}")
        assert response.status == 403 and "not valid" in page.inner_text("main")
    links = Links(site.cfg.data_dir, load_secret(site.cfg), base, 60)
    expired = Logins(links, 60, 60).link(str(site.alice.id), False, "/", expires_at=time.time() - 1)
    response = page.goto(expired)
    assert response.status == 403 and "expired" in page.inner_text("main")
    site.shot(page, "expired-link")
    response = page.goto(f"{base}/loras/{site.job.id}")  # no session was opened by any of these
    assert response.status == 401
    assert not any(c["name"] == "loracord_session" for c in context.cookies())


def test_another_members_lora_and_the_admin_page_are_refused(site: Site):
    page = site.page(site.bob)
    base = f"{urlsplit(page.url).scheme}://{urlsplit(page.url).netloc}"
    assert page.locator("li.card").count() == 0
    for path in (
        f"/loras/{site.job.id}",
        f"/loras/{site.job.id}/download",
        f"/loras/{site.job.id}/loss.json",
    ):
        response = page.goto(base + path)
        assert response.status == 404, path
    art = store.artifacts(site.db, site.job.id)[0]
    assert page.goto(f"{base}/loras/{site.job.id}/image/{art['id']}").status == 404
    response = page.goto(base + "/admin")
    assert response.status == 403 and "admins" in page.inner_text("main")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    # A form posted without the session's token (another site's, say) changes nothing.
    before = library.get_lora(site.db, str(site.alice.id), "キャラ")
    posted = page.request.post(f"{base}/loras/{site.job.id}/use", form={"epoch": "2"})
    assert posted.status == 403 and "expired" in posted.text()
    assert library.get_lora(site.db, str(site.alice.id), "キャラ") == before
    site.shot(page, "refused")


def test_the_owner_sees_the_server_and_cancels_a_job_from_the_page(site: Site):
    tid, job = site.train(site.alice, "long", epochs=60)
    site.wait(
        lambda: store.get_job(site.db, job.id).state == "running" and store.get_job(site.db, job.id).progress,
        120,
        "the long job to run",
    )
    member = site.page(site.alice)
    member.goto(member.url.rstrip("/") + f"/loras/{job.id}")
    text = member.locator('[data-live="text"]')
    before = text.inner_text()
    member.wait_for_function(
        "before => document.querySelector('[data-live=text]').textContent !== before",
        arg=before,
        timeout=60000,
    )
    assert "step" in text.inner_text() and "ETA" in member.locator('[data-live="eta"]').inner_text()
    site.shot(member, "live")

    owner = site.page(site.mod, DESKTOP)
    base = f"{urlsplit(owner.url).scheme}://{urlsplit(owner.url).netloc}"
    owner.goto(base + "/admin")
    row = owner.locator(f'#running tr[data-job="{job.id}"]')
    assert "long" in row.inner_text() and f"alice ({site.alice.id})" in row.inner_text()
    assert owner.locator("#workers tbody tr").count() == 1 and "cpu" in owner.inner_text("#workers")
    owner.wait_for_selector("#usage-chart canvas")
    # Quotas: refused with the reason when not a limit, saved when it is.
    form = owner.locator("#quota-form")
    form.locator('select[name="scope"]').select_option("member")
    form.locator('input[name="subject"]').fill(str(site.bob.id))
    form.locator('select[name="key"]').select_option("queued_jobs")
    form.locator('input[name="value"]').fill("lots")
    form.locator("button").click()
    assert "Not saved" in owner.inner_text("main") and "queued_jobs takes a whole number" in owner.inner_text(
        "main"
    )
    owner.goto(base + "/admin")
    form.locator('select[name="scope"]').select_option("member")
    form.locator('input[name="subject"]').fill(str(site.bob.id))
    form.locator('select[name="key"]').select_option("queued_jobs")
    form.locator('input[name="value"]').fill("7")
    form.locator("button").click()
    owner.wait_for_url(lambda url: url.endswith("done=quota"))
    assert store.quota_overrides(site.db, "member", [str(site.bob.id)]) == {
        str(site.bob.id): {"queued_jobs": 7.0}
    }
    site.shot(owner, "admin")

    owner.once("dialog", lambda d: d.accept())
    owner.locator(f'#running tr[data-job="{job.id}"] button', has_text="Cancel").click()
    owner.wait_for_url(lambda url: url.endswith("done=cancelled"))
    site.wait(lambda: store.get_job(site.db, job.id).state == "cancelled", 60, "the cancel")
    actions = store.admin_actions(site.db)
    assert [(a["who"], a["via"], a["action"]) for a in actions[:2]] == [
        (str(site.mod.id), "web", "cancel"),
        (str(site.mod.id), "web", "quota"),
    ]
    # The member's page stops its live box and says how it ended, without a reload.
    member.wait_for_function(
        "() => document.querySelector('[data-live=text]').textContent.startsWith('cancelled')", timeout=30000
    )
    assert site.wait(lambda: site.thread_says(tid, "was cancelled"), 30, "the thread's word")

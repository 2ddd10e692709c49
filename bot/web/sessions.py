"""Who is looking at a page: signed login links from the bot open a session for one member.

No passwords and no Discord OAuth: the bot hands a member (or, on the CLI, the owner) a link
``/login?m=<member>&a=<0|1>&next=<page>&exp=<unix time>&sig=<mac>`` that works for ``[web]
login_minutes``. Opening it stores a random session token's SHA-256 in the store and the token in
an HttpOnly, SameSite=Lax cookie (Lax: the link is opened from Discord, another site) for ``[web]
session_hours``. ``a=1`` (the member has Discord's Manage Server, as ``/admin`` asks) opens the
admin pages too. Every form carries the session's CSRF token, and a POST whose token or Origin does
not match is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from base64 import urlsafe_b64encode
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from sqlite_utils import Database

from .. import store
from .links import LinkError, Links

COOKIE = "loracord_session"
_BAD_LINK = "this sign-in link is not valid (it was changed or cut short); ask the bot for a new one"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Logins:
    """Signs and checks login links with a key of their own, derived from the link secret, so a
    download link's signature is never a login's."""

    def __init__(self, links: Links, login_s: float, session_s: float):
        self.links = links
        self._key = hmac.new(links.secret, b"loracord web login", hashlib.sha256).digest()
        self.login_s, self.session_s = login_s, session_s

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"Logins(base_url={self.links.base_url!r})"

    def _mac(self, member: str, admin: bool, next_: str, expires: int) -> str:
        text = f"{member}\n{int(admin)}\n{next_}\n{expires}".encode()
        return urlsafe_b64encode(hmac.new(self._key, text, hashlib.sha256).digest()).rstrip(b"=").decode()

    def link(
        self, member: str, admin: bool = False, next_: str = "/", expires_at: float | None = None
    ) -> str:
        """A link that signs ``member`` in (with the admin pages when ``admin``) and opens ``next_``."""
        if not next_.startswith("/") or next_.startswith("//"):
            raise ValueError(f"'{next_}' is not a page of this site")
        expires = int(expires_at if expires_at is not None else time.time() + self.login_s)
        query = {"m": member, "a": int(admin), "next": next_, "exp": expires}
        query["sig"] = self._mac(member, admin, next_, expires)
        return f"{self.links.base_url}/login?{urlencode(query)}"

    def verify(self, query: dict[str, str]) -> tuple[str, bool, str]:
        """(member, admin, next page) of a login link; LinkError when changed or expired."""
        member, admin, next_ = query.get("m", ""), query.get("a") == "1", query.get("next", "/")
        try:
            expires = int(query.get("exp", ""))
        except ValueError:
            raise LinkError(_BAD_LINK) from None
        expected = self._mac(member, admin, next_, expires)
        if not member or not hmac.compare_digest(expected.encode(), query.get("sig", "").encode()):
            raise LinkError(_BAD_LINK)
        if expires < time.time():
            raise LinkError(
                "this sign-in link has expired; ask the bot for a new one (/loras → Open in browser)"
            )
        if not next_.startswith("/") or next_.startswith("//"):
            raise LinkError(_BAD_LINK)
        return member, admin, next_

    def open_session(self, db: Database, member: str, admin: bool) -> tuple[str, store.WebSession]:
        """A new session: (the cookie's token, what the store keeps of it)."""
        token = secrets.token_urlsafe(32)
        session = store.WebSession(member, admin, secrets.token_urlsafe(24), time.time() + self.session_s)
        store.add_session(db, _hash(token), session)
        return token, session


def session_of(db: Database, request: web.Request) -> store.WebSession | None:
    token = request.cookies.get(COOKIE)
    return store.get_session(db, _hash(token)) if token else None


def end_session(db: Database, request: web.Request) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        store.delete_session(db, _hash(token))


def same_origin(request: web.Request, public_url: str | None) -> bool:
    """A form posted from this site: browsers send Origin on every POST; one from another site
    (or from a page that is not ours) does not match the address the member reached us at."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser's cross-site request (browsers always send it on POST)
    allowed = {f"{request.scheme}://{request.host}"}
    if public_url:
        parts = urlsplit(public_url)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin in allowed

"""Signed, expiring links to files of the data folder: ``/files/<path>?exp=<unix time>&sig=<mac>``,
where the MAC is HMAC-SHA256 over the path and the expiry with a secret from ``[web] secret_file``
or, unset, one generated once into the data folder. A changed or expired link is refused (403), a
file that is gone is 404; hidden files, ``..`` and symlinks that leave the data folder are never
served. The same secret signs the web pages' login links (``bot.web.sessions``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from base64 import urlsafe_b64encode
from email.utils import encode_rfc2231
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from ..config import Config, ConfigError

SECRET_FILE = ".web-secret"  # hidden, so no link can ever serve it
_NOT_VALID = "this link is not valid (it was changed or cut short); ask the bot for a new one"
_UNSAFE_FALLBACK = re.compile(r'[^\x20-\x7e]|["\\]')


def local_url(host: str, port: int) -> str:
    """Where this server is reached when ``[web] public_url`` is unset (a wildcard address is
    listened on, not reached: links then point at this machine)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


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

"""The bot's web side: pages for members and the owner, signed download links, /healthz, /metrics."""

from .links import SECRET_FILE, LinkError, Links, content_disposition, load_secret
from .metrics import Metrics
from .server import WebServer

__all__ = ["SECRET_FILE", "LinkError", "Links", "Metrics", "WebServer", "content_disposition", "load_secret"]

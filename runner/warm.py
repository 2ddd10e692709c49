"""What a worker imports before its first training or generation job, in one place: the template
that CPU workers fork from (``runner/template.py``) imports it once. It only imports: nothing here
may run a kernel or start a thread, which a forked child could not use.
"""

from __future__ import annotations

from .gen import generate, pipelines  # noqa: F401
from .train import loop  # noqa: F401

"""What a worker imports before its first training or generation job, in one place.

torch, diffusers, transformers and peft take about ten seconds to import on a small CPU. The bot
imports this module once in a template process and forks each CPU worker from it
(``bot/dispatch/local.py``), so a worker (a new one, or one started again after it died) is ready
in a fraction of a second. It only imports: nothing here may run a kernel or start a thread, which
a forked child could not use.
"""

from __future__ import annotations

from .gen import generate, pipelines  # noqa: F401
from .train import loop  # noqa: F401

"""An image decoder that dies in native code (a segfault) on a member's file, for the fault tests.

A module of its own, importing only the standard library: the intake's child process imports it to
run it, and should not have to import the bot and its tests for that."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any


def build_dataset(spec: Any) -> None:
    if multiprocessing.parent_process() is None:
        raise AssertionError("images were decoded inside the bot's own process")
    os.kill(os.getpid(), signal.SIGSEGV)

"""Every job ends in exactly one event: how a job's exceptions become `done` or `failed`.

Training and generation run in a warm worker that must outlive any one job, and members need a
reason they can act on, so this mapping lives in one place.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .spec import FailedEvent

T = TypeVar("T")


class Cancelled(Exception):
    """Raised at the job's next safe point (a step, an image) once its cancel event is set."""


class JobFailed(Exception):
    """A failure the job itself explains (e.g. a NaN loss), reported with that explanation."""


def run_to_event(
    job: Callable[[], T],
    emit: Callable[[Any], None],
    *,
    bad_input: tuple[type[Exception], ...],
    cancelled: str,
    out_of_memory: Callable[[], str],
) -> T | FailedEvent:
    """Run ``job``; emit and return its result, or the failed event that says why it ended."""
    try:
        result: T | FailedEvent = job()
    except bad_input as e:
        result = FailedEvent(kind="bad_input", reason=str(e))
    except Cancelled:
        result = FailedEvent(kind="cancelled", reason=cancelled)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        result = FailedEvent(kind="out_of_memory", reason="the GPU ran out of memory: " + out_of_memory())
    except JobFailed as e:
        result = FailedEvent(kind="error", reason=str(e))
    except Exception as e:  # the worker must outlive any one job; the log keeps the traceback
        traceback.print_exc(file=sys.stderr)
        result = FailedEvent(kind="error", reason=f"{type(e).__name__}: {e}")
    emit(result)
    return result

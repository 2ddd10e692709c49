"""One worker owns one GPU and runs one job at a time, streaming Events as JSON lines.

Run as ``python -m runner.worker``: each line on stdin is a job (``{"type": "train", "spec":
{...}}``) or ``{"type": "cancel"}``; each line on stdout is an Event. The same `Worker` class is
what a Ray actor wraps later, so it keeps no global state.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from .spec import FailedEvent, SpecError, TrainSpec


class Worker:
    def __init__(self, device: str | None = None):
        self.device = device
        self.cancel_event = threading.Event()

    def cancel(self) -> None:
        self.cancel_event.set()

    def run(self, job: dict[str, Any], emit: Callable[[Any], None]) -> Any:
        """Run one job to its end; returns the final event (done or failed)."""
        self.cancel_event.clear()
        kind = job.get("type")
        if kind != "train":
            event = FailedEvent(
                kind="bad_input", reason=f"unknown job type {kind!r}; this worker runs: train"
            )
            emit(event)
            return event
        try:
            spec = TrainSpec.parse(job.get("spec") or {})
        except SpecError as e:
            event = FailedEvent(kind="bad_input", reason=str(e))
            emit(event)
            return event
        from .train import train  # torch loads only when there is work to do

        return train(spec, emit, self.cancel_event, self.device)


def serve(stdin: TextIO, stdout: TextIO, device: str | None = None) -> None:
    worker = Worker(device)
    lock = threading.Lock()

    def emit(event: Any) -> None:
        with lock:
            stdout.write(event.model_dump_json() + "\n")
            stdout.flush()

    def on_signal(*_: Any) -> None:
        worker.cancel()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
    job_thread: threading.Thread | None = None
    for line in stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            emit(FailedEvent(kind="bad_input", reason=f"not a JSON job line: {e}"))
            continue
        if msg.get("type") == "cancel":
            worker.cancel()
            continue
        if job_thread and job_thread.is_alive():
            emit(FailedEvent(kind="bad_input", reason="this worker is busy with another job"))
            continue
        # The job runs beside the stdin loop so that a cancel line is read while it trains.
        job_thread = threading.Thread(target=worker.run, args=(msg, emit), daemon=True)
        job_thread.start()
    if job_thread:
        job_thread.join()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout, sys.argv[1] if len(sys.argv) > 1 else None)

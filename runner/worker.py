"""One worker owns one GPU and runs one job at a time, streaming Events as JSON lines.

Run as ``python -m runner.worker``: each line on stdin is a job (``{"type": "train", "spec":
{...}}``) or ``{"type": "cancel"}``; each line on stdout is an Event. A job line may carry an
``"id"``: its events then carry the same ``"job"``, and ``{"type": "cancel", "id": …}`` cancels
only that job. A short job (anything but training) that arrives while a training job runs is
served between two training steps on the same warm worker. The same `Worker` class is what a
Ray actor wraps, so it keeps no global state.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .spec import EpochEvent, FailedEvent, GenSpec, ProgressEvent, SpecError, TagSpec, TrainSpec


@dataclass
class _Handover:
    """A short job waiting for the training thread to run it between two steps."""

    job: dict[str, Any]
    emit: Callable[[Any], None]
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)  # its own: not the trainer's
    result: Any = None


class Worker:
    def __init__(self, device: str | None = None):
        self.device = device
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self.training = False
        self._training_id: Any = None
        self._waiting: list[_Handover] = []
        self._serving: _Handover | None = None
        self.pipelines: Any = None  # a PipelineCache once the first gen job arrives (it imports torch)

    def generate(
        self, spec: GenSpec, emit: Callable[[Any], None], cancel: threading.Event | None = None
    ) -> Any:
        """One gen job on this worker's warm pipelines; returns (and emits) ImagesEvent or FailedEvent."""
        from .generate import run_gen
        from .pipelines import PipelineCache

        if self.pipelines is None:
            self.pipelines = PipelineCache(self.device)
        return run_gen(spec, self.pipelines, emit, cancel or self.cancel_event)

    def cancel(self, job_id: Any = None) -> None:
        """Cancel the running job, or only job ``job_id`` (dropped if it still waits for a step)."""
        with self._lock:
            waiting = [h for h in self._waiting if job_id is not None and h.job.get("id") == job_id]
            for h in waiting:
                self._waiting.remove(h)
            serving = self._serving
        for h in waiting:
            h.result = FailedEvent(kind="cancelled", reason="cancelled before it started")
            h.emit(h.result)
            h.done.set()
        if waiting:
            return
        if serving is not None and (job_id is None or serving.job.get("id") == job_id):
            serving.cancel.set()
            if job_id is not None:
                return
        if job_id is None or not self.training or job_id == self._training_id:
            self.cancel_event.set()

    def run(self, job: dict[str, Any], emit: Callable[[Any], None]) -> Any:
        """Run one job to its end; returns the final event (done or failed)."""
        if job.get("type") != "train":
            with self._lock:
                handover = _Handover(job, emit) if self.training else None
                if handover:
                    self._waiting.append(handover)
            if handover:
                handover.done.wait()
                return handover.result
        self.cancel_event.clear()
        if job.get("type") != "train":
            return self._run(job, emit)
        with self._lock:
            self.training, self._training_id = True, job.get("id")
        try:
            return self._run(job, self._serving_between_steps(emit))
        finally:
            with self._lock:
                self.training = False
            self._serve_waiting()  # whatever was handed over after the last step

    def _serving_between_steps(self, emit: Callable[[Any], None]) -> Callable[[Any], None]:
        # The trainer emits progress right after an optimizer step and an epoch after saving: the
        # model is between steps then, so a short job can use the same warm GPU.
        def emit_and_serve(event: Any) -> None:
            emit(event)
            if isinstance(event, ProgressEvent | EpochEvent):
                self._serve_waiting()

        return emit_and_serve

    def _serve_waiting(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                handover = self._waiting.pop(0)
                self._serving = handover
            try:
                handover.result = self._run(handover.job, handover.emit, handover.cancel)
            finally:
                with self._lock:
                    self._serving = None
                handover.done.set()

    def _run(
        self, job: dict[str, Any], emit: Callable[[Any], None], cancel: threading.Event | None = None
    ) -> Any:
        cancel = cancel or self.cancel_event
        kind = job.get("type")
        specs: dict[str, type[TrainSpec | GenSpec | TagSpec]] = {
            "train": TrainSpec,
            "gen": GenSpec,
            "tag": TagSpec,
        }
        if kind not in specs:
            event = FailedEvent(
                kind="bad_input", reason=f"unknown job type {kind!r}; this worker runs: {', '.join(specs)}"
            )
            emit(event)
            return event
        try:
            spec = specs[kind].parse(job.get("spec") or {})
        except SpecError as e:
            event = FailedEvent(kind="bad_input", reason=str(e))
            emit(event)
            return event
        if isinstance(spec, GenSpec):
            return self.generate(spec, emit, cancel)
        if isinstance(spec, TagSpec):
            from .tagger import tag_dataset  # onnxruntime loads only for a tag job

            return tag_dataset(spec, emit, cancel)
        from .train import train  # torch loads only when there is work to do

        return train(spec, emit, cancel, self.device)


def _run_after(
    previous: threading.Thread | None, worker: Worker, job: dict[str, Any], emit: Callable[[Any], None]
) -> None:
    if previous is not None:
        previous.join()
    worker.run(job, emit)


def serve(stdin: TextIO, stdout: TextIO, device: str | None = None) -> None:
    worker = Worker(device)
    lock = threading.Lock()

    def emit_for(job_id: Any) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            line = (
                event.model_dump_json()
                if job_id is None
                else json.dumps({"job": job_id, **event.model_dump(mode="json")}, ensure_ascii=False)
            )
            with lock:
                stdout.write(line + "\n")
                stdout.flush()

        return emit

    emit = emit_for(None)

    def on_signal(*_: Any) -> None:
        worker.cancel()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
    job_thread: threading.Thread | None = None
    threads: list[threading.Thread] = []
    for line in stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError as e:
            emit(FailedEvent(kind="bad_input", reason=f"not a JSON job line: {e}"))
            continue
        if msg.get("type") == "cancel":
            worker.cancel(msg.get("id"))
            continue
        short = msg.get("type") != "train"
        between = short and worker.training and job_thread is not None and job_thread.is_alive()
        # A job that arrives while another runs waits for it (its final event may be out while its
        # thread is still returning); a short one on a training worker goes between steps instead.
        previous = None if between or not job_thread or not job_thread.is_alive() else job_thread
        # The job runs beside the stdin loop so that a cancel line is read while it trains.
        thread = threading.Thread(
            target=_run_after, args=(previous, worker, msg, emit_for(msg.get("id"))), daemon=True
        )
        thread.start()
        threads = [t for t in threads if t.is_alive()] + [thread]
        if not between:
            job_thread = thread
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout, sys.argv[1] if len(sys.argv) > 1 else None)

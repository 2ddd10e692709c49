"""One worker owns one GPU and runs one job at a time, streaming Events as JSON lines.

Run as ``python -m runner.worker``: each line on stdin is a job (``{"type": "train", "spec":
{...}}``) or ``{"type": "cancel"}``; each line on stdout is an Event. A job line may carry an
``"id"``: its events then carry the same ``"job"``, and ``{"type": "cancel", "id": …}`` cancels
only that job. A short job (anything but training) that arrives while a training job runs is
served between two training steps on the same warm worker. The same `Worker` class is what a
Ray actor wraps, so it keeps no global state.

Every job ends in exactly one final event (done, images, tagged, captioned or failed), whatever it or the
worker's own preparation raises, stamped with the job's own compute time (`runner.spec`
``seconds``); a short job that fails between training steps fails alone.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .spec import (
    FINAL,
    CaptionSpec,
    EpochEvent,
    FailedEvent,
    GenSpec,
    GridSpec,
    ProgressEvent,
    SpecError,
    TagSpec,
    TrainSpec,
)


@dataclass
class _Handover:
    """A short job waiting for the training thread to run it between two steps."""

    job: dict[str, Any]
    emit: Callable[[Any], None]
    cancel: threading.Event  # its own: not the trainer's
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


class _JobEvents:
    """One job's way out: stamps its final event with the job's own compute time and lets only
    one final event through, so the guard in `Worker._run` can end any job that did not end itself."""

    def __init__(self, emit: Callable[[Any], None], own_seconds: Callable[[], float]):
        self.emit, self.own_seconds = emit, own_seconds
        self.final: Any = None

    def __call__(self, event: Any) -> None:
        if event.type in FINAL:
            if self.final is not None:
                return
            event = event.model_copy(update={"seconds": round(self.own_seconds(), 3)})
            self.final = event
        self.emit(event)


class Worker:
    def __init__(self, device: str | None = None):
        self.device = device
        self._lock = threading.Lock()
        # One cancel event per job id, made by whichever comes first, the job or its cancel: a
        # cancel that reaches the worker before its job starts is then still there when it does.
        self._cancels: dict[Any, threading.Event] = {}
        self.training = False
        self._lent = 0.0  # seconds the training job's thread spent serving short jobs
        self._waiting: list[_Handover] = []
        self.pipelines: Any = (
            None  # a PipelineCache once the first gen or grid job arrives (it imports torch)
        )

    def _warm_pipelines(self) -> Any:
        from .gen.pipelines import PipelineCache, worker_settings

        if self.pipelines is None:
            self.pipelines = PipelineCache(self.device, **worker_settings())
        return self.pipelines

    def generate(self, spec: GenSpec, emit: Callable[[Any], None], cancel: threading.Event) -> Any:
        """One gen job on this worker's warm pipelines; returns (and emits) ImagesEvent or FailedEvent."""
        from .gen.generate import run_gen

        return run_gen(spec, self._warm_pipelines(), emit, cancel)

    def grid(self, spec: GridSpec, emit: Callable[[Any], None], cancel: threading.Event) -> Any:
        """One grid job on the same warm pipelines as gen jobs (the epochs are hot-swapped LoRAs)."""
        from .gen.generate import run_grid

        return run_grid(spec, self._warm_pipelines(), emit, cancel)

    def _cancel_event(self, job_id: Any) -> threading.Event:
        with self._lock:
            return self._cancels.setdefault(job_id, threading.Event())

    def cancel(self, job_id: Any = None) -> None:
        """Cancel job ``job_id`` (whether it runs, waits for a step, or has not arrived yet), or
        every job this worker has when ``job_id`` is None."""
        with self._lock:
            if job_id is None:
                events = list(self._cancels.values())
            else:
                events = [self._cancels.setdefault(job_id, threading.Event())]
            waiting = [h for h in self._waiting if job_id is None or h.job.get("id") == job_id]
            for h in waiting:
                self._waiting.remove(h)
        for event in events:
            event.set()
        for h in waiting:  # answered now rather than at the trainer's next step
            h.result = self._run(h.job, h.emit, h.cancel)
            h.done.set()

    def run(self, job: dict[str, Any], emit: Callable[[Any], None]) -> Any:
        """Run one job to its end; returns the final event (done or failed), which was also emitted."""
        job_id = job.get("id")
        cancel = self._cancel_event(job_id)
        try:
            if job.get("type") != "train":
                with self._lock:
                    handover = _Handover(job, emit, cancel) if self.training else None
                    if handover:
                        self._waiting.append(handover)
                if handover:
                    handover.done.wait()
                    return handover.result
                return self._run(job, emit, cancel)
            with self._lock:
                self.training, self._lent = True, 0.0
            try:
                return self._run(job, self._serving_between_steps(emit), cancel, lent=lambda: self._lent)
            finally:
                with self._lock:
                    self.training = False
                self._serve_waiting()  # whatever was handed over after the last step
        finally:
            with self._lock:
                self._cancels.pop(job_id, None)

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
            started = time.monotonic()
            # `_run` never raises: a short job that fails ends alone and the trainer goes on.
            handover.result = self._run(handover.job, handover.emit, handover.cancel)
            self._lent += time.monotonic() - started
            handover.done.set()

    def _run(
        self,
        job: dict[str, Any],
        emit: Callable[[Any], None],
        cancel: threading.Event,
        lent: Callable[[], float] = lambda: 0.0,
    ) -> Any:
        """The job's final event, emitted exactly once whatever the job (or its imports) raises."""
        started = time.monotonic()
        events = _JobEvents(emit, lambda: time.monotonic() - started - lent())
        try:
            self._dispatch(job, events, cancel)
        except Exception as e:  # the worker outlives any job; the log keeps the traceback
            traceback.print_exc(file=sys.stderr)
            events(FailedEvent(kind="error", reason=f"{type(e).__name__}: {e}"))
        if events.final is None:
            events(FailedEvent(kind="error", reason="the job ended without a result"))
        return events.final

    def _dispatch(self, job: dict[str, Any], emit: Callable[[Any], None], cancel: threading.Event) -> None:
        kind = job.get("type")
        specs: dict[str, type[TrainSpec | GenSpec | GridSpec | TagSpec | CaptionSpec]] = {
            "train": TrainSpec,
            "gen": GenSpec,
            "grid": GridSpec,
            "tag": TagSpec,
            "caption": CaptionSpec,
        }
        if kind not in specs:
            emit(
                FailedEvent(
                    kind="bad_input",
                    reason=f"unknown job type {kind!r}; this worker runs: {', '.join(specs)}",
                )
            )
            return
        try:
            spec = specs[kind].parse(job.get("spec") or {})
        except SpecError as e:
            emit(FailedEvent(kind="bad_input", reason=str(e)))
            return
        if cancel.is_set():
            emit(FailedEvent(kind="cancelled", reason="cancelled before it started"))
        elif isinstance(spec, GenSpec):
            self.generate(spec, emit, cancel)
        elif isinstance(spec, GridSpec):
            self.grid(spec, emit, cancel)
        elif isinstance(spec, TagSpec):
            from .data.tagger import tag_dataset  # onnxruntime loads only for a tag job

            tag_dataset(spec, emit, cancel)
        elif isinstance(spec, CaptionSpec):
            from .data.captioner import caption_dataset  # transformers' Florence-2 loads only here

            caption_dataset(spec, emit, cancel, self.device)
        else:
            from .train.loop import train  # torch loads only when there is work to do

            train(spec, emit, cancel, self.device)


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
        if not isinstance(msg, dict):
            emit(
                FailedEvent(kind="bad_input", reason=f"a job line is a JSON object, not {line.strip()[:80]}")
            )
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
    events_out = sys.stdout
    sys.stdout = sys.stderr  # a library's print() goes to the log, not into the event stream
    serve(sys.stdin, events_out, sys.argv[1] if len(sys.argv) > 1 else None)

"""``/metrics``: the store's queue and jobs, GPU time, workers and Discord ack latency for Prometheus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlite_utils import Database

from .. import store

if TYPE_CHECKING:
    from ..scheduler import Scheduler

ACK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)  # Discord's limit is 3 s


class _StoreCollector(Collector):
    """Reads the store (and the scheduler's workers) at scrape time, so numbers are never stale."""

    def __init__(self, db: Database, scheduler: Scheduler | None):
        self.db, self.scheduler = db, scheduler

    def collect(self) -> Any:
        counts = store.job_counts(self.db)
        kinds = sorted({kind for kind, _ in counts})
        states = dict.fromkeys([*store.STATES, *(state for _, state in counts)])
        queue = GaugeMetricFamily("loracord_queue_length", "Jobs waiting to start, by kind", labels=["kind"])
        jobs = GaugeMetricFamily(
            "loracord_jobs", "Jobs in the store by kind and state", labels=["kind", "state"]
        )
        for kind in kinds:
            queue.add_metric([kind], counts.get((kind, "queued"), 0))
            for state in states:
                jobs.add_metric([kind, state], counts.get((kind, state), 0))
        yield queue
        yield jobs
        used = sum(store.gpu_seconds_since(self.db, 0).values())
        yield CounterMetricFamily("loracord_gpu_seconds", "GPU seconds charged for jobs", value=used)
        if self.scheduler is not None:
            dispatcher = self.scheduler.dispatcher
            up = GaugeMetricFamily("loracord_worker_up", "1 while a worker can take jobs", labels=["worker"])
            for worker in dispatcher.workers:
                up.add_metric([worker], float(dispatcher.ready(worker)))
            yield up
            yield CounterMetricFamily(
                "loracord_worker_restarts",
                "Workers that died and were restarted",
                value=self.scheduler.restarts,
            )


class Metrics:
    """The Prometheus registry of one bot process."""

    def __init__(self, db: Database, scheduler: Scheduler | None = None):
        self.registry = CollectorRegistry()
        self._ack = Histogram(
            "loracord_interaction_ack_seconds",
            "Time from a Discord interaction's creation to its acknowledgement",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(db, scheduler))

    def observe_ack(self, seconds: float) -> None:
        """Record how long one interaction took to be acknowledged (the Discord layer calls this)."""
        self._ack.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

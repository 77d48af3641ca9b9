"""Prometheus metrics for one process: counters read from the runtime state at scrape
time (no cost on the hot path) and two histograms observed per turn."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .observe import QueueSnapshot
from .state import RuntimeState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "claimed": ("spectral_claims", "Rows claimed."),
    "acked": ("spectral_acks", "Rows acknowledged DONE."),
    "retried": ("spectral_retries", "Failed turns rescheduled."),
    "dead": ("spectral_dead_letters", "Rows that became DEAD."),
    "released": ("spectral_releases", "Claimed rows given back without running to the end."),
    "reaped": ("spectral_reaped", "Rows whose claim lapsed, returned by this reaper."),
    "lost_claims": ("spectral_lost_claims", "Acknowledgements ignored because the claim was lost."),
    "reconnects": ("spectral_reconnects", "Times a consumer lost the database."),
    "notifications": ("spectral_notifications", "NOTIFY wake-ups received."),
}

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _StateCollector(Collector):
    def __init__(self, state: RuntimeState, snapshot: QueueSnapshot | None) -> None:
        self._state = state
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._state
        for attr, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc)
            family.add_metric([], getattr(s.counters, attr))
            yield family
        in_flight = GaugeMetricFamily("spectral_turns_in_flight", "Handler turns running now.")
        in_flight.add_metric([], len(s.in_flight))
        yield in_flight
        mode = GaugeMetricFamily("spectral_listener_mode", "1 for the listener's current mode.",
                                 labels=["mode"])
        for name in ("notify", "poll-only", "starting"):
            mode.add_metric([name], 1 if s.listener_mode == name else 0)
        yield mode
        draining = GaugeMetricFamily("spectral_draining", "1 once a drain has begun.")
        draining.add_metric([], 1 if s.draining.is_set() else 0)
        yield draining
        generation = GaugeMetricFamily("spectral_generation", "The generation this process runs.")
        generation.add_metric([], s.generation)
        yield generation
        if self._snapshot is not None and self._snapshot.data:
            depth = GaugeMetricFamily("spectral_queue_depth", "Outbox rows by generation and status.",
                                      labels=["generation", "status"])
            for row in self._snapshot.data["outbox"]:
                depth.add_metric([str(row["generation"]), row["status"]], row["count"])
            yield depth
            blocked = GaugeMetricFamily("spectral_blocked_keys",
                                        "Ordering keys held by a DEAD event (requeue or skip it).")
            blocked.add_metric([], self._snapshot.data["blocked_keys"]["count"])
            yield blocked
            oldest = GaugeMetricFamily(
                "spectral_oldest_due_age_seconds",
                "Age of the oldest due PENDING event, by generation (0 when none is due).",
                labels=["generation"])
            for gen, age in self._snapshot.data["oldest_due"].items():
                oldest.add_metric([str(gen)], age)
            yield oldest


class Metrics:
    """One registry per process (tests run several runtimes in one interpreter)."""

    def __init__(self, state: RuntimeState, snapshot: QueueSnapshot | None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.turn_seconds = Histogram(
            "spectral_turn_duration_seconds", "Wall time of one turn (all its handlers).",
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.latency_seconds = Histogram(
            "spectral_commit_to_handled_seconds",
            "From an event becoming due (its commit, or available_at) to its turn's end.",
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.topic_latency_seconds = Histogram(
            "spectral_commit_to_handled_by_topic_seconds",
            "From an event becoming due (its commit, or available_at) to its turn's end, per topic.",
            labelnames=["topic"], buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.registry.register(_StateCollector(state, snapshot))
        state.turn_observer = self.observe_turn
        state.topic_observer = self.observe_topic

    def observe_turn(self, duration: float, latency: float) -> None:
        self.turn_seconds.observe(duration)
        self.latency_seconds.observe(latency)

    def observe_topic(self, topic: str, latency: float) -> None:
        self.topic_latency_seconds.labels(topic).observe(latency)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

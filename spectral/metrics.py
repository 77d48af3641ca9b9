"""Prometheus metrics for one process: counters read from the runtime state at scrape
time (no cost on the hot path) and two histograms observed per turn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        yield from _prune_metrics(s.prune)
        if self._snapshot is not None and self._snapshot.data:
            depth = GaugeMetricFamily(
                "spectral_queue_depth",
                "Unfinished outbox rows (PENDING, CLAIMED, DEAD) by generation and status.",
                labels=["generation", "status"])
            counts = {(str(r["generation"]), r["status"]): r["count"]
                      for r in self._snapshot.data["outbox"]}
            # This process's generation always has its three series, zero when empty, so a
            # drained queue reads 0 instead of a series that vanished.
            for status in ("PENDING", "CLAIMED", "DEAD"):
                counts.setdefault((str(s.generation), status), 0)
            for (gen, status), n in sorted(counts.items()):
                depth.add_metric([gen, status], n)
            yield depth
            yield from _health_metrics(self._snapshot.data.get("health"))


def _prune_metrics(prune: dict[str, Any] | None) -> Iterator[Metric]:
    if prune is None:
        return
    pruned = CounterMetricFamily("spectral_pruned", "Rows deleted by this process's pruner.",
                                 labels=["kind"])
    for kind, n in prune["pruned_total"].items():
        pruned.add_metric([kind], n)
    yield pruned
    passes = CounterMetricFamily("spectral_prune_passes", "Prune passes run by this process.")
    passes.add_metric([], prune["passes"])
    yield passes
    failures = CounterMetricFamily("spectral_prune_failures",
                                   "Prune passes here that failed or reported an error.")
    failures.add_metric([], prune["failures"])
    yield failures
    last = prune.get("last_pass_here")
    if last is not None:
        duration = GaugeMetricFamily("spectral_prune_last_pass_seconds",
                                     "Duration of this process's last prune pass.")
        duration.add_metric([], last["duration_seconds"])
        yield duration


def _health_metrics(health: dict[str, Any] | None) -> Iterator[Metric]:
    if health is None:
        return
    families = {
        key: GaugeMetricFamily(name, doc, labels=["table"])
        for key, name, doc in (
            ("live_tuples", "spectral_table_live_tuples", "Live tuples (statistics estimate)."),
            ("dead_tuples", "spectral_table_dead_tuples", "Dead tuples waiting for vacuum."),
            ("total_bytes", "spectral_table_bytes", "Size with indexes and TOAST, in bytes."),
        )
    }
    for table in health["tables"]:
        for key, family in families.items():
            family.add_metric([table["table"]], table[key])
    yield from families.values()
    horizon = health["xmin_horizon"]
    age = GaugeMetricFamily(
        "spectral_xmin_horizon_age_seconds",
        "Age of the oldest transaction of another session of this database (0: none).")
    age.add_metric([], horizon["oldest_xact_seconds"] or 0.0)
    yield age
    slot = GaugeMetricFamily("spectral_replication_slot_xmin_age",
                             "Transactions the oldest replication slot's xmin is behind (0: none).")
    slot.add_metric([], horizon["slot_xid_age"] or 0)
    yield slot
    if health["done_estimate"] is not None:
        done = GaugeMetricFamily("spectral_outbox_done_estimate",
                                 "DONE rows in core.outbox, estimated from the statistics.")
        done.add_metric([], health["done_estimate"])
        yield done
    ok = GaugeMetricFamily(
        "spectral_health_ok",
        "1 when the check passes: xmin_horizon, or a table's dead tuples (outbox, event_handled).",
        labels=["check"])
    for verdict in health["verdicts"]:
        ok.add_metric([verdict["check"]], 1 if verdict["ok"] else 0)
    yield ok


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
        self.registry.register(_StateCollector(state, snapshot))
        state.turn_observer = self.observe_turn

    def observe_turn(self, duration: float, latency: float) -> None:
        self.turn_seconds.observe(duration)
        self.latency_seconds.observe(latency)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

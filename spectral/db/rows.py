"""The rows typed Store methods return, as TypedDicts: plain dicts at run time (they
print as JSON unchanged), checked key by key by mypy where they are read."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypedDict

#: What the pruner deletes, each a named block of prune.sql.
PruneKind = Literal["done", "dead", "workers", "reconcile_passes", "prune_passes", "handovers"]


class NewDeployment(TypedDict):
    """A generation just allocated (deployments.sql: allocate_generation)."""

    generation: int
    reference: str
    deployed_at: datetime
    deployed_by: str | None
    tag: str | None


class Deployment(NewDeployment):
    """A row of core.deployments (deployments.sql: latest_deployments)."""

    retired_at: datetime | None


class Worker(TypedDict):
    """A row of core.workers with its staleness (workers.sql: list_workers)."""

    worker_id: str
    generation: int
    environment: str
    service: str
    state: str
    last_seen: datetime
    started_at: datetime
    stale: bool


class LiveCount(TypedDict):
    """Unfinished rows of one generation and status (observe.sql: live_counts)."""

    generation: int
    status: str
    n: int


class ReconcilePass(TypedDict):
    """The newest reconcile pass, its jsonb decoded (reconcile.sql: last_pass)."""

    id: int
    worker_id: str
    generation: int
    started_at: datetime
    finished_at: datetime | None
    unblocked: dict[str, int]
    errors: list[str]


class PrunePass(TypedDict):
    """The newest finished prune pass, its jsonb decoded (prune.sql: last_pass)."""

    id: int
    worker_id: str
    started_at: datetime
    finished_at: datetime
    pruned: dict[str, Any]
    errors: list[str]

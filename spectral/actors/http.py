"""The HTTP server actor: hypercorn + quart-trio in the supervisor's nursery.

Endpoints: /health, /ready, /version, /version/detail (bearer token), /queue, /metrics,
and the dashboard under /ui when a token is configured (:mod:`spectral.ui`).
Health and version serve in-memory state; /ready, /queue and /metrics read a snapshot
refreshed at most every couple of seconds, never one query per request.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import time
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)
from quart import Response, request
from quart_trio import QuartTrio

from ..metrics import CONTENT_TYPE, Metrics
from ..observe import QueueSnapshot
from ..state import RuntimeState
from ..version import VersionInfo

log = logging.getLogger("spectral.http")

#: Request limits: a small body cap and header size, short read and keep-alive timeouts.
MAX_BODY_BYTES = 16 * 1024
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT = 10
KEEP_ALIVE_TIMEOUT = 5
KEEP_ALIVE_MAX_REQUESTS = 1000

_HEALTH_OK = json.dumps({"status": "ok"}).encode()
_HEALTH_DRAINING = json.dumps({"status": "draining"}).encode()

_QUERY_TOKEN_NAMES = ("token", "access_token", "auth", "bearer")


class HttpServer:
    """Serves the operator endpoints until the workers have drained.

    Drain: /health answers 503 ``{"status": "draining"}`` from the first signal; the
    server stops accepting once ``state.stopped`` is set (workers done) and gives
    in-flight requests what is left of the drain budget.
    """

    def __init__(
        self, *, state: RuntimeState, snapshot: QueueSnapshot, metrics: Metrics,
        version: VersionInfo, service: str, environment: str, deployed_at: str | None,
        detail_token: str | None, host: str, port: int, drain_budget: float,
        workers: bool, schema_version: int, listen_enabled: bool = True,
        dashboard_store: Any = None, ui_session_ttl: float = 3600.0, stale_after: float = 60.0,
        ops_host: str = "127.0.0.1", ops_port: int | None = None,
        ops_token_required: bool = False,
    ) -> None:
        self._state = state
        self._snapshot = snapshot
        self._metrics = metrics
        self._version = version
        self._service = service
        self._environment = environment
        self._deployed_at = deployed_at
        self._token = detail_token
        self._host = host
        self._port = port
        self._drain_budget = drain_budget
        self._workers = workers
        # With SPECTRAL_LISTEN_ENABLED=false, poll-only is the intended mode, not a failure.
        self._listener_expected = workers and listen_enabled
        self._schema_version = schema_version
        # The dashboard (spectral.ui) exists only with a token and a store to read.
        self._dashboard_store = dashboard_store
        self._ui_session_ttl = ui_session_ttl
        self._stale_after = stale_after
        # /queue and /metrics: on their own listener when ops_port is set, behind the
        # detail token when ops_token_required.
        self._ops_bind = None if ops_port is None else f"{ops_host}:{ops_port}"
        self._ops_ports: set[int] = set()
        self._ops_token_required = ops_token_required
        self.app = self._build()

    # --- the endpoints -------------------------------------------------------------

    def _version_doc(self) -> dict[str, Any]:
        return {
            "service": self._service,
            "environment": self._environment,
            "generation": self._state.generation,
            "commit_sha": self._version.commit_sha,
            "deployed_at": self._deployed_at,
        }

    def _listener(self) -> dict[str, Any]:
        age = self._state.last_notification_age()
        return {
            "mode": self._state.listener_mode,
            "note": self._state.listener_note,
            "last_notification_age_seconds": None if age is None else round(age, 3),
            "reconnects": self._state.counters.reconnects,
        }

    def _health(self) -> tuple[int, bytes]:
        """/health's status and body: 503 from the first signal of a drain, else 200."""
        if self._state.draining.is_set():
            return 503, _HEALTH_DRAINING
        return 200, _HEALTH_OK

    def _checks(self) -> dict[str, Any]:
        now = time.monotonic()
        beat = self._state.last_beat
        reap = self._state.last_reap
        snap = self._snapshot
        return {
            "database": "ok" if snap.database_ok else (snap.error or "unknown"),
            "migrations": {
                "expected": self._schema_version,
                "applied": snap.schema_version,
                "current": snap.schema_version == self._schema_version,
            },
            "listener": self._listener() if self._workers else None,
            "heartbeat_age_seconds": None if beat is None else round(now - beat, 3),
            "reaper_last_pass_age_seconds": None if reap is None else round(now - reap, 3),
            "draining": self._state.draining.is_set(),
        }

    def _ops_refusal(self) -> Response | None:
        """None when the request may see /queue or /metrics, else the refusal to send."""
        if self._ops_bind is not None:
            server = request.scope.get("server")
            if not server or server[1] not in self._ops_ports:
                return Response(json.dumps({"error": "not found"}), status=404,
                                content_type="application/json")
        if self._ops_token_required:
            return self._authorized()
        return None

    def _authorized(self) -> Response | None:
        """None when the request may see /version/detail, else the refusal to send."""
        if self._token is None:
            return Response(json.dumps({"error": "not found"}), status=404,
                            content_type="application/json")
        if any(name in request.args for name in _QUERY_TOKEN_NAMES):
            return _unauthorized("tokens in the query string are refused; use the Authorization header")
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), self._token.encode()
        ):
            return _unauthorized("unauthorized")
        return None

    def _build(self) -> QuartTrio:
        app = QuartTrio("spectral")
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

        # Only other methods reach the framework (405); asgi() answers GET and HEAD.
        @app.get("/health")
        async def health() -> Response:
            status, body = self._health()
            return Response(body, status=status, content_type="application/json",
                            headers={"Cache-Control": "no-store"})

        @app.get("/ready")
        async def ready() -> tuple[dict[str, Any], int]:
            await self._snapshot.get()
            checks = self._checks()
            failing = []
            if checks["draining"]:
                failing.append("draining")
            if checks["database"] != "ok":
                failing.append("database")
            if not checks["migrations"]["current"]:
                failing.append("migrations")
            if self._listener_expected and self._state.listener_mode != "notify":
                failing.append("listener")
            body = {"status": "ready" if not failing else "not ready", "failing": failing,
                    "checks": checks}
            return body, 200 if not failing else 503

        @app.get("/version")
        async def version() -> dict[str, Any]:
            return self._version_doc()

        @app.get("/version/detail")
        async def version_detail() -> Any:
            refusal = self._authorized()
            if refusal is not None:
                return refusal
            await self._snapshot.get()
            return {**self._version_doc(), "build": self._version.build,
                    "runtime": self._version.runtime(), "checks": self._checks()}

        @app.get("/queue")
        async def queue() -> Any:
            refusal = self._ops_refusal()
            if refusal is not None:
                return refusal
            snap = await self._snapshot.get()
            return {
                "generation": self._state.generation,
                "outbox": snap.get("outbox", []),
                "workers": snap.get("workers", []),
                "deployments_head": snap.get("deployments_head"),
                "blocked_keys": snap.get("blocked_keys"),
                "in_flight": len(self._state.in_flight),
                "listener": self._listener() if self._workers else None,
                "database": "ok" if self._snapshot.database_ok else self._snapshot.error,
                "reconcile": None if self._state.reconcile is None else {
                    **self._state.reconcile, "last_pass": snap.get("last_reconcile_pass"),
                },
                "prune": None if self._state.prune is None else {
                    **self._state.prune, "last_pass": snap.get("last_prune_pass"),
                },
                "health": snap.get("health"),
                "dead_count_capped": snap.get("dead_count_capped", False),
            }

        @app.get("/metrics")
        async def metrics() -> Response:
            refusal = self._ops_refusal()
            if refusal is not None:
                return refusal
            await self._snapshot.get()
            return Response(self._metrics.render(), content_type=CONTENT_TYPE)

        if self._token is not None and self._dashboard_store is not None:
            from ..ui import Dashboard

            Dashboard(
                store=self._dashboard_store, state=self._state, token=self._token,
                session_ttl=self._ui_session_ttl, stale_after=self._stale_after,
                service=self._service, environment=self._environment,
                listener=lambda: self._listener() if self._workers else None,
            ).install(app)
        return app

    # --- serving -----------------------------------------------------------------------

    async def asgi(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """The ASGI entry: GET /health is answered here, without the framework.

        Deploy loops and load balancers poll /health most; answering it before Quart
        roughly halves its cost per request, which leaves the workers more of the process.
        """
        if scope["type"] == "http" and scope["path"] == "/health" and scope["method"] in (
            "GET", "HEAD"
        ):
            status, body = self._health()
            start: HTTPResponseStartEvent = {
                "type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")],
                "trailers": False,
            }
            await send(start)
            payload: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else body, "more_body": False,
            }
            await send(payload)
            return
        await self.app(scope, receive, send)

    def _config(self) -> HypercornConfig:
        cfg = HypercornConfig()
        cfg.bind = [f"{self._host}:{self._port}"]
        if self._ops_bind is not None:
            cfg.bind.append(self._ops_bind)
        cfg.accesslog = None
        cfg.errorlog = log
        cfg.graceful_timeout = self._drain_budget
        cfg.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        cfg.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
        cfg.read_timeout = READ_TIMEOUT
        cfg.h11_max_incomplete_size = MAX_HEADER_BYTES
        cfg.include_server_header = False
        cfg.alpn_protocols = ["http/1.1"]
        return cfg

    async def _shutdown_trigger(self, cfg: HypercornConfig) -> None:
        await self._state.stopped.wait()
        # Whatever is left of the drain budget, at least a second, for in-flight requests.
        left = self._state.drain_deadline - trio.current_time()
        cfg.graceful_timeout = max(1.0, min(self._drain_budget, left))

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the workers are done, then shut down gracefully and return.

        Args:
            task_status: started with the bound URLs (port 0 picks a free port).

        Cancellation: hypercorn closes its sockets; in-flight requests are cut off.
        """
        cfg = self._config()
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                functools.partial(serve, self.asgi, cfg,
                                  shutdown_trigger=functools.partial(self._shutdown_trigger, cfg))
            )
            if self._ops_bind is not None:
                # Binds come back in the order of cfg.bind: the main listener first.
                self._ops_ports = {int(b.rsplit(":", 1)[1]) for b in binds[1:]}
                log.info("http listening on %s; /queue and /metrics only on %s", binds[0],
                         " ".join(binds[1:]), extra={"worker_id": self._state.worker_id})
            else:
                log.info("http listening on %s", " ".join(binds),
                         extra={"worker_id": self._state.worker_id})
            task_status.started(binds)
        log.info("http stopped", extra={"worker_id": self._state.worker_id})


def _unauthorized(message: str) -> Response:
    response = Response(json.dumps({"error": message}), status=401, content_type="application/json")
    response.headers["WWW-Authenticate"] = 'Bearer realm="spectral"'
    return response

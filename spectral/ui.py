"""The operators' dashboard at /ui: server-rendered HTML on the HTTP actor's app.

It exists only when a token is configured (SPECTRAL_DETAIL_TOKEN or its file); otherwise
/ui is 404. Logging in with the token (a form POST, never a query string) opens a session
kept in this process's memory: an HttpOnly, SameSite=Strict cookie that expires after
SPECTRAL_UI_SESSION_TTL seconds. Every action is a POST that carries the session's CSRF
token in a hidden ``csrf`` field; a missing or wrong one is refused with 403 and changes
nothing. Every action is logged with what it changed.

Each page view reads the database through typed Store calls (a handful of queries); it
is meant for people, not for polling. No JavaScript: the page refreshes itself every
15 seconds with a meta tag, and the throughput chart is inline SVG.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from quart import Response, render_template, request
from quart_trio import QuartTrio

from .actors._switch import ACTIONS as SWITCH_ACTIONS
from .errors import InvalidTopicError
from .events import check_topic
from .state import RuntimeState
from .verdicts import health_verdicts, verdicts

log = logging.getLogger("spectral.ui")

COOKIE = "spectral_ui"
STATUSES = ("PENDING", "CLAIMED", "DONE", "DEAD")
#: Keys held by a DEAD event shown on the page (per-key ordering).
BLOCKED_KEYS_SHOWN = 20
THROUGHPUT_MINUTES = 30
DEAD_ROWS_SHOWN = 50
WORKERS_SHOWN = 50
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class DashboardStore(Protocol):
    async def all_outbox_counts(self) -> list[dict[str, Any]]: ...
    async def workers(self, stale_after: float) -> list[dict[str, Any]]: ...
    async def latest_deployments(self, limit: int = 5) -> list[dict[str, Any]]: ...
    async def last_reconcile_pass(self) -> dict[str, Any] | None: ...
    async def reconcile_enabled_override(self) -> bool | None: ...
    async def set_reconcile_enabled(self, enabled: bool | None) -> None: ...
    async def dead_rows(self, limit: int) -> list[dict[str, Any]]: ...
    async def dead_topics(self) -> list[dict[str, Any]]: ...
    async def blocked_keys(self, limit: int = 20) -> list[dict[str, Any]]: ...
    async def table_health(self) -> list[dict[str, Any]]: ...
    async def xmin_horizon(self) -> dict[str, Any]: ...
    async def throughput(self, minutes: int) -> list[dict[str, Any]]: ...
    async def requeue_ids(self, ids: list[int]) -> list[int]: ...
    async def requeue_topic(self, topic: str, generation: int | None) -> list[int]: ...


@dataclass
class Session:
    csrf: str
    expires: float  # time.monotonic()
    flash: list[str] = field(default_factory=list)


class Sessions:
    """Logged-in sessions of this process, by cookie value; they expire after ``ttl`` s."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_id: dict[str, Session] = {}

    def open(self) -> tuple[str, Session]:
        self._prune()
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires=time.monotonic() + self.ttl)
        self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        session = self._by_id.get(sid or "")
        if session is None:
            return None
        if session.expires <= time.monotonic():
            self._by_id.pop(sid or "", None)
            return None
        return session

    def close(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)

    def _prune(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]


def throughput_chart(points: list[dict[str, Any]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """Bars of the chart: one per minute, scaled to the busiest minute."""
    peak = max((int(p["done"]) for p in points), default=0)
    slot = width / max(len(points), 1)
    bars = []
    for i, p in enumerate(points):
        done = int(p["done"])
        h = 0.0 if peak == 0 else (height - 4) * done / peak
        bars.append({"x": round(i * slot + 1, 1), "y": round(height - h, 1),
                     "w": round(max(slot - 2, 1), 1), "h": round(h, 1),
                     "label": f"{p['minute']:%H:%M} UTC: {done} done"})
    total = sum(int(p["done"]) for p in points)
    return {"bars": bars, "peak": peak, "total": total, "width": width, "height": height,
            "first": f"{points[0]['minute']:%H:%M}" if points else "",
            "last": f"{points[-1]['minute']:%H:%M}" if points else ""}


def _age(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "never"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


class Dashboard:
    """The /ui routes, installed on the HTTP actor's Quart app when a token is set."""

    def __init__(
        self, *, store: DashboardStore, state: RuntimeState, token: str, session_ttl: float,
        stale_after: float, service: str, environment: str, listener: Any,
    ) -> None:
        self._store = store
        self._state = state
        self._token = token
        self.sessions = Sessions(session_ttl)
        self._stale_after = stale_after
        self._service = service
        self._environment = environment
        self._listener = listener  # () -> the listener block of /queue, or None

    # --- sessions and CSRF ----------------------------------------------------------

    def _session(self) -> tuple[str | None, Session | None]:
        sid = request.cookies.get(COOKIE)
        return sid, self.sessions.get(sid)

    async def _action_session(self) -> tuple[Session, dict[str, str]] | Response:
        """The session of a POST action and its form, or the 403 refusal to send."""
        form = dict((await request.form).items())
        _, session = self._session()
        if session is None:
            return await _page_response("session expired or missing: log in again", 403)
        presented = form.get("csrf", "")
        if not presented or not hmac.compare_digest(presented.encode(), session.csrf.encode()):
            log.warning("ui action refused: missing or wrong CSRF token", extra={"path": request.path})
            return await _page_response("refused: missing or wrong CSRF token", 403)
        return session, form

    def _done(self, session: Session, message: str) -> Response:
        session.flash.append(message)
        log.info("ui action: %s", message, extra={"path": request.path})
        return _see_other("/ui")

    # --- the page -------------------------------------------------------------------

    async def _view(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        deployments = await self._store.latest_deployments(10)
        workers = await self._store.workers(self._stale_after)
        outbox = await self._store.all_outbox_counts()
        judged = verdicts(deployments, workers, outbox, self._stale_after)
        live: dict[int, int] = {}
        for w in workers:
            if w["state"] != "exited" and not w["stale"]:
                live[int(w["generation"])] = live.get(int(w["generation"]), 0) + 1
        head = max((int(d["generation"]) for d in deployments if d.get("retired_at") is None),
                   default=None)
        pivot: dict[int, dict[str, int]] = {}
        for row in outbox:
            counts = pivot.setdefault(int(row["generation"]), dict.fromkeys(STATUSES, 0))
            counts[row["status"]] = int(row["n"])
        totals = {s: sum(r[s] for r in pivot.values()) for s in STATUSES}
        override = await self._store.reconcile_enabled_override()
        last_pass = await self._store.last_reconcile_pass()
        block = self._state.reconcile
        return {
            "service": self._service, "environment": self._environment,
            "generation": self._state.generation, "now": f"{now:%Y-%m-%d %H:%M:%S} UTC",
            "head": head, "verdicts": judged,
            "deployments": [{**d, "live": live.get(int(d["generation"]), 0),
                             "deployed": _age(d["deployed_at"], now)} for d in deployments],
            "workers": [{**w, "beat": _age(w["last_seen"], now)} for w in workers[:WORKERS_SHOWN]],
            "workers_hidden": max(0, len(workers) - WORKERS_SHOWN),
            "statuses": STATUSES, "outbox": sorted(pivot.items(), reverse=True), "totals": totals,
            "dead": await self._store.dead_rows(DEAD_ROWS_SHOWN),
            "dead_topics": await self._store.dead_topics(),
            "blocked": await self._store.blocked_keys(BLOCKED_KEYS_SHOWN),
            # What kills queue tables: a held-back xmin horizon, dead-tuple bloat.
            "health": health_verdicts(await self._store.table_health(),
                                      await self._store.xmin_horizon()),
            "override": override,
            "reconcile_setting": None if block is None else block.get("enabled"),
            "reconcile_here": block is not None,
            "last_pass": None if last_pass is None else {
                **last_pass, "ago": _age(last_pass["started_at"], now)},
            "listener": self._listener(),
            "chart": throughput_chart(await self._store.throughput(THROUGHPUT_MINUTES)),
            "minutes": THROUGHPUT_MINUTES,
        }

    def install(self, app: QuartTrio) -> None:
        @app.get("/ui")
        async def ui_page() -> Any:
            _, session = self._session()
            if session is None:
                return _see_other("/ui/login")
            flash, session.flash = session.flash, []
            html = await render_template("ui/dashboard.html", csrf=session.csrf, flash=flash,
                                         **await self._view())
            return _secure(Response(html, content_type="text/html; charset=utf-8"))

        @app.get("/ui/login")
        async def ui_login_form() -> Any:
            return await _page_response("", 200)

        @app.post("/ui/login")
        async def ui_login() -> Any:
            form = await request.form
            presented = form.get("token", "")
            if not presented or not hmac.compare_digest(presented.encode(), self._token.encode()):
                log.warning("ui login refused: wrong token", extra={"remote": request.remote_addr})
                return await _page_response("wrong token", 401)
            sid, _ = self.sessions.open()
            response = _see_other("/ui")
            response.set_cookie(COOKIE, sid, max_age=int(self.sessions.ttl), path="/ui",
                                httponly=True, samesite="Strict", secure=request.scheme == "https")
            log.info("ui login", extra={"remote": request.remote_addr})
            return response

        @app.post("/ui/logout")
        async def ui_logout() -> Any:
            checked = await self._action_session()
            if isinstance(checked, Response):
                return checked
            self.sessions.close(request.cookies.get(COOKIE))
            response = _see_other("/ui/login")
            response.delete_cookie(COOKIE, path="/ui")
            return response

        for path, change in (("/ui/requeue", self._requeue), ("/ui/requeue-topic", self._requeue_topic),
                             ("/ui/reconcile", self._reconcile)):
            app.add_url_rule(path, endpoint=path, view_func=self._action(change), methods=["POST"])

    def _action(self, change: Callable[[dict[str, str]], Awaitable[str | Response]]) -> Any:
        """A POST view: check the session and CSRF token, make the change, log it."""

        async def view() -> Response:
            checked = await self._action_session()
            if isinstance(checked, Response):
                return checked
            session, form = checked
            outcome = await change(form)
            return outcome if isinstance(outcome, Response) else self._done(session, outcome)

        return view

    # --- the actions: each returns what it changed, or the refusal to send ------------

    async def _requeue(self, form: dict[str, str]) -> str | Response:
        try:
            event_id = int(form.get("id", ""))
        except ValueError:
            return await _page_response("id: not an event id", 400)
        done = await self._store.requeue_ids([event_id])
        return (f"requeued event {event_id} (DEAD -> PENDING)" if done
                else f"event {event_id} is not DEAD: nothing changed")

    async def _requeue_topic(self, form: dict[str, str]) -> str | Response:
        topic = form.get("topic", "")
        try:
            check_topic(topic)
        except InvalidTopicError as exc:
            return await _page_response(str(exc), 400)
        ids = await self._store.requeue_topic(topic, None)
        shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
        return f"requeued {len(ids)} DEAD events of topic {topic}" + (f": {shown}" if ids else "")

    async def _reconcile(self, form: dict[str, str]) -> str | Response:
        choice = form.get("state", "")
        if choice not in SWITCH_ACTIONS:
            return await _page_response("state: must be on, off or default", 400)
        before = await self._store.reconcile_enabled_override()
        await self._store.set_reconcile_enabled(SWITCH_ACTIONS[choice])
        names = {enabled: name for name, enabled in SWITCH_ACTIONS.items()}
        return f"reconciler switched {choice} (override was {names[before]})"


def _see_other(location: str) -> Response:
    return _secure(Response("", status=303, headers={"Location": location}))


def _secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


async def _page_response(message: str, status: int) -> Response:
    """The login page (also the page of a refusal), with ``message`` and ``status``."""
    body = await render_template("ui/login.html", message=message)
    return _secure(Response(body, status=status, content_type="text/html; charset=utf-8"))

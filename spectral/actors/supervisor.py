"""Users' long-running actors (``@app.actor``), supervised with bounded restart backoff."""

from __future__ import annotations

import logging
import random
from typing import NoReturn

import trio

from ..app import ActorSpec
from ..rules import backoff_delay
from ..state import RuntimeState
from .user import ActorContext, ActorStore

log = logging.getLogger("spectral.actor")

#: Restart delays grow from 1 s to 60 s; a run that lasted this long resets them.
RESTART_BASE = 1.0
RESTART_CAP = 60.0
HEALTHY_AFTER = 60.0


class ActorSupervisor:
    """Runs one user actor forever; restarts it with backoff when it returns or raises."""

    def __init__(
        self, spec: ActorSpec, store: ActorStore, state: RuntimeState, *, max_payload_bytes: int,
        rng: random.Random | None = None,
    ) -> None:
        self._spec = spec
        self._ctx = ActorContext(spec.name, state.worker_id, state.generation, state.draining,
                                 store, max_payload_bytes)
        self._rng = rng or random.Random()
        self.restarts = 0

    async def run_once(self) -> None:
        """Run the actor once; an exception is logged, not raised."""
        try:
            await self._spec.fn(self._ctx)
            log.warning("actor %s returned; restarting it", self._spec.name)
        except Exception:
            log.exception("actor %s crashed; restarting it", self._spec.name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Run and restart forever (1 s doubling to 60 s; reset after 60 s healthy).

        Cancellation: cancels the actor (the drain cancels it after the turns).
        """
        task_status.started()
        failures = 0
        while True:
            started = trio.current_time()
            await self.run_once()
            failures = 1 if trio.current_time() - started >= HEALTHY_AFTER else failures + 1
            self.restarts += 1
            await trio.sleep(backoff_delay(failures, RESTART_BASE, RESTART_CAP, self._rng))

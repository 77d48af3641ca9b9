"""The live kill switches of the periodic actors (the reconciler, the pruner)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..errors import DatabaseError

#: What 'spectral reconcile|prune on|off|default' and the dashboard set: None removes the
#: override, so each process's own setting decides again.
ACTIONS: dict[str, bool | None] = {"on": True, "off": False, "default": None}


async def live_switch(read: Callable[[], Awaitable[bool | None]], default: bool) -> bool:
    """The database's override if set, else ``default`` (the process setting); an
    unreadable override counts as not set, so an outage never flips an actor."""
    try:
        override = await read()
    except DatabaseError:
        override = None
    return default if override is None else override

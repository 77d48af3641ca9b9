"""spectral.testing: test your own handlers, actors and drains against the real runtime.

::

    from spectral.testing import running

    async def test_sigterm_drains_in_flight_turns(spectral_db):
        async with running(app, spectral_db, drain_timeout=5) as rt:
            ids = [await rt.publish("order.created", {"order_id": i}) for i in range(10)]
            await rt.wait_in_flight(10)
            report = await rt.sigterm()
        assert report.exit_code == 0 and report.released == 0

The ``spectral_db`` fixture comes from the pytest plugin installed with the package
(:mod:`spectral.testing.plugin`). See docs/how-to/test-your-handlers.md.
"""

from ._database import TestDatabase as TestDatabase
from ._database import open_test_database as open_test_database
from ._runtime import TEST_DEFAULTS as TEST_DEFAULTS
from ._runtime import DrainReport as DrainReport
from ._runtime import EventState as EventState
from ._runtime import Runtime as Runtime
from ._runtime import resolve_settings as resolve_settings
from ._runtime import running as running

__all__ = [
    "TEST_DEFAULTS", "DrainReport", "EventState", "Runtime", "TestDatabase",
    "open_test_database", "resolve_settings", "running",
]

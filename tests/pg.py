"""Test databases for Spectral's own suite: the shared scratch-database helpers of
:mod:`spectral.db.scratch` (the same ones the pytest plugin of spectral.testing uses)."""

from __future__ import annotations

from spectral.db.scratch import ENV as ENV
from spectral.db.scratch import ScratchServer as Server
from spectral.db.scratch import admin as admin
from spectral.db.scratch import query as query
from spectral.db.scratch import with_database as with_database

__all__ = ["ENV", "Server", "admin", "query", "with_database"]

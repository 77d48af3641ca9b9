"""Spectral's exceptions.

Every error Spectral raises derives from :class:`SpectralError`. Subclasses are named for
the state of a resource or the cause, and their ``str()`` is one line a user can act on.
Driver (asyncpg) errors never escape the database seam untranslated.
"""

from __future__ import annotations


class SpectralError(Exception):
    """Root of every error Spectral raises."""


class ConfigurationError(SpectralError):
    """A setting is missing, malformed or inconsistent with another one."""


class InvalidEventError(SpectralError, ValueError):
    """An event was rejected before anything was written (bad topic or payload)."""


class InvalidTopicError(InvalidEventError):
    """The topic does not match the documented pattern or is too long."""


class InvalidPayloadError(InvalidEventError):
    """The payload is not a JSON object (or not JSON-serialisable)."""


class PayloadTooLargeError(InvalidEventError):
    """The payload's JSON text is larger than the configured cap."""


class NoGenerationError(SpectralError):
    """No deployment generation exists (or the configured one is unknown)."""


class DatabaseError(SpectralError):
    """The database refused or failed an operation."""


class DatabaseUnavailableError(DatabaseError):
    """The database cannot be reached (connection refused, dropped or timed out)."""


class SchemaNotReadyError(DatabaseError):
    """The ``core`` schema is missing or older than this version of Spectral needs."""


class MigrationError(DatabaseError):
    """A migration failed or the migration history does not match the shipped files."""


class EmbeddedServerError(SpectralError):
    """The embedded PostgreSQL server could not be found or started."""


class AlreadyHandledError(SpectralError):
    """This handler already committed its effects for this event (the ledger says so).

    Raised inside a turn when another worker committed the same (handler, event) first;
    the turn's transaction is rolled back and nothing is applied twice.
    """


class ClaimLostError(SpectralError):
    """A claimed row's claim token no longer matches: another worker owns the row now."""


class ReconnectBudgetExhaustedError(SpectralError):
    """A consumer could not reconnect to the database within its reconnect budget."""


class AppLoadError(SpectralError):
    """``MODULE:APP`` could not be imported or does not name a :class:`spectral.App`."""


class RolloutRefusedError(SpectralError):
    """The staging gate or the pre-flight refused a rollout (recorded as REFUSED)."""

"""Spectral: a worker runtime for transactional-outbox systems on PostgreSQL, on trio."""

from ._version import __version__ as __version__
from .actors.user import ActorContext as ActorContext
from .app import App as App
from .config import Settings as Settings
from .db import open_database as open_database
from .db import publish as publish
from .db import publish_trio as publish_trio
from .errors import AlreadyHandledError as AlreadyHandledError
from .errors import ConfigurationError as ConfigurationError
from .errors import DatabaseError as DatabaseError
from .errors import DatabaseUnavailableError as DatabaseUnavailableError
from .errors import InvalidEventError as InvalidEventError
from .errors import InvalidKeyError as InvalidKeyError
from .errors import InvalidPayloadError as InvalidPayloadError
from .errors import InvalidTopicError as InvalidTopicError
from .errors import InvalidTraceparentError as InvalidTraceparentError
from .errors import NoGenerationError as NoGenerationError
from .errors import PayloadTooLargeError as PayloadTooLargeError
from .errors import SpectralError as SpectralError
from .events import Event as Event
from .tx import Tx as Tx

__all__ = [
    "ActorContext", "AlreadyHandledError", "App", "ConfigurationError", "DatabaseError",
    "DatabaseUnavailableError", "Event", "InvalidEventError", "InvalidPayloadError",
    "InvalidTopicError", "NoGenerationError", "PayloadTooLargeError", "Settings",
    "SpectralError", "Tx", "open_database", "publish", "publish_trio",
    "InvalidKeyError", "InvalidTraceparentError",
]

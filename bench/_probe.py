"""The latency probe every benchmarked worker calls when a handler starts.

Kept free of dependencies so the peers' workers import nothing of Spectral's.
"""

from __future__ import annotations

import os
import time


def _open() -> int | None:
    path = os.environ.get("BENCH_LATENCY_FILE")
    if not path:
        return None
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


_FD = _open()


def record_start(seq: object) -> None:
    """Append ``seq`` and the wall-clock start time to BENCH_LATENCY_FILE.

    Drain jobs carry no ``seq`` and skip this, so they stay true no-ops. One ``os.write``
    of a short line is atomic with O_APPEND, so concurrent handlers never interleave.
    """
    if seq is not None and _FD is not None:
        os.write(_FD, f"{seq} {time.time():.6f}\n".encode())

"""Rules the whole runtime shares, below every other layer: it imports nothing of Spectral.

The turn's retry delays, the claim-side reconnects and the user actors' restarts all
follow the same backoff.
"""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Equal-jitter exponential backoff: half the step fixed, half random, capped."""
    step = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return float(step / 2 + rng.uniform(0, step / 2))

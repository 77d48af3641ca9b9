"""Spectral's actors, one per module, all with one contract.

Each actor is built from its settings, the shared :class:`~spectral.state.RuntimeState`
and the part of the store it needs (a Protocol in its module, so tests can fake it). Its
``run(*, task_status)`` signals ready, then loops calling ``run_once()``; stopping is
cancellation.
"""

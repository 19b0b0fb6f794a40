"""Placement policy, as pure code.

An executor scores higher when it has the function pinned (warm code, and a
live class instance), when it caches keys the call's arguments reference
(data locality), and lower the more calls it is running. Ties go to the
executor with fewer calls, then to a random pick, so load spreads.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cloudburst.errors import NoExecutorError

PINNED_WEIGHT = 4.0
"""Score for having the function pinned: worth about four queued calls."""
KEY_WEIGHT = 1.0
"""Score per referenced key held in the executor's cache."""
LOAD_WEIGHT = 1.0
"""Penalty per call running or queued on the executor."""
NEAR_WEIGHT = 2.0
"""Score for the executor the function's upstream runs on (its input stays in the
process, and a chain of stages can run on one thread): worth about two queued calls."""


@dataclass(frozen=True)
class ExecutorView:
    """What the scheduler knows about one executor."""

    executor_id: str
    """The executor's id."""
    address: str
    """Its gRPC address, or an in-process name."""
    pinned: frozenset[str] = frozenset()
    """Functions pinned there."""
    cached_keys: frozenset[str] = frozenset()
    """User keys in its cache."""
    load: int = 0
    """Calls running or queued there."""
    overloaded: bool = False
    """Whether it refuses new work (queue full)."""


def score(
    view: ExecutorView, function: str, keys: Collection[str], near: str | None = None
) -> float:
    """Return how well ``view`` suits a call of ``function`` that references ``keys``.

    ``near`` is the executor the function's (first) upstream in a DAG runs on.
    """
    pinned = PINNED_WEIGHT if function in view.pinned else 0.0
    local = KEY_WEIGHT * sum(1 for k in keys if k in view.cached_keys) if keys else 0.0
    nearby = NEAR_WEIGHT if near is not None and view.executor_id == near else 0.0
    return pinned + local + nearby - LOAD_WEIGHT * view.load


def place(
    function: str,
    keys: Collection[str],
    executors: Sequence[ExecutorView],
    rng: random.Random | None = None,
    near: str | None = None,
) -> ExecutorView:
    """Choose the executor for one call (``near``: see :func:`score`).

    Raises:
        NoExecutorError: No executor is available (none known, or all overloaded).
    """
    # One pass: the best score, then the least load among the best, then a random pick.
    top: list[ExecutorView] = []
    best = fewest = 0.0
    for executor in executors:
        if executor.overloaded:
            continue
        rank = score(executor, function, keys, near)
        if not top or rank > best or (rank == best and executor.load < fewest):
            top, best, fewest = [executor], rank, executor.load
        elif rank == best and executor.load == fewest:
            top.append(executor)
    if not top:
        detail = "all executors are overloaded" if executors else "no executor is registered"
        raise NoExecutorError(
            f"cannot place {function!r}: {detail}; retry shortly or add executors",
            {"function": function},
        )
    if len(top) == 1:
        return top[0]
    return (rng.choice if rng is not None else random.choice)(top)


def choose_pins(function: str, executors: Sequence[ExecutorView], replicas: int) -> list[str]:
    """Choose executors to pin ``function`` on.

    Executors that already pin it come first; then pins are spread (fewest
    pinned functions first), then the least loaded; overloaded ones are skipped
    unless nothing else is available.
    """
    available = [e for e in executors if not e.overloaded] or list(executors)
    ordered = sorted(
        available,
        key=lambda e: (function not in e.pinned, len(e.pinned), e.load, e.executor_id),
    )
    return [e.executor_id for e in ordered[: max(1, replicas)]]

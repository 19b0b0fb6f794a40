"""Call ids: unique, cheap to make, and the default response key of a call."""

from __future__ import annotations

import itertools
import os


class _CallIds:
    """Unique ids without a system call each: 80 random bits per process, then a counter.

    A forked child draws a prefix of its own, so parent and child never share ids.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(10).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


new_call_id = _CallIds()
"""Return a unique id for a call (32 hex digits); it is also the default response key."""

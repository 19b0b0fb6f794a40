"""The functions the bench registers (pickled by value; this module imports nothing heavy)."""

from __future__ import annotations

import time
from typing import Any


def incr(cloudburst: Any, a: int) -> int:
    return a + 1


def square(cloudburst: Any, a: int) -> int:
    return a * a


def fan_source(cloudburst: Any, a: int) -> int:
    return a


def fan_1(cloudburst: Any, a: int) -> int:
    return a + 1


def fan_2(cloudburst: Any, a: int) -> int:
    return a * 2


def fan_3(cloudburst: Any, a: int) -> int:
    return a + 3


def fan_4(cloudburst: Any, a: int) -> int:
    return a * 4


def fan_sink(cloudburst: Any, a: int, b: int, c: int, d: int) -> int:
    return a + b + c + d


#: fan_source(1) = 1, then 2 + 2 + 4 + 4.
FAN_RESULT = 12


def ping(cloudburst: Any, tag: str, warmup: int, rounds: int) -> dict[str, Any]:
    """Send a message to the pong function and wait for its answer, ``warmup + rounds`` times.

    Each round trip is timed here, inside the function: send() until recv() returns.
    """
    me = cloudburst.get_id()
    cloudburst.put_object(f"{tag}/ping", me)
    peer = cloudburst.get_object(f"{tag}/pong", timeout=60)
    latencies: list[float] = []
    clock = time.perf_counter
    for i in range(warmup + rounds):
        start = clock()
        cloudburst.send(peer, i)
        replies = cloudburst.recv(timeout=30)
        elapsed = clock() - start
        if not replies:
            raise TimeoutError(f"no answer to message {i}")
        if i >= warmup:
            latencies.append(elapsed)
    return {"me": me, "peer": peer, "latencies": latencies}


def pong(cloudburst: Any, tag: str, total: int) -> int:
    """Answer every message from ping, ``total`` times."""
    cloudburst.put_object(f"{tag}/pong", cloudburst.get_id())
    answered = 0
    while answered < total:
        messages = cloudburst.recv(timeout=30)
        if not messages:
            raise TimeoutError(f"no message after {answered}")
        for sender, message in messages:
            cloudburst.send(sender, message)
            answered += 1
    return answered


def pingpong_report(cloudburst: Any, exchange: dict[str, Any], answered: int) -> dict[str, Any]:
    return {**exchange, "answered": answered}


def locality_read(
    cloudburst: Any, a0: Any, a1: Any, a2: Any, a3: Any, a4: Any,
    a5: Any, a6: Any, a7: Any, a8: Any, a9: Any,
) -> int:  # fmt: skip
    """Read ten references (to one array in the KVS); the total number of items seen."""
    return sum(len(a) for a in (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9))

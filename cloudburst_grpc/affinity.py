"""Pinning a process to CPUs (``server.cpus``, ``--cpus``).

A Python process runs one thread at a time, yet a call crosses several of its
threads: the gRPC poller, the event loop, the thread that runs the function.
Left alone, the kernel spreads them over the machine's cores, and every hand-off
then wakes another core, which on virtual machines costs tens of microseconds.
Pinning each ``cbgrpc`` process to its own core keeps those hand-offs on one
core. Leave it off where functions spend their time in code that releases the
GIL (numpy, compression) and should run in parallel on several cores.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: How ``server.cpus`` is written, for messages.
CPU_LIST_FORMAT = "a CPU list like '0', '0-3' or '0,2,4-5'"


def parse_cpus(text: str) -> frozenset[int]:
    """The CPUs of a list like ``0``, ``0-3`` or ``0,2,4-5`` (as in ``taskset -c``).

    Raises:
        ValueError: The list is empty or malformed; the message says why.
    """
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not {CPU_LIST_FORMAT}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{text!r}: the range {part} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """A CPU set written back as a list: ``{0, 1, 2, 5}`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin(text: str) -> frozenset[int]:
    """Pin every thread of this process, and the threads it starts later, to the CPUs listed.

    Call it before the process starts its servers, so that no thread escapes.
    The list may name CPUs outside the affinity this process inherited (as
    ``taskset`` may), but not CPUs that do not exist or that its cgroup forbids.

    Raises:
        ValueError: The list is malformed, names a CPU this process may not use,
            or the platform cannot pin (not Linux); the message says which.
    """
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning to CPUs (server.cpus, --cpus) needs Linux; leave it unset")
    existing = frozenset(range(os.cpu_count() or 1))
    if cpus - existing:
        raise ValueError(
            f"CPU {format_cpus(cpus - existing)} does not exist on this machine "
            f"(it has CPU {format_cpus(existing)})"
        )
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError(
            f"cannot pin to CPU {format_cpus(cpus)} ({exc.strerror}); "
            f"this process may use CPU {format_cpus(before)}"
        ) from None
    granted = os.sched_getaffinity(0)
    if granted != cpus:  # a cpuset cgroup left some out
        os.sched_setaffinity(0, before)
        raise ValueError(
            f"CPU {format_cpus(cpus - granted)} is not available to this process "
            "(its cgroup's cpuset leaves it out); choose CPUs the cpuset allows"
        )
    # A new thread inherits its creator's affinity; threads already running
    # (started by imported libraries) are pinned one by one.
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = []
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass  # the thread ended meanwhile
    logger.info("pinned to CPU %s", format_cpus(cpus))
    return cpus

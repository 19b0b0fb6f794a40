"""Keeping the memory of large values for reuse (glibc), in servers and in clients.

glibc's malloc hands each block of 128 KiB or more out as freshly mapped memory
and unmaps it on free (it raises that bound as it goes, but not reliably for
gRPC's message buffers). A server handling 1 MiB values then takes a page
fault for every 4 KiB of every value it receives, copies or parses: about 360
faults and half a millisecond per 1 MiB put on ``cbgrpc serve``. :func:`tune`
makes blocks up to :data:`MMAP_THRESHOLD` come from malloc's heaps, whose
freed memory is reused, and returns memory to the system only when more than
:data:`TRIM_THRESHOLD` is free at a heap's top. A client pays the same on its
side of a 1 MiB ``put_object`` (the value, its message, the encoded request:
the put took about twice as long against ``cbgrpc serve`` without tuning), so
every ``cbgrpc`` process tunes at start, and a process that opens a
``CloudburstConnection`` tunes once (:func:`tune_once`).

Variables that set the same glibc options (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``) win: then nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

#: Blocks up to this size come from malloc's heaps (and are reused once freed).
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at a heap's top beyond this is returned to the system.
TRIM_THRESHOLD = 64 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Set malloc's thresholds for large values; returns whether they were set.

    Does nothing (False) without glibc, or when the environment sets them.
    """
    if any(name in environ for name in _USER_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        logger.debug("mallopt refused the thresholds; malloc keeps its defaults")
    return ok


@functools.cache
def tune_once() -> bool:
    """:func:`tune` the first time a process calls it; later calls return the first answer."""
    return tune()


#: Freed memory worth handing back at once with :func:`trim`.
TRIM_AFTER_BYTES = TRIM_THRESHOLD


def trim() -> bool:
    """Return the free memory of malloc's heaps to the system now; returns whether any went.

    A value received in 1 MiB chunks leaves them in malloc's heaps (they are
    under :data:`MMAP_THRESHOLD`) once they are joined and freed, and glibc
    gives them back only when the heap's top is free, which a block still in
    use above them prevents. Call this after freeing that much, before the next
    whole copy, so that the process does not hold the chunks' memory as well.
    Without glibc it does nothing (False). The call releases the GIL.
    """
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    return bool(malloc_trim(0))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function

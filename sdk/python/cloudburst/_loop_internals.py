"""Every private asyncio and CPython name the caller-driven loop driver uses, in one place.

The caller-driven driver (:class:`cloudburst._loop.DrivenLoop`) runs an asyncio
loop a turn at a time on whichever thread waits for a result. asyncio's public
API cannot do that, so it uses these private names:

- ``_signal.getsignal`` and ``_signal.signal``: the C half of :mod:`signal`,
  which reads and sets the SIGINT handler without wrapping it in an enum on
  every call;
- ``asyncio.events._get_running_loop``: the loop this thread runs, or None,
  without raising when there is none;
- ``asyncio.events._set_running_loop``: makes a loop this thread's running
  loop, as ``run_forever`` does;
- a loop's ``_run_once``: one turn of the loop;
- a loop's ``_asyncgen_firstiter_hook`` and ``_asyncgen_finalizer_hook``: the
  async generator hooks ``run_forever`` installs;
- a loop's ``_thread_id``: the thread that runs it, which
  ``call_soon_threadsafe`` and debug mode check.

The module-level names are looked up once, at import; a loop's own, on the
loop (an event loop policy may make a loop without them, as uvloop's does).
:func:`missing` names those that are absent; the SDK then uses the plain
loop-thread driver, which needs none of them.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_signal: ModuleType | None
try:
    import _signal  # type: ignore[import-not-found,no-redef]
except ImportError:  # pragma: no cover - CPython always has it
    _signal = None

_absent_names: list[str] = []

#: A loop's private methods the caller-driven driver calls.
_LOOP_METHODS = ("_run_once", "_asyncgen_firstiter_hook", "_asyncgen_finalizer_hook")


def _resolve(owner: object, attribute: str, label: str) -> Any:
    """``owner.attribute`` or, when it is missing, a stand-in that raises saying so."""
    found = getattr(owner, attribute, None)
    if callable(found):
        return found
    _absent_names.append(label)

    def absent(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"this Python has no {label}, which the caller-driven loop needs")

    return absent


getsignal: Callable[[int], Any] = _resolve(_signal, "getsignal", "_signal.getsignal")
"""``signal.getsignal`` without the enum wrapping."""
setsignal: Callable[[int, Any], Any] = _resolve(_signal, "signal", "_signal.signal")
"""``signal.signal`` without the enum wrapping."""
get_running_loop: Callable[[], asyncio.AbstractEventLoop | None] = _resolve(
    asyncio.events, "_get_running_loop", "asyncio.events._get_running_loop"
)
"""The loop this thread runs, or None."""
_set_running_loop: Callable[[asyncio.AbstractEventLoop | None], None] = _resolve(
    asyncio.events, "_set_running_loop", "asyncio.events._set_running_loop"
)

#: The module-level names this Python lacks (found at import).
MISSING_AT_IMPORT: tuple[str, ...] = tuple(_absent_names)


def missing(loop: asyncio.AbstractEventLoop) -> tuple[str, ...]:
    """The private names the caller-driven driver needs that this Python or ``loop`` lacks."""
    absent = list(MISSING_AT_IMPORT)
    absent += [f"loop.{name}" for name in _LOOP_METHODS if not callable(getattr(loop, name, None))]
    if not hasattr(loop, "_thread_id"):
        absent.append("loop._thread_id")
    return tuple(absent)


def enter(loop: asyncio.AbstractEventLoop) -> tuple[Callable[[], None], Any]:
    """Make ``loop`` this thread's running loop, as ``run_forever`` does before its first turn.

    Returns:
        The function that runs one turn of the loop, and what :func:`leave` restores.
    """
    step: Callable[[], None] = loop._run_once  # type: ignore[attr-defined]
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(
        firstiter=loop._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
        finalizer=loop._asyncgen_finalizer_hook,  # type: ignore[attr-defined]
    )
    loop._thread_id = threading.get_ident()  # type: ignore[attr-defined]
    _set_running_loop(loop)
    return step, hooks


def leave(loop: asyncio.AbstractEventLoop, saved: Any) -> None:
    """Undo :func:`enter`: this thread no longer runs ``loop``."""
    _set_running_loop(None)
    loop._thread_id = None  # type: ignore[attr-defined]
    sys.set_asyncgen_hooks(*saved)

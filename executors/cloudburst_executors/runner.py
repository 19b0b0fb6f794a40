"""Loading user code and calling it by the runtime's rules.

Functions receive the user library first, always. Classes are registered as
``(Class, init_args)``; ``run`` is called per request. Whether a class's
``__init__`` and ``run`` receive the user library first is decided per method
by its signature: the library is passed exactly when the method cannot accept
the arguments without it but can with it. So the user guide's
``__init__(self, arg)`` / ``run(self, arg)`` get no library, and classes
written for the original system, ``__init__(self, cloudburst, arg)`` /
``run(self, cloudburst, arg)``, get it. A class can force the choice with a
class attribute ``cloudburst_user_library = True`` (or ``False``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cloudburst import sources
from cloudburst.errors import InvalidArgumentError, SerializationError
from cloudburst.serialization import deserialize
from cloudburst.v1 import function_pb2, value_pb2
from cloudburst_executors.inline import RunRecord


@dataclass
class LoadedFunction:
    """A registered function or class, unpickled and ready to call."""

    name: str
    version: int
    kind: int
    target: Any
    init_args: tuple[Any, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serializes calls into one pinned class instance."""
    instance: Any = None
    """The live class instance while the function is pinned."""
    runs: RunRecord = field(default_factory=RunRecord)
    """How its runs went, for running it on the event loop (see cloudburst_executors.inline);
    shared with its copies, functions of the same :attr:`identity`."""
    identity: bytes = b""
    """A digest of what it is made of, shared by its copies (see :func:`runner.identity`)."""


def unpickle(value: value_pb2.Value) -> Any:
    """Deserialize a value without letting user code in it stop the process.

    Unpickling runs user code (``__reduce__`` and friends); even its
    ``sys.exit()`` must only fail the read.

    Raises:
        SerializationError: Also when that code raised SystemExit or KeyboardInterrupt.
        RemoteFunctionError: The value is a stored failure.
    """
    try:
        return deserialize(value)
    except Exception:
        raise
    except BaseException as exc:
        raise SerializationError(
            f"reading a value ran code that raised {type(exc).__name__}({exc})"
        ) from exc


def identity(function: function_pb2.Function) -> bytes:
    """A digest of all a registered function is made of, but its name, version and retries.

    Two functions with the same identity were stored with the same bytes (code,
    captured values, serializer, kind, init arguments and sources): copies of
    one function under different names, which behave the same.
    """
    same = function_pb2.Function()
    same.CopyFrom(function)
    same.ClearField("name")
    same.ClearField("version")
    same.ClearField("retries")
    return hashlib.blake2b(same.SerializeToString(deterministic=True), digest_size=16).digest()


def load(function: function_pb2.Function) -> LoadedFunction:
    """Unpickle a registered function (blocking; call it off the event loop)."""
    target = unpickle(function.body)
    sources.restore(target, list(function.sources))
    init_args = tuple(unpickle(v) for v in function.init_arguments)
    if function.kind == function_pb2.FUNCTION_KIND_CLASS:
        if not inspect.isclass(target) or not callable(getattr(target, "run", None)):
            raise InvalidArgumentError(
                f"{function.name!r} is registered as a class but has no run method"
            )
    elif not callable(target):
        raise InvalidArgumentError(f"{function.name!r} is not callable")
    return LoadedFunction(
        function.name,
        function.version,
        function.kind,
        target,
        init_args,
        identity=identity(function),
    )


def passes_library(cls: type, method: str, args: tuple[Any, ...]) -> bool:
    """Whether ``cls.method`` takes the user library before ``args`` (see module docs)."""
    forced = getattr(cls, "cloudburst_user_library", None)
    if forced is not None:
        return bool(forced)
    try:
        signature = inspect.signature(getattr(cls, method))
    except (TypeError, ValueError):
        return False
    # Looked up on the class, a plain method still has its self slot; a
    # staticmethod or classmethod does not.
    static = isinstance(inspect.getattr_static(cls, method, None), staticmethod | classmethod)
    bound_self: tuple[None, ...] = () if static else (None,)

    def fits(count: int) -> bool:
        try:
            signature.bind(*bound_self, *([None] * count))
        except TypeError:
            return False
        return True

    return not fits(len(args)) and fits(len(args) + 1)


def instantiate(loaded: LoadedFunction, library: Any) -> Any:
    """Build a class instance with its init arguments (blocking)."""
    cls = loaded.target
    args = loaded.init_args
    if passes_library(cls, "__init__", args):
        return cls(library, *args)
    return cls(*args)


def invoke(loaded: LoadedFunction, library: Any, args: tuple[Any, ...], pinned: bool) -> Any:
    """Call the function, or a class's ``run`` (blocking; runs on an executor thread).

    A pinned class keeps one instance, built on first use, and its calls are
    serialized; otherwise each call builds a fresh instance.
    """
    if loaded.kind != function_pb2.FUNCTION_KIND_CLASS:
        return loaded.target(library, *args)
    cls = loaded.target
    with_library = passes_library(cls, "run", args)
    if not pinned:
        instance = instantiate(loaded, library)
        return instance.run(library, *args) if with_library else instance.run(*args)
    with _holding(loaded.lock, library):
        if loaded.instance is None:
            loaded.instance = instantiate(loaded, library)
        instance = loaded.instance
        return instance.run(library, *args) if with_library else instance.run(*args)


@contextlib.contextmanager
def _holding(lock: threading.Lock, library: Any) -> Iterator[None]:
    """Hold ``lock``; waiting for it is a wait, like a library call's.

    The run gives its runnable slot up while it waits (see
    :mod:`cloudburst_executors.slots`): the run holding the lock may be
    waiting in a library call, and needs a slot to go on.
    """
    if not lock.acquire(blocking=False):
        bridge = getattr(library, "bridge", None)
        if bridge is None:
            lock.acquire()
        else:
            with bridge.blocking():
                lock.acquire()
    try:
        yield
    finally:
        lock.release()

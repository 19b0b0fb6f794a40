"""Source text for remote tracebacks.

cloudpickle gives code it pickles by value the file name ``<dynamic-code>``,
so a traceback raised on an executor would show no source lines. The SDK
therefore ships the text of the files the registered code came from, with the
code objects each defines (by name and first line); the executor puts the
real file names back and lets :mod:`linecache` find the lines.

This module is public because both sides use it: the SDK calls :func:`collect`
when it registers a function (filling ``Function.sources``), and an executor
calls :func:`restore` on the unpickled function before it runs it. A client in
another language may leave ``sources`` empty; tracebacks then lack the lines.
"""

from __future__ import annotations

import inspect
import linecache
import types
from collections.abc import Iterator
from typing import Any

from cloudburst.v1 import function_pb2

#: Files larger than this are not shipped.
MAX_SOURCE_BYTES = 1024 * 1024
DYNAMIC = "<dynamic-code>"


def code_key(code: types.CodeType) -> str:
    """How a code object is named across pickling: its name and first line."""
    return f"{code.co_name}:{code.co_firstlineno}"


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _functions(obj: Any, seen: set[int]) -> Iterator[types.FunctionType]:
    """The functions that make up ``obj`` (a class: its methods) and the user helpers they call."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if inspect.isclass(obj):
        for member in vars(obj).values():
            target = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if isinstance(target, property):
                target = target.fget
            if isinstance(target, types.FunctionType):
                yield from _functions(target, seen)
    elif isinstance(obj, types.FunctionType):
        yield obj
        module = obj.__module__
        for name in obj.__code__.co_names:
            helper = obj.__globals__.get(name)
            if getattr(helper, "__module__", None) == module and (
                isinstance(helper, types.FunctionType) or inspect.isclass(helper)
            ):
                yield from _functions(helper, seen)


def collect(obj: Any) -> list[function_pb2.SourceFile]:
    """The source files of ``obj``'s code, for shipping with its registration."""
    files: dict[str, function_pb2.SourceFile] = {}
    for function in _functions(obj, set()):
        path = function.__code__.co_filename
        if path.startswith("<") and path != "<stdin>":
            continue
        source = files.get(path)
        if source is None:
            text = "".join(linecache.getlines(path, function.__globals__))
            if not text or len(text) > MAX_SOURCE_BYTES:
                continue
            source = files[path] = function_pb2.SourceFile(path=path, text=text)
        for code in _codes(function.__code__):
            source.code_keys.append(code_key(code))
    return list(files.values())


def _restored(code: types.CodeType, paths: dict[str, str]) -> types.CodeType:
    consts = tuple(
        _restored(c, paths) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    path = (
        paths.get(code_key(code), code.co_filename)
        if code.co_filename == DYNAMIC
        else code.co_filename
    )
    return code.replace(co_filename=path, co_consts=consts)


def restore(obj: Any, sources: list[function_pb2.SourceFile]) -> None:
    """Give ``obj``'s by-value code its real file names and make their lines findable."""
    if not sources:
        return
    paths = {key: source.path for source in sources for key in source.code_keys}
    for source in sources:
        lines = source.text.splitlines(keepends=True)
        # mtime None: linecache.checkcache keeps the entry instead of reading the disk.
        linecache.cache[source.path] = (len(source.text), None, lines, source.path)
    for function in _functions(obj, set()):
        if function.__code__.co_filename == DYNAMIC:
            function.__code__ = _restored(function.__code__, paths)

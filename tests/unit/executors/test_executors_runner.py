"""Loading and calling user code by the runtime's rules (executors.runner), no I/O."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from cloudburst.errors import InvalidArgumentError
from cloudburst.serialization import serialize
from cloudburst.v1 import function_pb2
from cloudburst_executors import runner

LIBRARY = object()


class GuideStyle:
    """The user guide's class: no library anywhere."""

    inits: ClassVar[int] = 0

    def __init__(self, base: int) -> None:
        type(self).inits += 1
        self.base = base
        self.calls = 0

    def run(self, x: int) -> tuple[int, int]:
        self.calls += 1
        return self.base + x, self.calls


class OriginalStyle:
    """The original system's class: the library comes first in both methods."""

    inits: ClassVar[int] = 0

    def __init__(self, cloudburst: Any, base: int) -> None:
        type(self).inits += 1
        self.init_library = cloudburst
        self.base = base

    def run(self, cloudburst: Any, x: int) -> tuple[Any, Any, int]:
        return self.init_library, cloudburst, self.base + x


class Mixed:
    def __init__(self, base: int) -> None:
        self.base = base

    def run(self, cloudburst: Any, x: int) -> tuple[Any, int]:
        return cloudburst, self.base + x


class VarArgs:
    def __init__(self, *args: Any) -> None:
        self.init_args = args

    def run(self, *args: Any) -> tuple[Any, ...]:
        return args


class ForcedOn:
    cloudburst_user_library = True

    def __init__(self, *args: Any) -> None:
        self.init_args = args

    def run(self, *args: Any) -> tuple[Any, ...]:
        return self.init_args + args


class ForcedOff:
    cloudburst_user_library = False

    def __init__(self, cloudburst: Any = None, base: int = 0) -> None:
        self.first = cloudburst

    def run(self, cloudburst: Any, x: Any = None) -> tuple[Any, Any]:
        return cloudburst, x


class NoInit:
    def run(self, x: int) -> int:
        return x * 2


class StaticRun:
    @staticmethod
    def run(cloudburst: Any, x: int) -> tuple[Any, int]:
        return cloudburst, x


class NoRun:
    def go(self) -> None:
        pass


def _loaded(cls: type, init_args: tuple[Any, ...] = ()) -> runner.LoadedFunction:
    return runner.LoadedFunction(cls.__name__, 1, function_pb2.FUNCTION_KIND_CLASS, cls, init_args)


@pytest.fixture(autouse=True)
def _reset_counts() -> None:
    GuideStyle.inits = 0
    OriginalStyle.inits = 0


# --- passes_library -----------------------------------------------------------------------


def test_guide_style_class_gets_no_library() -> None:
    assert runner.passes_library(GuideStyle, "__init__", (1,)) is False
    assert runner.passes_library(GuideStyle, "run", (1,)) is False


def test_original_style_class_gets_the_library() -> None:
    assert runner.passes_library(OriginalStyle, "__init__", (1,)) is True
    assert runner.passes_library(OriginalStyle, "run", (1,)) is True


def test_library_decision_depends_on_the_argument_count() -> None:
    # With two arguments, run(self, cloudburst, x) fits them without the library.
    assert runner.passes_library(OriginalStyle, "run", (1, 2)) is False
    # Too many arguments either way: nothing is gained by passing the library.
    assert runner.passes_library(OriginalStyle, "run", (1, 2, 3)) is False


def test_var_args_methods_get_no_library() -> None:
    assert runner.passes_library(VarArgs, "__init__", ()) is False
    assert runner.passes_library(VarArgs, "run", (1, 2)) is False


def test_class_attribute_forces_the_choice() -> None:
    assert runner.passes_library(ForcedOn, "__init__", (1,)) is True
    assert runner.passes_library(ForcedOn, "run", ()) is True
    assert runner.passes_library(ForcedOff, "__init__", ()) is False
    assert runner.passes_library(ForcedOff, "run", ()) is False


def test_class_without_init_gets_no_library() -> None:
    assert runner.passes_library(NoInit, "__init__", ()) is False


def test_method_without_signature_gets_no_library() -> None:
    class Builtin:
        run = max  # inspect.signature(max) raises ValueError

    assert runner.passes_library(Builtin, "run", (1,)) is False


def test_static_run_taking_the_library_gets_it() -> None:
    assert runner.passes_library(StaticRun, "run", (1,)) is True


# --- invoke -------------------------------------------------------------------------------


def test_invoke_function_always_passes_the_library_first() -> None:
    seen: list[tuple[Any, ...]] = []

    def fn(*args: Any) -> str:
        seen.append(args)
        return "done"

    loaded = runner.LoadedFunction("fn", 1, function_pb2.FUNCTION_KIND_FUNCTION, fn)
    assert runner.invoke(loaded, LIBRARY, (1, "two"), pinned=False) == "done"
    assert runner.invoke(loaded, LIBRARY, (), pinned=True) == "done"
    assert seen == [(LIBRARY, 1, "two"), (LIBRARY,)]


def test_invoke_guide_style_class() -> None:
    assert runner.invoke(_loaded(GuideStyle, (10,)), LIBRARY, (5,), pinned=False) == (15, 1)


def test_invoke_original_style_class_passes_library_to_init_and_run() -> None:
    result = runner.invoke(_loaded(OriginalStyle, (10,)), LIBRARY, (5,), pinned=False)
    assert result == (LIBRARY, LIBRARY, 15)


def test_invoke_decides_per_method() -> None:
    assert runner.invoke(_loaded(Mixed, (1,)), LIBRARY, (2,), pinned=False) == (LIBRARY, 3)


def test_invoke_forced_library() -> None:
    assert runner.invoke(_loaded(ForcedOn, (1,)), LIBRARY, (2,), pinned=False) == (
        LIBRARY,
        1,
        LIBRARY,
        2,
    )
    assert runner.invoke(_loaded(ForcedOff), LIBRARY, ("a",), pinned=False) == ("a", None)


def test_unpinned_class_gets_a_fresh_instance_per_call() -> None:
    loaded = _loaded(GuideStyle, (0,))
    results = [runner.invoke(loaded, LIBRARY, (i,), pinned=False) for i in range(3)]
    assert results == [(0, 1), (1, 1), (2, 1)]  # each instance saw one call
    assert GuideStyle.inits == 3
    assert loaded.instance is None


def test_pinned_class_reuses_one_instance() -> None:
    loaded = _loaded(GuideStyle, (100,))
    results = [runner.invoke(loaded, LIBRARY, (i,), pinned=True) for i in range(3)]
    assert results == [(100, 1), (101, 2), (102, 3)]
    assert GuideStyle.inits == 1
    assert isinstance(loaded.instance, GuideStyle)


def test_pinned_original_style_class_builds_with_library_once() -> None:
    loaded = _loaded(OriginalStyle, (1,))
    for _ in range(4):
        assert runner.invoke(loaded, LIBRARY, (1,), pinned=True) == (LIBRARY, LIBRARY, 2)
    assert OriginalStyle.inits == 1


def test_instantiate_uses_init_args() -> None:
    instance = runner.instantiate(_loaded(VarArgs, (1, 2)), LIBRARY)
    assert isinstance(instance, VarArgs)
    assert instance.init_args == (1, 2)


# --- load ---------------------------------------------------------------------------------


def _function(
    body: object, kind: function_pb2.FunctionKind.ValueType, init: tuple[Any, ...] = ()
) -> function_pb2.Function:
    return function_pb2.Function(
        name="f",
        body=serialize(body),
        kind=kind,
        init_arguments=[serialize(a) for a in init],
        version=3,
    )


def test_load_function() -> None:
    loaded = runner.load(_function(lambda lib, x: x + 1, function_pb2.FUNCTION_KIND_FUNCTION))
    assert loaded.name == "f"
    assert loaded.version == 3
    assert loaded.kind == function_pb2.FUNCTION_KIND_FUNCTION
    assert loaded.init_args == ()
    assert runner.invoke(loaded, LIBRARY, (1,), pinned=False) == 2


def test_load_class_with_init_arguments() -> None:
    loaded = runner.load(_function(GuideStyle, function_pb2.FUNCTION_KIND_CLASS, (7, "x")))
    assert loaded.target is GuideStyle
    assert loaded.init_args == (7, "x")


def test_load_rejects_class_without_run() -> None:
    with pytest.raises(InvalidArgumentError, match="'f' is registered as a class but has no run"):
        runner.load(_function(NoRun, function_pb2.FUNCTION_KIND_CLASS))


def test_load_rejects_non_class_registered_as_class() -> None:
    with pytest.raises(InvalidArgumentError, match="registered as a class"):
        runner.load(_function(lambda lib: None, function_pb2.FUNCTION_KIND_CLASS))


def test_load_rejects_non_callable() -> None:
    with pytest.raises(InvalidArgumentError, match="'f' is not callable"):
        runner.load(_function(42, function_pb2.FUNCTION_KIND_FUNCTION))

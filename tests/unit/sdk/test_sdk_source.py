from __future__ import annotations

import sys
import traceback
import types

import cloudpickle

from cloudburst import _source


def helper(x: int) -> int:
    if x < 0:
        raise ValueError("negative input")
    return x


def uses_helper(_: object, x: int) -> int:
    return helper(x) + 1


class Model:
    def run(self, x: int) -> int:
        return helper(x)


def by_value(obj: object) -> object:
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.loads(cloudpickle.dumps(obj))
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_by_value_code_loses_its_file_name_without_sources() -> None:
    loaded = by_value(uses_helper)
    assert isinstance(loaded, types.FunctionType)
    assert loaded.__code__.co_filename == "<dynamic-code>"


def test_restore_brings_back_file_names_and_source_lines_of_function_and_helpers() -> None:
    sources = _source.collect(uses_helper)
    assert [s.path for s in sources] == [__file__]
    assert "uses_helper:" + str(uses_helper.__code__.co_firstlineno) in sources[0].code_keys
    loaded = by_value(uses_helper)
    assert isinstance(loaded, types.FunctionType)
    _source.restore(loaded, sources)
    assert loaded.__code__.co_filename == __file__
    try:
        loaded(None, -1)
    except ValueError as exc:
        text = "".join(traceback.format_exception(exc))
    assert 'raise ValueError("negative input")' in text
    assert "return helper(x) + 1" in text


def test_restore_covers_class_methods() -> None:
    sources = _source.collect(Model)
    loaded = by_value(Model)
    assert isinstance(loaded, type)
    _source.restore(loaded, sources)
    assert loaded.run.__code__.co_filename == __file__  # type: ignore[attr-defined]


def test_restore_without_sources_changes_nothing() -> None:
    loaded = by_value(uses_helper)
    assert isinstance(loaded, types.FunctionType)
    _source.restore(loaded, [])
    assert loaded.__code__.co_filename == "<dynamic-code>"


def test_code_from_an_interactive_session_ships_no_source() -> None:
    namespace: dict[str, object] = {}
    exec(compile("def f(x):\n    return x\n", "<stdin-like>", "exec"), namespace)
    assert _source.collect(namespace["f"]) == []

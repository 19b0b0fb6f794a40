from __future__ import annotations

import sys
import traceback
import types

import cloudpickle

from cloudburst import sources


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
    shipped = sources.collect(uses_helper)
    assert [s.path for s in shipped] == [__file__]
    assert "uses_helper:" + str(uses_helper.__code__.co_firstlineno) in shipped[0].code_keys
    loaded = by_value(uses_helper)
    assert isinstance(loaded, types.FunctionType)
    sources.restore(loaded, shipped)
    assert loaded.__code__.co_filename == __file__
    try:
        loaded(None, -1)
    except ValueError as exc:
        text = "".join(traceback.format_exception(exc))
    assert 'raise ValueError("negative input")' in text
    assert "return helper(x) + 1" in text


def test_restore_covers_class_methods() -> None:
    shipped = sources.collect(Model)
    loaded = by_value(Model)
    assert isinstance(loaded, type)
    sources.restore(loaded, shipped)
    assert loaded.run.__code__.co_filename == __file__  # type: ignore[attr-defined]


def test_restore_without_sources_changes_nothing() -> None:
    loaded = by_value(uses_helper)
    assert isinstance(loaded, types.FunctionType)
    sources.restore(loaded, [])
    assert loaded.__code__.co_filename == "<dynamic-code>"


def test_code_from_an_interactive_session_ships_no_source() -> None:
    namespace: dict[str, object] = {}
    exec(compile("def f(x):\n    return x\n", "<stdin-like>", "exec"), namespace)
    assert sources.collect(namespace["f"]) == []

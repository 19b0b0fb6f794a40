"""The line between the SDK and the runtime, read from the source: imports only cross it one way.

The SDK (``cloudburst``) installs alone, so it imports nothing of the runtime;
the runtime, the benchmarks and the tests of anything but the SDK use only the
SDK's public modules, so the SDK's private ones can change freely.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SDK = ROOT / "sdk" / "python" / "cloudburst"
RUNTIME = [
    ROOT / "cloudburst_grpc",
    ROOT / "executors" / "cloudburst_executors",
    ROOT / "kvs" / "cloudburst_kvs",
]
RUNTIME_PACKAGES = ("cloudburst_grpc", "cloudburst_executors", "cloudburst_kvs")


def _imports(root: Path) -> Iterator[tuple[Path, str]]:
    """Every module imported under ``root``, as a dotted name (``from a import b`` gives a.b)."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module
                for alias in node.names:
                    yield path, f"{node.module}.{alias.name}"


def _private(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "cloudburst" and any(part.startswith("_") for part in parts[1:])


def test_the_runtime_imports_no_private_sdk_module() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for root in RUNTIME
        for path, name in _imports(root)
        if _private(name)
    ]
    assert found == []


#: Tests of the SDK itself, which may reach into its private modules.
SDK_TESTS = [
    ROOT / "tests" / "unit" / "sdk",
    ROOT / "tests" / "integration" / "test_loop_drivers.py",
    ROOT / "tests" / "integration" / "test_answer_streams_sdk.py",
    ROOT / "tests" / "integration" / "kvs" / "test_sdk_kvs_stream.py",
]


def test_only_the_sdk_tests_import_private_sdk_modules() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for root in (ROOT / "tests", ROOT / "bench")
        for path, name in _imports(root)
        if _private(name) and not any(path.is_relative_to(tests) for tests in SDK_TESTS)
    ]
    assert found == []


def test_the_sdk_imports_nothing_of_the_runtime() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, name in _imports(SDK)
        if name.split(".")[0] in RUNTIME_PACKAGES
    ]
    assert found == []


def test_the_checks_see_the_imports_they_look_for() -> None:
    names = {name for root in RUNTIME for _, name in _imports(root)}
    assert "cloudburst.streams.OutboxStream" in names
    assert _private("cloudburst._loop") and _private("cloudburst._core.Core")
    assert not _private("cloudburst.v1.value_pb2") and not _private("cloudburst_grpc._x")

"""The Go and TypeScript clients (sdk/go, sdk/typescript) against `cbgrpc serve`.

Each client's test program (sdk/go/examples/polyglot, sdk/typescript/test/polyglot.ts) calls a
DAG registered here from Python with JSON arguments, reads a stored result by its key, writes and
reads a KVS value, and checks the typed errors of an unknown DAG and of a result JSON cannot
carry. `make clients` builds the TypeScript program; the Go program is built here (Go caches it).
Without Go or Node the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from e2e.drivers import ROOT, go_build, ts_program
from harness import ServeProcess
from waiting import wait_until

DAG = "poly_pipeline"


def poly_total(_: object, payload: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(payload, dict), f"JSON arrived as {type(payload).__name__}"
    items = payload["items"]
    return {"label": payload["label"], "total": sum(items), "count": len(items)}


def poly_describe(_: object, summary: dict[str, Any]) -> dict[str, Any]:
    return {**summary, "language": "python"}


def poly_set(_: object) -> set[int]:
    return {1, 2}


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    """One `cbgrpc serve` (memory storage) with the test's functions and DAG registered."""
    proc = ServeProcess("--storage", "memory")
    try:
        with CloudburstConnection(proc.address) as cloud:
            cloud.register(poly_total, "poly_total")
            cloud.register(poly_describe, "poly_describe")
            cloud.register(poly_set, "poly_set")
            assert cloud.register_dag(
                DAG, ["poly_total", "poly_describe"], [("poly_total", "poly_describe")]
            ), cloud.last_error
        yield proc
    finally:
        proc.kill()


def _run(command: list[str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def _check(summary: dict[str, Any], label: str, address: str) -> None:
    want = {"label": label, "total": 6, "count": 3, "language": "python"}
    assert summary["direct"] == want
    assert summary["stored"] == want
    assert summary["unknown_dag_reason"] == "DAG_NOT_FOUND"
    assert summary["unencodable_reason"] == "SERIALIZATION_FAILED"
    with CloudburstConnection(address) as cloud:
        # The stored result was released by the client once read (the scheduler deletes
        # released results in batches, a moment later).
        wait_until(
            lambda: cloud.get_object(summary["stored_key"]) is None,
            "the stored result is deleted once released",
        )
        # What the client wrote as JSON reads as the natural Python value.
        assert cloud.get_object(summary["kvs_key"]) == summary["kvs_value"]
        assert cloud.get_object(summary["kvs_key"])["list"] == [1, "two", None, True]


def test_go_client_calls_a_python_dag_and_uses_the_kvs(
    server: ServeProcess, tmp_path: Path
) -> None:
    polyglot = go_build("./examples/polyglot", tmp_path)
    summary = _run([*polyglot, server.address, DAG], ROOT)
    _check(summary, "go", server.address)


def test_typescript_client_calls_a_python_dag_and_uses_the_kvs(server: ServeProcess) -> None:
    summary = _run([*ts_program("polyglot"), server.address, DAG], ROOT)
    _check(summary, "ts", server.address)


def test_results_of_other_languages_are_json_not_pickles(server: ServeProcess) -> None:
    """What a Go or TypeScript caller gets, seen through the generated Python stubs."""
    import grpc

    from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc, value_pb2

    json_only = [value_pb2.SERIALIZER_JSON]
    with grpc.insecure_channel(server.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        argument = value_pb2.Argument(
            value=value_pb2.Value(
                data=b'{"label": "x", "items": [2, 3]}', serializer=value_pb2.SERIALIZER_JSON
            )
        )
        request = scheduler_service_pb2.CallDagRequest(
            name=DAG, direct_response=True, accept_serializers=json_only
        )
        request.function_arguments["poly_total"].arguments.append(argument)
        response = stub.CallDag(request, timeout=60)
        assert response.response_key == ""  # nothing stored for a direct response
        assert response.outcome.value.serializer == value_pb2.SERIALIZER_JSON
        assert json.loads(response.outcome.value.data) == {
            "label": "x",
            "total": 5,
            "count": 2,
            "language": "python",
        }

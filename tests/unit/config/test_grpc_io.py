"""gRPC's I/O layer: chosen before grpc is imported, unless the user or an import decided."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from cloudburst import grpc_io
from harness import CbgrpcProcess


def _version(text: str) -> Callable[[], str]:
    return lambda: text


MEASURED = "{}.{}.0".format(*sorted(grpc_io.MEASURED_VERSIONS)[0])


def test_a_measured_grpcio_gets_the_polling_layer() -> None:
    environ: dict[str, str] = {}
    said = grpc_io.choose(environ, {}, _version(MEASURED))
    assert environ == {grpc_io.VARIABLE: grpc_io.POLLING}
    assert grpc_io.POLLING in said


@pytest.mark.parametrize("value", ["", "-event_engine_client", "some_experiment"])
def test_the_users_own_experiments_win(value: str) -> None:
    environ = {grpc_io.VARIABLE: value}
    said = grpc_io.choose(environ, {}, _version(MEASURED))
    assert environ == {grpc_io.VARIABLE: value}
    assert repr(value) in said


def test_nothing_is_set_once_grpc_is_imported() -> None:
    environ: dict[str, str] = {}
    said = grpc_io.choose(environ, {"grpc": object()}, _version(MEASURED))
    assert environ == {}
    assert "grpc was imported before cloudburst" in said


@pytest.mark.parametrize("version", ["1.84.0", "1.86.0", "2.0.0"])
def test_a_grpcio_it_was_not_measured_with_keeps_its_defaults(version: str) -> None:
    environ: dict[str, str] = {}
    said = grpc_io.choose(environ, {}, _version(version))
    assert environ == {}
    assert f"grpcio {version} is not one this choice was measured with" in said


def test_an_unreadable_version_keeps_the_defaults() -> None:
    environ: dict[str, str] = {}
    assert "unknown" in grpc_io.choose(environ, {}, _version("dev"))
    assert environ == {}


def _run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != grpc_io.VARIABLE}
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
    )
    assert run.returncode == 0, run.stderr
    assert "Unknown experiment" not in run.stderr
    return run.stdout.strip()


_SHOW = "import os; print(os.environ.get('GRPC_EXPERIMENTS'))"


@pytest.mark.skipif(
    grpc_io.POLLING not in grpc_io.choose({}, {}),
    reason="the installed grpcio is not one the choice was measured with",
)
def test_importing_cloudburst_first_chooses_for_the_process() -> None:
    assert _run(f"import cloudburst; {_SHOW}") == grpc_io.POLLING
    assert _run(f"import cloudburst_grpc; {_SHOW}") == grpc_io.POLLING
    assert _run(f"import grpc, cloudburst; {_SHOW}") == "None"
    assert _run(f"import cloudburst; {_SHOW}", GRPC_EXPERIMENTS="") == ""


def test_a_cbgrpc_process_logs_its_choice() -> None:
    process = CbgrpcProcess(
        "kvs", "--storage", "memory", "--log-level", "INFO", env={grpc_io.VARIABLE: ""}
    )
    try:
        line = process.wait_for_log("gRPC I/O:", timeout=30)
        assert f"{grpc_io.VARIABLE}=''" in line
    finally:
        process.stop()

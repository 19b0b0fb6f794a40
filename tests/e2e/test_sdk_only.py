"""The SDK installs alone: a fresh virtual environment with only ``pip install ./sdk/python``.

It must contain none of the server's packages, and run the user guide's
examples against a `cbgrpc serve` started from the full install.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import ROOT, ServeProcess

HERE = Path(__file__).resolve().parent
GUIDE = HERE / "data" / "function-execution.md"
SDK = ROOT / "sdk" / "python"

# The first test also builds the environment: pip may download the SDK's dependencies.
pytestmark = pytest.mark.timeout(600)

#: Distributions only the server needs (the root's dependencies beyond the SDK's).
SERVER_DISTRIBUTIONS = {
    "cloudburst-grpc",
    "greenlet",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-grpc",
    "opentelemetry-exporter-prometheus",
    "py-consul",
}
#: Modules only the server imports; none may be importable in the SDK's environment.
SERVER_MODULES = [
    "cloudburst_grpc",
    "cloudburst_executors",
    "cloudburst_kvs",
    "greenlet",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "opentelemetry",
    "opentelemetry.sdk",
    "opentelemetry.exporter.prometheus",
]

#: Prints, as JSON, which of the modules given as arguments can be imported, and where
#: ``cloudburst`` comes from.
PROBE = """
import importlib.util, json, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
import cloudburst
from cloudburst import CloudburstConnection
from cloudburst.client.client import CloudburstConnection as Original
assert Original is CloudburstConnection
print(json.dumps({
    "cloudburst": cloudburst.__file__,
    "importable": [name for name in sys.argv[1:] if found(name)],
}))
"""


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let the checkout leak in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="session")
def sdk_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The python of a fresh virtual environment where only the SDK is installed."""
    home = tmp_path_factory.mktemp("sdk-only")
    venv.EnvBuilder(with_pip=True).create(home / "venv")
    python = home / "venv" / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(SDK)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=home,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield python


def test_the_sdk_installs_without_the_server(sdk_python: Path) -> None:
    listed = subprocess.run(
        [str(sdk_python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=sdk_python.parent,
        env=_clean_env(),
        check=True,
    )
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert "cloudburst-grpc-sdk" in installed
    assert {"grpcio", "protobuf", "googleapis-common-protos", "cloudpickle"} <= installed
    assert installed & SERVER_DISTRIBUTIONS == set()

    probe = subprocess.run(
        [str(sdk_python), "-c", PROBE, *SERVER_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=sdk_python.parent,
        env=_clean_env(),
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    found = json.loads(probe.stdout)
    venv_dir = sdk_python.parent.parent
    assert Path(found["cloudburst"]).is_relative_to(venv_dir), found["cloudburst"]
    assert found["importable"] == []
    assert (Path(found["cloudburst"]).parent / "py.typed").is_file()


def test_the_user_guide_runs_from_the_sdk_alone(
    sdk_python: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    server = serve_process("--storage", "memory")
    text = GUIDE.read_text()
    assert "from cloudburst.client.client import CloudburstConnection" in text
    result = subprocess.run(
        [str(sdk_python), str(HERE / "guide_runner.py"), str(GUIDE), server.address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=sdk_python.parent,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # incr(1) -> 2, square(2) -> 4, register_dag -> True, call_dag(...).get() -> 4
    assert "guide ok: 4 outputs checked" in result.stdout
    assert server.stop() == 0

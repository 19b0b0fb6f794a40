"""The user guide's examples, run as written against a `cbgrpc serve` subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ServeProcess

HERE = Path(__file__).resolve().parent
GUIDE = HERE / "data" / "function-execution.md"


def run_guide(guide: Path, address: str) -> str:
    result = subprocess.run(
        [sys.executable, str(HERE / "guide_runner.py"), str(guide), address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "import_line",
    [
        "from cloudburst.client.client import CloudburstConnection",
        "from cloudburst import CloudburstConnection",
    ],
)
def test_guide_examples_run_as_written(
    serve_process: Callable[..., ServeProcess], tmp_path: Path, import_line: str
) -> None:
    server = serve_process("--storage", "memory")
    text = GUIDE.read_text()
    assert "from cloudburst.client.client import CloudburstConnection" in text
    guide = tmp_path / "guide.md"
    guide.write_text(
        text.replace("from cloudburst.client.client import CloudburstConnection", import_line)
    )
    output = run_guide(guide, server.address)
    # incr(1) -> 2, square(2) -> 4, register_dag -> True, call_dag(...).get() -> 4
    assert "guide ok: 4 outputs checked" in output
    assert server.stop() == 0

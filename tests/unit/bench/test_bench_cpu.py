"""The bench's CPU accounting counts a process and the processes it started."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from bench.procs import cpu_seconds

#: A child that starts a grandchild; the grandchild burns CPU, then both wait for stdin's end.
PARENT = textwrap.dedent(
    """
    import subprocess, sys
    burner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\\n"
         "while time.process_time() < 0.3: pass\\n"
         "print('burnt', flush=True)\\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    print(burner.pid, burner.stdout.readline().strip(), flush=True)
    sys.stdin.read()
    burner.stdin.close()
    burner.wait(30)
    """
)


def test_cpu_seconds_counts_descendants_and_not_gone_processes() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        grandchild, state = parent.stdout.readline().split()
        assert state == "burnt"
        # The grandchild alone used 0.3 s (counted in clock ticks: allow one tick and more).
        assert cpu_seconds([int(grandchild)]) >= 0.25
        assert cpu_seconds([parent.pid]) >= 0.25
    finally:
        parent.communicate(timeout=30)
    assert cpu_seconds([parent.pid]) == 0.0  # gone: counted as nothing

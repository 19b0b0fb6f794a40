"""malloc tuning for large values: applied on glibc, left alone when the user set it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cloudburst import malloc


@pytest.mark.parametrize(
    "variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"]
)
def test_the_users_own_malloc_settings_win(variable: str) -> None:
    assert malloc.tune({variable: "131072"}) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_are_set_on_glibc() -> None:
    assert malloc.tune({}) is True


_HELD_AFTER_FREE = """
from cloudburst import malloc

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

malloc.tune({})
chunks, pins = [], []
for n in range(256):
    chunks.append(bytes([n]) * (1 << 20))  # under the mmap threshold: from the heap
    pins.append(bytes([n]) * 4096)  # in use above each chunk, so the heap's top stays busy
before = rss_mib()
del chunks
freed = rss_mib()
released = malloc.trim()
print(before, freed, rss_mib(), released)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_gives_freed_heap_memory_back() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _HELD_AFTER_FREE], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    before, freed, trimmed, released = run.stdout.split()
    assert released == "True"
    assert int(trimmed) < int(before) - 200, (before, freed, trimmed)

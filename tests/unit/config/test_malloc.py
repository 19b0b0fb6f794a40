"""malloc tuning for large values: applied on glibc, left alone when the user set it."""

from __future__ import annotations

import platform

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

"""CPU lists for server.cpus / --cpus, and the checks made before pinning."""

from __future__ import annotations

import os

import pytest

from cloudburst_grpc.affinity import format_cpus, parse_cpus, pin
from cloudburst_grpc.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", {0}),
        ("3", {3}),
        ("0-3", {0, 1, 2, 3}),
        ("0,2,4-5", {0, 2, 4, 5}),
        (" 1, 3 ", {1, 3}),
        ("2-2", {2}),
    ],
)
def test_cpu_lists_parse_like_taskset(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a CPU list"),
        ("a", "not a CPU list"),
        ("1,", "not a CPU list"),
        ("-1", "not a CPU list"),
        ("1-", "not a CPU list"),
        ("3-1", "runs backwards"),
    ],
)
def test_malformed_cpu_lists_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_cpus(text)


def test_cpu_sets_format_as_compact_lists() -> None:
    assert format_cpus({0, 1, 2, 5}) == "0-2,5"
    assert format_cpus({4}) == "4"
    assert format_cpus({1, 3, 4}) == "1,3-4"
    assert format_cpus(set()) == ""


def test_the_config_rejects_a_malformed_list_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"server\.cpus: 'zero' is not a CPU list"):
        load_config(environ={"CBGRPC_SERVER_CPUS": "zero"})
    assert load_config(environ={"CBGRPC_SERVER_CPUS": "0-1"}).server.cpus == "0-1"
    assert load_config(environ={}).server.cpus == ""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_pinning_to_a_cpu_that_does_not_exist_is_refused_unchanged() -> None:
    before = os.sched_getaffinity(0)
    beyond = (os.cpu_count() or 1) + 1000
    with pytest.raises(ValueError, match=f"CPU {beyond} does not exist on this machine"):
        pin(f"0,{beyond}")
    assert os.sched_getaffinity(0) == before

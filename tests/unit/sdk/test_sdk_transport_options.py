"""The channel options every connection shares: how long a ping may go unanswered."""

from __future__ import annotations

import pytest

from cloudburst.errors import InvalidArgumentError
from cloudburst.transport import (
    KEEPALIVE_MS,
    KEEPALIVE_TIMEOUT_MS,
    PING_TIMEOUT_ENV,
    channel_options,
    ping_timeout_ms,
    server_options,
)


def test_the_ping_timeout_is_the_default_unless_the_environment_sets_it() -> None:
    assert ping_timeout_ms({}) == KEEPALIVE_TIMEOUT_MS
    assert ping_timeout_ms({PING_TIMEOUT_ENV: " "}) == KEEPALIVE_TIMEOUT_MS
    assert ping_timeout_ms({PING_TIMEOUT_ENV: "30"}) == 30_000
    assert ping_timeout_ms({PING_TIMEOUT_ENV: "0.5"}) == 500


@pytest.mark.parametrize("raw", ["soon", "0", "-1", "nan", "inf", "1e9"])
def test_a_malformed_ping_timeout_is_refused_with_its_name(raw: str) -> None:
    with pytest.raises(InvalidArgumentError, match=PING_TIMEOUT_ENV):
        ping_timeout_ms({PING_TIMEOUT_ENV: raw})


def test_both_ping_timeouts_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PING_TIMEOUT_ENV, "20")
    options = dict(channel_options(1024))
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.ping_timeout_ms"] == 20_000


def test_servers_permit_the_pings_clients_send() -> None:
    client = dict(channel_options(1024))
    server = dict(server_options(1024))
    assert client["grpc.keepalive_time_ms"] == KEEPALIVE_MS
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= KEEPALIVE_MS

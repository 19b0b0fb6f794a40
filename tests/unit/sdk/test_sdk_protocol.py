"""The wire protocol version: where it comes from and how a user agent carries it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudburst.errors import InvalidArgumentError, ProtocolMismatchError
from cloudburst.protocol import (
    CLIENT_KEY,
    PROTOCOL_ENV,
    PROTOCOL_VERSION,
    SERVER_KEY,
    protocol_version,
    refused_by,
    user_agent,
    version_in,
)


def test_the_version_is_the_constant_unless_the_environment_sets_it() -> None:
    assert protocol_version({}) == PROTOCOL_VERSION
    assert protocol_version({PROTOCOL_ENV: " "}) == PROTOCOL_VERSION
    assert protocol_version({PROTOCOL_ENV: "7"}) == 7
    assert protocol_version({PROTOCOL_ENV: "0"}) == 0


@pytest.mark.parametrize("raw", ["two", "-1", "1.5", "1234567890"])
def test_a_malformed_version_is_refused_with_its_name(raw: str) -> None:
    with pytest.raises(InvalidArgumentError, match=PROTOCOL_ENV):
        protocol_version({PROTOCOL_ENV: raw})


def test_a_user_agent_carries_the_version_as_a_product_token() -> None:
    assert version_in(f"{user_agent(3)} grpc-python-asyncio/1.85.4 grpc-c/58.0.0") == 3
    assert version_in(f"grpc-go/1.70.0 {user_agent(12)}") == 12
    assert version_in(user_agent()) == protocol_version()


@pytest.mark.parametrize(
    "agent",
    [
        "",
        "grpc-python/1.85.4 grpc-c/58.0.0 (linux; chttp2)",
        "grpcurl/v1.9.1 grpc-go/1.61.0",
        "my-cloudburst-protocol/3",
        "cloudburst-protocol/",
        "cloudburst-protocol/3x",
    ],
)
def test_a_user_agent_without_the_token_carries_no_version(agent: str) -> None:
    assert version_in(agent) is None


def test_the_refused_side_names_the_peer_both_versions_and_what_to_do() -> None:
    error = ProtocolMismatchError("refused", {SERVER_KEY: "2", CLIENT_KEY: "1"})
    text = refused_by("the KVS at 10.0.0.5:7700", error)
    assert text.startswith("the KVS at 10.0.0.5:7700 speaks cloudburst-grpc wire protocol 2")
    assert "this process, which speaks 1" in text
    assert "docs/operations.md#upgrades" in text


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("sdk/go/cloudburst/transport.go", r"^const ProtocolVersion = (\d+)$"),
        ("sdk/typescript/src/transport.ts", r"^export const PROTOCOL_VERSION = (\d+);$"),
    ],
)
def test_the_go_and_typescript_clients_speak_this_release_s_version(
    path: str, pattern: str
) -> None:
    source = (Path(__file__).resolve().parents[3] / path).read_text()
    found = re.findall(pattern, source, re.MULTILINE)
    assert found == [str(PROTOCOL_VERSION)], f"{path} must speak version {PROTOCOL_VERSION}"

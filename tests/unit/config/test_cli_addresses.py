"""`cbgrpc` refuses a peer address that is not HOST:PORT when it parses its arguments."""

from __future__ import annotations

import pytest

from cloudburst_grpc.cli import build_parser


@pytest.mark.parametrize(
    "address", ["10.0.0.5:7601", "kvs.internal:7601", "[::1]:7601", "localhost:1"]
)
def test_host_port_addresses_are_taken(address: str) -> None:
    args = build_parser().parse_args(["scheduler", "--kvs", address, "--executor", address])
    assert (args.kvs, args.executor_addresses) == (address, [address])


@pytest.mark.parametrize(
    "address", ["nonsense", "host:notaport", ":80", "[]:80", "host:0", "host:65536", "host:"]
)
@pytest.mark.parametrize("command", ["executor", "scheduler"])
def test_other_addresses_are_refused_saying_what_is_expected(
    address: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--kvs", address])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --kvs: expected HOST:PORT" in error
    assert repr(address) in error


def test_an_executor_address_that_is_not_host_port_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scheduler", "--executor", "10.0.0.5"])
    assert "argument --executor: expected HOST:PORT" in capsys.readouterr().err

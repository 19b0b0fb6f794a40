"""The development CA: role URIs, host names, validity and private key files."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from cloudburst_grpc.cli import main
from cloudburst_grpc.security.certs import create_bundle, create_ca, issue
from cloudburst_grpc.security.identity import role_from_uri


def sans(pem: bytes) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_a_service_certificate_names_its_role_its_role_host_and_the_hosts() -> None:
    ca = create_ca()
    leaf = issue(ca, "executor", ["10.0.0.7", "node7.example"])
    names = sans(leaf.cert_pem)
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://cloudburst.local/role/executor"]
    assert role_from_uri(uris[0]) == "executor"
    assert set(names.get_values_for_type(x509.DNSName)) == {
        "executor.cloudburst.local",
        "node7.example",
    }
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_a_certificate_chains_to_its_ca_and_not_to_another() -> None:
    ca = create_ca()
    leaf = x509.load_pem_x509_certificate(issue(ca, "scheduler", ["127.0.0.1"]).cert_pem)
    now = datetime.datetime.now(datetime.UTC)

    def verifier(ca_pem: bytes):  # type: ignore[no-untyped-def]
        store = Store(x509.load_pem_x509_certificates(ca_pem))
        return (
            PolicyBuilder()
            .store(store)
            .time(now)
            .build_server_verifier(x509.DNSName("scheduler.cloudburst.local"))
        )

    verifier(ca.cert_pem).verify(leaf, [])
    with pytest.raises(VerificationError):
        verifier(create_ca().cert_pem).verify(leaf, [])


def test_negative_days_give_an_expired_certificate() -> None:
    cert = x509.load_pem_x509_certificate(issue(create_ca(), "admin", days=-1).cert_pem)
    assert cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown role 'root'"):
        issue(create_ca(), "root")


def test_cbgrpc_certs_writes_private_keys_for_the_owner_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", str(directory), "--host", "10.1.2.3", "--client", "invoker"]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert {"ca.pem", "ca-key.pem", "scheduler.pem", "executor-key.pem"} <= written
    assert {"client-invoker.pem", "client-invoker-key.pem", "kvs.pem", "serve.pem"} <= written
    for key in directory.glob("*-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    names = sans((directory / "kvs.pem").read_bytes())
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    # A second run reuses the CA, so earlier certificates stay valid.
    ca_before = (directory / "ca.pem").read_bytes()
    assert main(["certs", str(directory)]) == 0
    assert (directory / "ca.pem").read_bytes() == ca_before


def test_create_bundle_refuses_a_service_role_as_client(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown client role"):
        create_bundle(tmp_path, [], ["scheduler"])

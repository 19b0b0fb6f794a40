"""Tokens: salted hashes, the tokens file, rotation without a restart, `cbgrpc token`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudburst_grpc.cli import main
from cloudburst_grpc.security.tokens import (
    TokenFileError,
    TokenStore,
    hash_token,
    parse_tokens,
    verify_token,
)


def test_a_hash_verifies_its_token_only_and_is_salted() -> None:
    stored = hash_token("secret-1", iterations=1000)
    assert verify_token("secret-1", stored)
    assert not verify_token("secret-2", stored)
    assert "secret-1" not in stored
    assert hash_token("secret-1", iterations=1000) != stored


def test_a_malformed_line_is_named_without_its_content(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"tokens:2: not a token hash") as raised:
        parse_tokens("# comment\nadmin cleartext-token-here\n", "tokens")
    assert "cleartext-token-here" not in str(raised.value)
    with pytest.raises(TokenFileError, match="unknown role 'root'"):
        parse_tokens(f"root {hash_token('x', iterations=1)}", "tokens")


def test_several_tokens_at_once_and_rotation_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        f"admin {hash_token('a', iterations=1000)} ops\n"
        f"invoker {hash_token('b', iterations=1000)}\n"
    )
    store = TokenStore(path)
    admin = store.lookup("a")
    assert admin is not None and (admin.role, admin.name) == ("admin", "ops")
    assert store.cached("a") == admin
    invoker = store.lookup("b")
    assert invoker is not None and (invoker.role, invoker.name) == ("invoker", "line 2")
    assert store.lookup("c") is None
    path.write_text(f"invoker-restricted {hash_token('c', iterations=1000)}\n")
    assert store.cached("a") is None  # the change is seen at the next use
    assert store.lookup("a") is None
    restricted = store.lookup("c")
    assert restricted is not None and restricted.role == "invoker-restricted"


def test_a_broken_rewrite_keeps_the_tokens_in_force(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"admin {hash_token('a', iterations=1000)}\n")
    store = TokenStore(path)
    path.write_text("admin half-written")
    entry = store.lookup("a")
    assert entry is not None and entry.role == "admin"


def test_cbgrpc_token_prints_a_token_and_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "invoker", "--name", "ci"]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    line = captured.err.strip().removeprefix("add to the tokens file: ")
    (entry,) = parse_tokens(line, "stderr")
    assert (entry.role, entry.name) == ("invoker", "ci")
    assert verify_token(token, entry.hashed)
    assert token not in captured.err

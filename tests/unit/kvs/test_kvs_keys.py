"""Key rules of the KVS: not empty, at most MAX_KEY_BYTES of UTF-8."""

from __future__ import annotations

import pytest

from cloudburst.errors import InvalidArgumentError
from cloudburst_kvs.store import MAX_KEY_BYTES, check_key


@pytest.mark.parametrize("key", ["k", "x" * MAX_KEY_BYTES, "é" * (MAX_KEY_BYTES // 2)])
def test_keys_up_to_the_limit_pass(key: str) -> None:
    check_key(key)


@pytest.mark.parametrize(
    "key",
    ["x" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1), "x" * (15 * 1024 * 1024)],
    ids=["one-byte-over", "multibyte-over", "15-mib"],
)
def test_a_key_over_the_limit_is_refused_with_a_short_message(key: str) -> None:
    with pytest.raises(
        InvalidArgumentError, match=f"over the limit of {MAX_KEY_BYTES} bytes"
    ) as info:
        check_key(key, what="keys[3]")
    assert info.value.metadata == {"field": "keys[3]", "limit": str(MAX_KEY_BYTES)}
    # The error quotes the key's start, never the whole key.
    assert len(str(info.value)) < 300


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="must not be empty"):
        check_key("")

"""References to KVS keys, passed as function arguments."""

from __future__ import annotations


class CloudburstReference:
    """Stands for the value stored at ``key``; the runtime reads it before the call.

    A missing key is passed as None. (A :class:`~cloudburst.future.CloudburstFuture`
    passed as an argument instead waits until its result exists.)
    """

    def __init__(self, key: str, deserialize: bool = True) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"a reference needs a non-empty string key, not {key!r}")
        self.key = key
        self.deserialize = deserialize

    def __repr__(self) -> str:
        return f"CloudburstReference({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CloudburstReference) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("CloudburstReference", self.key))

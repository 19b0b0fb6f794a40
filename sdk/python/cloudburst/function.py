"""Handles to registered functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudburst.connection import CloudburstConnection
    from cloudburst.future import CloudburstFuture


class CloudburstFunction:
    """A registered function; calling it returns a :class:`~cloudburst.future.CloudburstFuture`."""

    def __init__(self, name: str, connection: CloudburstConnection) -> None:
        self.name = name
        self._connection = connection

    def __call__(self, *args: Any) -> CloudburstFuture:
        """Call the function with ``args`` (after the user library)."""
        return self._connection.exec_func(self.name, args)

    def __repr__(self) -> str:
        return f"CloudburstFunction({self.name!r})"

"""The original system's module path for :class:`CloudburstConnection`."""

from cloudburst.connection import CloudburstConnection

__all__ = ["CloudburstConnection"]

"""The original system's module path for :class:`CloudburstFuture`."""

from cloudburst.future import CloudburstFuture

__all__ = ["CloudburstFuture"]

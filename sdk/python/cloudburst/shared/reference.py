"""The original system's module path for :class:`CloudburstReference`."""

from cloudburst.reference import CloudburstReference

__all__ = ["CloudburstReference"]

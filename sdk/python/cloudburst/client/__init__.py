"""The original system's import path: ``from cloudburst.client.client import CloudburstConnection``."""

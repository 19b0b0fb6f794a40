"""The original system's import path, ``cloudburst.client.client``."""

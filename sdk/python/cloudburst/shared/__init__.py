"""The original system's ``cloudburst.shared`` import paths."""

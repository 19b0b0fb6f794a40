"""The cloudburst-grpc runtime: CLI, configuration, composition and shared server plumbing."""

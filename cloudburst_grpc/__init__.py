"""The cloudburst-grpc runtime: CLI, configuration, composition and shared server plumbing."""

# Before anything imports grpc: the SDK chooses gRPC's I/O layer as it is imported.
import cloudburst.grpc_io  # noqa: F401

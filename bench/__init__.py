"""cloudburst-grpc's benchmarks (``python -m bench.run``; see bench/README.md).

Imported first by every bench process, the floor's servers included, so that
they all use the gRPC I/O layer the product chooses (cloudburst.grpc_io): the
floor is then bare gRPC as the product runs it.
"""

import cloudburst.grpc_io  # noqa: F401

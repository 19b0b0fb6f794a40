"""The cloudburst Python SDK: stateful functions and DAGs over gRPC.

>>> from cloudburst import CloudburstConnection
>>> cloud = CloudburstConnection("127.0.0.1")
>>> incr = cloud.register(lambda _, a: a + 1, "incr")
>>> incr(1).get()
2
"""

# First: it chooses gRPC's I/O layer, which gRPC reads once, as it is imported.
from cloudburst import grpc_io  # noqa: F401
from cloudburst.connection import CloudburstConnection
from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    DagNotFoundError,
    FunctionNotFoundError,
    InvalidDagError,
    PayloadTooLargeError,
    RemoteFunctionError,
    SerializationError,
)
from cloudburst.function import CloudburstFunction
from cloudburst.future import CloudburstFuture
from cloudburst.reference import CloudburstReference

__all__ = [
    "CloudburstConnection",
    "CloudburstError",
    "CloudburstFunction",
    "CloudburstFuture",
    "CloudburstReference",
    "CloudburstTimeoutError",
    "DagNotFoundError",
    "FunctionNotFoundError",
    "InvalidDagError",
    "PayloadTooLargeError",
    "RemoteFunctionError",
    "SerializationError",
]

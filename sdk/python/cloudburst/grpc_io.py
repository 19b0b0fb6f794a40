"""Which I/O layer gRPC uses in this process: chosen before gRPC is imported.

gRPC's C core moves bytes with one of two I/O layers. Since grpcio 1.6x its
default for sockets is the EventEngine, which runs every read and write on a
pool of its own threads and hands each completion over to the thread that
polls for ``grpc.aio``. The older polling layer reads and writes on the poller
thread itself. For the small messages of a call's hops the handover costs more
than the work: on a bare ``grpc.aio`` stream between two processes, one
message and its echo took 0.44 ms with the EventEngine and 0.24 ms without
(grpcio 1.85, Python 3.11, loopback), and calls on a process cluster took
15-20% less time and CPU (paired runs, alternating between the two settings).

So, as the first thing it does, a process that imports :mod:`cloudburst` (every
``cbgrpc`` process, and a client) asks gRPC for the polling layer, through
gRPC's documented ``GRPC_EXPERIMENTS`` variable, which gRPC reads once, when it
is imported. It is asked only

- when the environment does not set ``GRPC_EXPERIMENTS`` itself: whatever it
  says wins (an empty value keeps gRPC's defaults);
- when ``grpc`` is not imported yet (later, the request would not take effect);
- for the grpcio versions in :data:`MEASURED_VERSIONS`, whose polling layer
  was measured and tested with this project. Another version keeps its own
  defaults, so an upgrade of grpcio never starts with an experiment it does not
  know.

The variable stays set, so processes this one starts make the same choice.
:data:`CHOICE` says what this process chose.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping

#: gRPC's variable that turns its experiments on (``name``) and off (``-name``).
VARIABLE = "GRPC_EXPERIMENTS"
#: Socket I/O on the poller thread: gRPC's EventEngine off for clients and listeners.
POLLING = "-event_engine_client,-event_engine_listener"
#: grpcio versions (major, minor) this choice was measured and tested with.
MEASURED_VERSIONS = frozenset({(1, 85)})


def _grpcio_version() -> str:
    return importlib.metadata.version("grpcio")


def choose(
    environ: MutableMapping[str, str] = os.environ,
    modules: Mapping[str, object] = sys.modules,
    version: Callable[[], str] = _grpcio_version,
) -> str:
    """Ask gRPC for its polling I/O layer if nothing else decided; say what was decided."""
    if VARIABLE in environ:
        return f"gRPC's experiments as {VARIABLE}={environ[VARIABLE]!r} sets them"
    if "grpc" in modules:
        return "gRPC's default I/O (grpc was imported before cloudburst)"
    try:
        found = version()
        major, minor = (int(part) for part in found.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "gRPC's default I/O (the grpcio version is unknown)"
    if (major, minor) not in MEASURED_VERSIONS:
        return f"gRPC's default I/O (grpcio {found} is not one this choice was measured with)"
    environ[VARIABLE] = POLLING
    return f"gRPC's polling I/O ({VARIABLE}={POLLING})"


#: What this process chose, at its first import of :mod:`cloudburst`.
CHOICE = choose()

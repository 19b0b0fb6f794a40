"""Wiring of the KVS into a server, used by the composition roots and the tests."""

from __future__ import annotations

import grpc

from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc
from cloudburst_grpc.config import ConfigError, KvsConfig
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.servicer import KvsServicer
from cloudburst_kvs.storage import open_engine
from cloudburst_kvs.store import LatticeStore

#: The full name of the KVS gRPC service, for health and reflection.
SERVICE_NAME: str = kvs_service_pb2.DESCRIPTOR.services_by_name["KvsService"].full_name


def open_store(kvs_config: KvsConfig, max_payload_bytes: int) -> LatticeStore:
    """Create (not start) the in-process store the configuration describes.

    Args:
        kvs_config: Engine, data directory and sync mode.
        max_payload_bytes: The most user data one key may hold after a merge.

    Raises:
        ConfigError: The engine is not one of a store in this process (``valkey``).
        kvs.storage.StorageError: The SQLite database cannot be opened.
    """
    if kvs_config.engine == "valkey":
        raise ConfigError(
            "kvs.engine 'valkey' serves only `cbgrpc kvs` processes; `cbgrpc serve` keeps its "
            "data in memory or SQLite"
        )
    engine = open_engine(kvs_config.engine, kvs_config.data_dir, kvs_config.sync)
    return LatticeStore(
        engine, max_lattice_bytes=max(max_payload_bytes, kvs_config.max_value_bytes)
    )


def open_backend(kvs_config: KvsConfig, max_payload_bytes: int) -> LatticeBackend:
    """Create (not start) the store of a KVS process: in-process, or over Valkey.

    Raises:
        kvs.storage.StorageError: The SQLite database cannot be opened.
        cloudburst.errors.InvalidArgumentError: ``kvs.valkey_url`` is malformed.
    """
    if kvs_config.engine == "valkey":
        # Imported here: only the Valkey engine needs the Valkey client.
        from cloudburst_kvs.valkey_store import ValkeyStore

        return ValkeyStore(
            kvs_config.valkey_url,
            durable_writes=kvs_config.durable_writes,
            operation_timeout=kvs_config.engine_timeout_seconds,
            max_lattice_bytes=max(max_payload_bytes, kvs_config.max_value_bytes),
        )
    return open_store(kvs_config, max_payload_bytes)


def add_kvs_to_server(
    server: grpc.aio.Server,
    store: LatticeBackend,
    kvs_config: KvsConfig,
    max_payload_bytes: int,
) -> KvsServicer:
    """Register the KvsService, serving ``store``, on a (not yet started) server; return it.

    Call its ``end_streams`` at shutdown, before the server stops.
    """
    servicer = KvsServicer(store, kvs_config, max_payload_bytes)
    kvs_service_pb2_grpc.add_KvsServiceServicer_to_server(servicer, server)
    return servicer


__all__ = ["SERVICE_NAME", "add_kvs_to_server", "open_backend", "open_store"]

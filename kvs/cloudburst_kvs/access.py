"""The KVS as the scheduler and executors reach it: :class:`KvsAccess` adapters.

- :class:`InProcessKvs`: a store in this process (``cbgrpc serve``), no
  serialization and no network.
- :class:`KvsEndpoint`: where the KVS tier is, a fixed address or the passing
  instances Consul knows; the channel follows the instances as they come and go.
- :class:`EndpointKvs`: :class:`KvsAccess` over a :class:`KvsEndpoint`, through
  :class:`~cloudburst_kvs.client.KvsClient`.

The composition root (``cloudburst_grpc.local``) picks one per deployment shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from cloudburst import protocol
from cloudburst.chunks import Stored
from cloudburst.errors import ProtocolMismatchError, UnavailableError
from cloudburst.rpc import UNAVAILABLE_HINT, new_request_id
from cloudburst.v1 import lattice_pb2
from cloudburst_grpc.config import Config
from cloudburst_grpc.discovery.consul import Instance, ServiceWatch
from cloudburst_grpc.kvs_access import USER
from cloudburst_grpc.security.identity import KVS
from cloudburst_grpc.security.tls import CertificateSource
from cloudburst_grpc.server import IDLE_SECONDS, RetiredChannels, peer_channel
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.client import KvsClient

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long an instance found unreachable is passed over while others pass.
SET_ASIDE_SECONDS = 10.0


class InProcessKvs:
    """:class:`KvsAccess` served by a store in this process: no serialization, no network.

    The store is any :class:`~cloudburst_kvs.backend.LatticeBackend`; ``cbgrpc serve``
    passes its memory or SQLite store.
    """

    def __init__(self, store: LatticeBackend, max_wait_seconds: float) -> None:
        self._store = store
        self._max_wait = max_wait_seconds

    async def get(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice | None:
        """Read a key, optionally waiting for it."""
        if wait:
            return await self._store.wait_for(
                keyspace, key, self._max_wait if timeout is None else timeout
            )
        return await self._store.read(keyspace, key)

    async def get_stored(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Stored | None:
        """Read a key as :meth:`get` does (the store's lattice: no copy in one process)."""
        return await self.get(key, keyspace, wait=wait, timeout=timeout)

    async def get_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> dict[str, lattice_pb2.Lattice | None]:
        """Read several keys at once."""
        return dict(zip(keys, await self._store.read_many(keyspace, keys), strict=True))

    async def put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
    ) -> None:
        """Merge a lattice durably."""
        await self._store.put(keyspace, key, lattice)

    async def delete(self, key: str, keyspace: lattice_pb2.Keyspace.ValueType = USER) -> bool:
        """Delete a key."""
        return await self._store.delete(keyspace, key)

    async def delete_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> int:
        """Delete several keys."""
        return await self._store.delete_many(keyspace, keys)

    async def watch_keys(
        self, prefix: str, keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[str]:
        """Yield "" once watching, then each changed key under ``prefix``."""
        subscription = await self._store.subscribe(keyspace, prefix=prefix)
        try:
            yield ""
            async for event in subscription:
                yield event.key
        finally:
            await subscription.aclose()

    async def watch_values(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[tuple[str, lattice_pb2.Lattice | None]]:
        """Yield ``("", None)`` once watching, then each change: the key and its lattice after it.

        A deleted key comes with None. Both storage engines watch keys by name.
        """
        subscription = await self._store.subscribe(keyspace, keys=keys)
        try:
            yield "", None
            async for event in subscription:
                yield event.key, None if event.deleted else event.lattice
        finally:
            await subscription.aclose()

    async def list_keys(
        self, prefix: str = "", keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> list[str]:
        """List keys by prefix, every page."""
        keys: list[str] = []
        token = ""
        while True:
            page, token = await self._store.list_page(keyspace, prefix, 1000, token)
            keys.extend(page)
            if not token:
                return keys


class KvsEndpoint:
    """Where the KVS tier is: a fixed address, or the passing instances Consul knows.

    With discovery, the channel follows the instances: when the one in use
    leaves, the next call goes to another. An instance that a call found
    unreachable is set aside for :data:`SET_ASIDE_SECONDS` while others pass,
    so callers move on at once instead of waiting for Consul's health check to
    fail it. Only instances of this process's release are used (their Consul
    meta names its wire protocol version, or none); when only instances of
    other releases pass, calls fail with ProtocolMismatchError naming them.
    """

    def __init__(
        self,
        config: Config,
        address: str | None,
        watch: ServiceWatch | None,
        *,
        tls: CertificateSource | None = None,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        if address is None and watch is None:
            raise ValueError("a KVS endpoint needs an address or a Consul watch")
        self._config = config
        self._tls = tls
        self._fixed = address
        self._watch = watch
        self._idle_seconds = idle_seconds
        self._address: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._client: KvsClient | None = None
        self._retired = RetiredChannels("the KVS tier")
        """Channels to earlier instances or of earlier certificates, closed once idle."""
        self._retired_clients: set[KvsClient] = set()
        """The clients of those channels, until their channel closes."""
        self._set_aside: dict[str, float] = {}
        self._generation = 0
        self._logged_releases: set[str] = set()
        """The accounts of instances of other releases already logged."""

    @property
    def retired(self) -> int:
        """How many replaced channels are still open."""
        return len(self._retired)

    async def retired_closed(self) -> None:
        """Wait until the replaced channels open now have closed."""
        await self._retired.closed()

    async def channel(self) -> grpc.aio.Channel:
        """The channel to a current KVS instance (waits for one to be known)."""
        if self._fixed is not None:
            address = self._fixed
        else:
            assert self._watch is not None
            instances = self._of_this_release(
                self._watch.instances or await self._watch.wait_for(bool, 30.0)
            )
            now = time.monotonic()
            addresses = [
                i.address for i in instances if self._set_aside.get(i.address, 0.0) <= now
            ] or [i.address for i in instances]
            address = self._address if self._address in addresses else addresses[0]
        # A channel keeps the certificate it was made with: after a change, make a new one.
        generation = self._tls.poll() if self._tls is not None else 0
        if address != self._address or self._channel is None or generation != self._generation:
            if self._channel is not None:
                # The client's stream ends once its ops are answered; the channel, and
                # the client with it, go once no call has used it for the idle time.
                then = None
                if (retired := self._client) is not None:
                    retired.retire()
                    self._retired_clients.add(retired)

                    async def then() -> None:
                        self._retired_clients.discard(retired)
                        await retired.close()

                self._retired.retire(self._channel, then)
                if address != self._address:
                    logger.info("KVS moved from %s to %s", self._address, address)
            self._address = address
            self._generation = generation
            self._channel = peer_channel(
                address, self._config.server.max_payload_bytes, self._tls, KVS, self._idle_seconds
            )
            self._client = KvsClient(
                self._channel,
                name=f"the KVS at {address}",
                max_message_bytes=self._config.server.max_payload_bytes,
            )
        return self._channel

    def _of_this_release(self, instances: list[Instance]) -> list[Instance]:
        """The instances of this process's release among ``instances`` (which are not empty).

        Raises:
            ProtocolMismatchError: All of them are of other releases; the error names them.
        """
        ours = [i for i in instances if protocol.same_release(i.meta)]
        if ours:
            return ours
        version = protocol.protocol_version()
        found = ", ".join(
            f"{i.service_id} at {i.address} speaks {i.meta[protocol.META_KEY]}"
            for i in sorted(instances, key=lambda i: i.service_id)
        )
        message = (
            f"Consul knows no passing KVS of this process's cloudburst-grpc wire protocol "
            f"{version}, only of other releases ({found}); {protocol.ADVICE}"
        )
        if message not in self._logged_releases and len(self._logged_releases) < 64:
            self._logged_releases.add(message)
            logger.error("%s", message)
        versions = sorted({i.meta[protocol.META_KEY] for i in instances})
        raise ProtocolMismatchError(
            message,
            {protocol.SERVER_KEY: ",".join(versions), protocol.CLIENT_KEY: str(version)},
        )

    @property
    def address(self) -> str:
        """The address of the KVS instance in use ("the KVS tier" before one is chosen)."""
        return self._address or self._fixed or "the KVS tier"

    async def resolved_address(self) -> str:
        """The address of the KVS instance in use (waits for one to be known)."""
        await self.channel()
        assert self._address is not None
        return self._address

    async def client(self) -> KvsClient:
        """A KVS client on the current channel."""
        await self.channel()
        assert self._client is not None
        return self._client

    def unreachable(self, channel: grpc.aio.Channel) -> bool:
        """Set the instance behind ``channel`` aside; return whether another one passes.

        Only a discovered tier has another instance to move to; with a fixed
        address this returns False and the caller reports the error.
        """
        if self._watch is None or channel is not self._channel or self._address is None:
            return False
        others = [
            i
            for i in self._watch.instances
            if i.address != self._address and protocol.same_release(i.meta)
        ]
        if not others:
            return False
        self._set_aside[self._address] = time.monotonic() + SET_ASIDE_SECONDS
        logger.warning("KVS at %s is unreachable; using another instance", self._address)
        return True

    async def close(self) -> None:
        """Close the current client's op stream and every channel opened."""
        clients = [*self._retired_clients, *([self._client] if self._client else [])]
        self._client = None
        self._retired_clients.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await self._retired.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


class EndpointKvs:
    """:class:`KvsAccess` over a :class:`KvsEndpoint`.

    Every operation here is idempotent (a merge applied twice is applied once),
    so one that finds its KVS instance unreachable is tried once more on
    another instance of the tier.
    """

    def __init__(self, endpoint: KvsEndpoint) -> None:
        self._endpoint = endpoint

    async def _once_more_elsewhere(self, operation: Callable[[KvsClient], Awaitable[T]]) -> T:
        channel = await self._endpoint.channel()
        try:
            return await operation(await self._endpoint.client())
        except UnavailableError as exc:
            if not self._endpoint.unreachable(channel):
                raise self._naming_the_kvs(exc) from None
        except ProtocolMismatchError as exc:
            protocol.log_once(logger, f"the KVS at {self._endpoint.address}", exc)
            raise
        try:
            return await operation(await self._endpoint.client())
        except UnavailableError as exc:
            raise self._naming_the_kvs(exc) from None

    def _naming_the_kvs(self, exc: UnavailableError) -> UnavailableError:
        """The error of a KVS that did not answer (dead, hung, unreachable), naming it."""
        if type(exc) is not UnavailableError:
            return exc
        reason = str(exc).removesuffix(f"; {UNAVAILABLE_HINT}")
        return UnavailableError(
            f"the KVS at {self._endpoint.address} is unavailable ({reason}); check that "
            "`cbgrpc kvs` is running and answering there"
        )

    async def get(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice | None:
        """Read a key."""
        return await self._once_more_elsewhere(
            lambda client: client.get(key, keyspace, wait=wait, timeout=timeout)
        )

    async def get_stored(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Stored | None:
        """Read a key; a large last-writer-wins value stays in its chunks (see KvsClient)."""
        return await self._once_more_elsewhere(
            lambda client: client.get_stored(key, keyspace, wait=wait, timeout=timeout)
        )

    async def get_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> dict[str, lattice_pb2.Lattice | None]:
        """Read several keys in one BatchGetValues (per 1000 keys)."""
        return await self._once_more_elsewhere(lambda client: client.batch_get(keys, keyspace))

    async def put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
    ) -> None:
        """Merge a lattice (the KVS does not send it back).

        Both attempts send one request id, which marks the second as a retry of
        the first to a store that remembers ids (see docs/protocol.md).
        """
        request_id = new_request_id()
        await self._once_more_elsewhere(
            lambda client: client.merge(key, lattice, keyspace, request_id=request_id)
        )

    async def delete(self, key: str, keyspace: lattice_pb2.Keyspace.ValueType = USER) -> bool:
        """Delete a key; both attempts send one request id (see :meth:`put`)."""
        request_id = new_request_id()
        return await self._once_more_elsewhere(
            lambda client: client.delete(key, keyspace, request_id=request_id)
        )

    async def delete_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> int:
        """Delete several keys."""
        return await self._once_more_elsewhere(lambda client: client.batch_delete(keys, keyspace))

    async def watch_keys(
        self, prefix: str, keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[str]:
        """Yield "" once watching, then each changed key under ``prefix``.

        A watch whose instance becomes unreachable ends with the error, and
        that instance is set aside, so the watcher's next watch goes elsewhere.
        """
        channel = await self._endpoint.channel()
        client = await self._endpoint.client()
        try:
            stream = await client.watch(keyspace=keyspace, prefix=prefix)
            try:
                yield ""
                async for event in stream:
                    yield event.key
            finally:
                await stream.aclose()
        except UnavailableError as exc:
            error = self._naming_the_kvs(exc)
            self._endpoint.unreachable(channel)
            raise error from None
        except ProtocolMismatchError as exc:
            protocol.log_once(logger, f"the KVS at {self._endpoint.address}", exc)
            raise

    async def watch_values(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[tuple[str, lattice_pb2.Lattice | None]]:
        """Yield ``("", None)`` once watching, then each change: the key and its lattice after it.

        A deleted key comes with None. A watch whose instance becomes unreachable
        ends with the error, and that instance is set aside, as in :meth:`watch_keys`.
        """
        channel = await self._endpoint.channel()
        client = await self._endpoint.client()
        try:
            stream = await client.watch(keys, keyspace)
            try:
                yield "", None
                async for event in stream:
                    yield event.key, None if event.deleted else event.lattice
            finally:
                await stream.aclose()
        except UnavailableError as exc:
            error = self._naming_the_kvs(exc)
            self._endpoint.unreachable(channel)
            raise error from None
        except ProtocolMismatchError as exc:
            protocol.log_once(logger, f"the KVS at {self._endpoint.address}", exc)
            raise

    async def list_keys(
        self, prefix: str = "", keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> list[str]:
        """List keys."""
        return await self._once_more_elsewhere(lambda client: client.list_keys(prefix, keyspace))

"""A TCP proxy that can stop passing bytes on (a peer that hangs) or cut its connections."""

from __future__ import annotations

import asyncio
import contextlib


class FreezingProxy:
    """A TCP proxy to ``port`` that can stop passing bytes on, like a hung peer.

    While frozen it still accepts connections (as the kernel does for a
    stopped process) but forwards nothing, either way; thawed, it passes on
    what it held.
    """

    def __init__(self, port: int) -> None:
        self._target = port
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` to connect to."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def sever(self) -> None:
        """Close every connection passed on so far, as a network fault would; new ones pass."""
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self._thawed.wait()
        if self._closed:  # woken by close(): nothing to connect
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers.append(upstream_writer)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.ensure_future(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                await self._thawed.wait()  # frozen: hold the bytes, as a hung process would
                sink.write(data)
                await sink.drain()
        sink.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Connections still waiting for a thaw end now (cancelling them would be logged).
        self._closed = True
        self._thawed.set()
        await asyncio.sleep(0)  # lets them run their last step

"""A private event loop on a daemon thread, so a synchronous API can drive grpc.aio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from cloudburst.errors import CloudburstTimeoutError

T = TypeVar("T")


class LoopThread:
    """Runs an asyncio loop on its own thread until :meth:`stop`."""

    def __init__(self, name: str = "cloudburst-sdk") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on the loop and wait for it, at most ``timeout`` seconds.

        Raises:
            CloudburstTimeoutError: It did not finish in time (it is cancelled).
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("the synchronous cloudburst API cannot be called from its own loop")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CloudburstTimeoutError(f"{what} did not finish within {timeout:.1f}s") from None

    def stop(self) -> None:
        """Stop the loop and join its thread; idempotent."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_drain(self.loop), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on the loop and wait for them, so none is destroyed pending."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()

"""Futures: the handle to a call's result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudburst.errors import CloudburstTimeoutError, UnavailableError

if TYPE_CHECKING:
    from cloudburst._core import PendingCall
    from cloudburst.connection import CloudburstConnection

_UNSET: Any = object()


class CloudburstFuture:
    """The result of a call, stored in the KVS under :attr:`obj_id`.

    ``get()`` waits for it (never by polling) and returns the value, or raises
    the error the function raised as :class:`~cloudburst.errors.RemoteFunctionError`.
    A future can be passed as an argument to another call; the runtime waits
    for its result there.

    A result stored under a key the runtime chose belongs to its future: once
    the future is garbage-collected (and the call finished), the result is
    deleted from the KVS. Keep the future, or copy the value with
    ``put_object``, to keep the result; ``CloudburstConnection(keep_results=True)``
    keeps every result until it is deleted.
    """

    def __init__(
        self,
        obj_id: str,
        connection: CloudburstConnection,
        pending: PendingCall | None = None,
        *,
        owned: bool = False,
    ) -> None:
        self.obj_id = obj_id
        self._connection = connection
        self._pending = pending
        self._owned = owned
        self._value: Any = _UNSET

    def __del__(self) -> None:
        pending = self._pending
        if self._owned and pending is not None:
            try:
                self._connection._stored_soon(self.obj_id, forget=True)
                self._connection._core.release_when_done(self.obj_id, pending)
            except Exception:  # a finaliser must not raise; the result is then kept
                pass

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the result and return it.

        Args:
            timeout: Seconds to wait; the connection's ``timeout`` (default 300) when None.

        Raises:
            CloudburstTimeoutError: The result was not ready in time.
            RemoteFunctionError: The function raised; carries its type, message and traceback.
            FunctionNotFoundError: The function is not registered (any more): a
                call of a function called before on the connection is not
                waited for, so its error comes here (DagNotFoundError for a DAG).
            UnavailableError: The call stream broke before such a call was sent
                (it did not run), or before it was answered (it may have run; its
                result, if any, is stored under ``obj_id``).
        """
        if self._value is not _UNSET:
            return self._value
        conn = self._connection
        limit = conn.timeout if timeout is None else timeout
        if self._pending is not None:
            try:
                outcome = self._pending.wait_outcome(limit)
            except UnavailableError as exc:
                pending, self._pending = self._pending, None
                if pending.unsent:
                    raise  # it never ran: nothing will be stored
                if pending.chosen:
                    # Never accepted: the scheduler may have been lost before it placed the
                    # call, and then nothing will ever be stored. Say so now rather than wait
                    # out the timeout, as a call lost before its accept answer always has.
                    raise UnavailableError(
                        f"{exc}; call {self.obj_id} was sent but not answered, so it may or "
                        "may not have run (it is not retried): if it ran, its result is "
                        f"stored under {self.obj_id!r} (read it with get_object)",
                        {"key": self.obj_id},
                    ) from None
                # Accepted before the stream broke: the result is still stored under obj_id.
            else:
                self._value = conn._decode(outcome)
                return self._value
        # The call's executor stores the result also when the scheduler is lost meanwhile.
        lattice = conn._retrying(
            lambda: conn._core.get(self.obj_id, wait=True, timeout=limit), "get()", limit
        )
        if lattice is None:
            raise CloudburstTimeoutError(
                f"the result at {self.obj_id!r} was not ready within {limit:.1f}s; "
                "pass a longer get(timeout=...) if the function is still running",
                {"key": self.obj_id},
            )
        self._value = conn._decode_lattice(lattice)
        return self._value

    def __repr__(self) -> str:
        return f"CloudburstFuture({self.obj_id!r})"

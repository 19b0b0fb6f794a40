"""The timed clients, each in a process of its own: the floor's, and each system's SDK client.

gRPC's asyncio layer serves every event loop of a process from one poller, so
each loop that uses gRPC in a process makes every call of the others cost
more: on this project's two-core machines, a second loop holding one idle
stream raised the client CPU of a three-hop floor call by half, and each
further loop by more. The bench process holds many such loops (a connection
per system for registering functions and for the probes, the tracing
variants', the in-process server of the diagnosis), so a client timed there
was slowed by all the others, the floor's as much as the SDK's, and every
ratio came out closer to 1 than it is.

So the floor's client and each system's SDK client are timed in a process of
their own, with the one loop a user's application would have: run as
``python -m bench.clients floor ...`` or ``python -m bench.clients sdk ...``,
a child builds its workloads (the same ones, from :mod:`bench.floor` and
:mod:`bench.systems`), prints them on one JSON line, and then times blocks and
throughput runs as the bench asks, one JSON line per request on stdin and
one answer per line on stdout. :class:`ClientProcess` starts one and
:class:`RemoteWorkload` is a workload timed there.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from bench import floor, systems
from bench.floor import (
    F_BIDI,
    F_GET_LARGE,
    F_HOP3_STREAM,
    F_HOP3_UNARY,
    F_HOP4_STREAM,
    F_PUT_LARGE,
    F_UNARY,
)
from bench.measure import AioLoop, AioWorkload, SyncWorkload, Throughput, Workload
from bench.procs import STARTUP_TIMEOUT, Child, Processes, pin_from_environment

#: The longest one request to a client process may take beyond its own duration.
REQUEST_SLACK_SECONDS = 600.0


# -- the bench's side ----------------------------------------------------------------


class ClientProcess:
    """A client process started by the bench: its workloads, timed on request."""

    def __init__(
        self, procs: Processes, name: str, args: list[str], cpu: int | None = None
    ) -> None:
        """Start ``python -m bench.clients ARGS`` and wait for its workloads."""
        self._procs = procs
        self.child: Child = procs.start(
            name, [sys.executable, "-m", "bench.clients", *args], interactive=True, cpu=cpu
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        stdout = self.child.proc.stdout
        assert stdout is not None
        threading.Thread(
            target=_read_lines, args=(stdout, self._lines), name=f"answers-{name}", daemon=True
        ).start()
        try:
            ready = self._answer(STARTUP_TIMEOUT)
        except BaseException:
            procs.stop(self.child)
            raise
        self.workloads = [RemoteWorkload(self, w["system"], w["name"]) for w in ready["ready"]]

    @property
    def pid(self) -> int:
        return self.child.pid

    def request(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and return its answer.

        Raises:
            RuntimeError: The workload failed there (its error), or the process ended.
            TimeoutError: No answer within ``timeout`` seconds.
        """
        stdin = self.child.proc.stdin
        assert stdin is not None
        with self._lock:
            try:
                stdin.write(json.dumps(request) + "\n")
                stdin.flush()
            except (OSError, ValueError) as exc:  # ValueError: closed by close()
                raise RuntimeError(self._ended(f"cannot be written to ({exc})")) from None
            answer = self._answer(timeout)
        if "error" in answer:
            raise RuntimeError(f"{self.child.name}: {answer['error']}")
        return answer

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"{self.child.name} did not answer within {timeout:.0f} s; its log:\n"
                f"{self.child.log_tail()}"
            ) from None
        if line is None:
            raise RuntimeError(self._ended("ended"))
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ended(self, how: str) -> str:
        return f"{self.child.name} (pid {self.pid}) {how}; its log:\n{self.child.log_tail()}"

    def close(self, timeout: float = 30.0) -> None:
        """End the client (it closes its connections on its stdin's end), then stop it."""
        stdin = self.child.proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass
        try:
            self.child.proc.wait(timeout)
        except Exception:
            pass
        self._procs.stop(self.child)


def _read_lines(stream: TextIO, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class RemoteWorkload(Workload):
    """A workload timed in a client process (:class:`ClientProcess`)."""

    def __init__(self, client: ClientProcess, system: str, name: str) -> None:
        super().__init__(system, name)
        self.client = client

    def block(self, n: int) -> list[float]:
        answer = self.client.request(
            {"op": "block", "key": self.key, "n": n}, REQUEST_SLACK_SECONDS
        )
        latencies: list[float] = answer["latencies"]
        return latencies

    def throughput(self, callers: int, seconds: float) -> Throughput:
        answer = self.client.request(
            {"op": "throughput", "key": self.key, "callers": callers, "seconds": seconds},
            seconds + REQUEST_SLACK_SECONDS,
        )
        return Throughput(callers, answer["calls"], answer["seconds"], answer["latencies"])


# -- the client process's side -------------------------------------------------------


def floor_workloads(
    client: floor.FloorClient, aio: AioLoop, four_hops: bool = False
) -> list[Workload]:
    """The gRPC floor, from an asyncio client and from a thread driving its loop (as the SDK).

    ``four_hops``: the client was given a first hop of the four-hop path too.
    """

    def check(size: int) -> Callable[[Any], bool]:
        return lambda n: n == size

    small, large = floor.SMALL_PAYLOAD, 1024 * 1024
    found: list[Workload] = [
        AioWorkload("floor", F_UNARY, client.unary_rtt, aio, check=check(small)),
        AioWorkload("floor", F_BIDI, client.bidi_rtt, aio, check=check(small)),
        AioWorkload("floor", F_HOP3_STREAM, client.hop3_stream, aio, check=check(small)),
        AioWorkload("floor", F_HOP3_UNARY, client.hop3_unary, aio, check=check(small)),
        AioWorkload("floor", F_PUT_LARGE, client.unary_put_1mb, aio, check=check(2)),
        AioWorkload("floor", F_GET_LARGE, client.unary_get_1mb, aio, check=check(large)),
    ]
    if four_hops:
        found.append(
            AioWorkload("floor", F_HOP4_STREAM, client.hop4_stream, aio, check=check(small))
        )
    for name, op in (
        (F_UNARY, client.unary_rtt),
        (F_BIDI, client.bidi_rtt),
        (F_HOP3_STREAM, client.hop3_stream),
        (F_HOP3_UNARY, client.hop3_unary),
    ):
        found.append(
            SyncWorkload("floor-sync", name, lambda op=op: aio.run(op(), 60), check=check(small))
        )
    return found


def serve_requests(found: Sequence[Workload], requests: TextIO, answers: TextIO) -> None:
    """Announce ``found``, then answer each request line until ``requests`` ends."""
    by_key = {w.key: w for w in found}
    _send(answers, {"ready": [{"system": w.system, "name": w.name} for w in found]})
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            workload = by_key[request["key"]]
            if request["op"] == "block":
                answer: dict[str, Any] = {"latencies": workload.block(int(request["n"]))}
            elif request["op"] == "throughput":
                got = workload.throughput(int(request["callers"]), float(request["seconds"]))
                answer = {"calls": got.calls, "seconds": got.seconds, "latencies": got.latencies}
            else:
                answer = {"error": f"unknown op {request['op']!r}"}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        _send(answers, answer)


def _send(answers: TextIO, answer: dict[str, Any]) -> None:
    answers.write(json.dumps(answer) + "\n")
    answers.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.clients",
        description="A timed client of the bench, in a process of its own (started by "
        "bench.run): prints its workloads as one JSON line, then answers one JSON request "
        "per stdin line until stdin ends.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    floor_args = kinds.add_parser("floor", help="the gRPC floor's client")
    floor_args.add_argument("--echo", required=True, help="the echo server's address")
    floor_args.add_argument("--hop-a", required=True, help="hop A's address")
    floor_args.add_argument("--hop-b", required=True, help="hop B's address")
    floor_args.add_argument(
        "--hop-a4", help="the first hop of client->A->A2->B->client (A2 forwards to B)"
    )
    sdk_args = kinds.add_parser("sdk", help="one system's SDK client")
    sdk_args.add_argument("--system", required=True, help="the system's name in the report")
    sdk_args.add_argument("--address", required=True, help="what the SDK connects to")
    sdk_args.add_argument(
        "--options", default="{}", help="CloudburstConnection's other arguments, as JSON"
    )
    sdk_args.add_argument(
        "--only",
        action="append",
        default=[],
        help="a workload to time, by name (repeatable; default: every one)",
    )
    args = parser.parse_args(argv)
    # Answers go to the real stdout; anything else printed goes to the log.
    answers, sys.stdout = sys.stdout, sys.stderr
    pin_from_environment()
    from cloudburst import malloc

    malloc.tune()  # as every cbgrpc process and every SDK client does
    if args.kind == "floor":
        aio = AioLoop()
        client = floor.FloorClient(args.echo, args.hop_a, args.hop_b, args.hop_a4)
        aio.run(client.start(), 60)
        try:
            found = floor_workloads(client, aio, four_hops=args.hop_a4 is not None)
            serve_requests(found, sys.stdin, answers)
        finally:
            aio.run(client.close(), 30)
            aio.stop()
        return 0
    system = systems.System(args.system, args.address, [], client_options=json.loads(args.options))
    systems.connect(system)
    try:
        only = set(args.only)
        found = [
            w
            for w in systems.workloads(system)
            if not isinstance(w, systems.MessagingWorkload) and (not only or w.name in only)
        ]
        serve_requests(found, sys.stdin, answers)
    finally:
        system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

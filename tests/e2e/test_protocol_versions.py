"""A deployment that mixes releases: `cbgrpc` processes of another wire protocol version.

A process of "another release" is a `cbgrpc` process started with
``CLOUDBURST_PROTOCOL_VERSION`` set (the documented hook, read at start-up).
Every process is stopped by PID at teardown.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import ProtocolMismatchError, UnavailableError
from cloudburst.protocol import PROTOCOL_ENV, protocol_version
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from harness import CbgrpcProcess, ConsulAgent, consul_binary, executors_of, required_tool

ROOT = Path(__file__).resolve().parents[2]
OURS = protocol_version()
OTHER = OURS + 1
OTHER_ENV = {PROTOCOL_ENV: str(OTHER)}
#: Fast Consul health checks, so Consul notices a lost process within seconds.
CHECK = ("--consul-check-interval", "1")
ADVICE = "run one release across the deployment (see docs/operations.md#upgrades)"


class Processes:
    """The processes of one test."""

    def __init__(self) -> None:
        self.procs: list[CbgrpcProcess] = []

    def start(self, command: str, *args: str, env: dict[str, str] | None = None) -> CbgrpcProcess:
        proc = CbgrpcProcess(command, *args, env=env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.close()


def _plus_one(_: object, x: int) -> int:
    return x + 1


def test_a_scheduler_leaves_a_listed_executor_of_another_release_out(
    processes: Processes,
) -> None:
    kvs = processes.start("kvs", "--storage", "memory")
    current = processes.start("executor", "--kvs", kvs.address, "--id", "executor-current")
    # The other release's executor has a KVS of its own release (it would not start otherwise).
    old_kvs = processes.start("kvs", "--storage", "memory", env=OTHER_ENV)
    old = processes.start(
        "executor", "--kvs", old_kvs.address, "--id", "executor-old", env=OTHER_ENV
    )
    scheduler = processes.start(
        "scheduler", "--kvs", kvs.address, "--executor", current.address, "--executor", old.address
    )
    # The scheduler says, once, which executor speaks what and what to do ...
    line = scheduler.wait_for_log(f"the executor at {old.address} speaks")
    assert f"wire protocol {OTHER} and refused this process, which speaks {OURS}" in line
    assert ADVICE in line
    # ... and the executor says whom it refused.
    refused = old.wait_for_log("refused /cloudburst.v1.ExecutorService/GetExecutorStatus")
    assert f"this executor speaks cloudburst-grpc wire protocol {OTHER}" in refused
    assert f"speaks {OURS}; {ADVICE}" in refused

    pool = executors_of(scheduler.address, lambda _: True)
    assert [e.executor_id for e in pool.executors] == ["executor-current"]
    with CloudburstConnection(scheduler.address) as cloud:
        plus_one = cloud.register(_plus_one, "plus_one")
        assert [plus_one(i).get(timeout=60) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert scheduler.stderr().count(f"the executor at {old.address} speaks") == 1


def test_an_executor_of_another_release_than_its_kvs_does_not_start(
    processes: Processes,
) -> None:
    kvs = processes.start("kvs", "--storage", "memory")
    with pytest.raises(RuntimeError) as caught:
        processes.start("executor", "--kvs", kvs.address, "--id", "executor-old", env=OTHER_ENV)
    message = str(caught.value)
    assert (
        f"the KVS at {kvs.address} speaks cloudburst-grpc wire protocol {OURS} and refused "
        f"this process, which speaks {OTHER}; {ADVICE}"
    ) in message
    refused = kvs.wait_for_log("refused /cloudburst.v1.KvsService/")
    assert f"this KVS speaks cloudburst-grpc wire protocol {OURS}" in refused


def test_a_scheduler_of_another_release_than_its_kvs_says_so(processes: Processes) -> None:
    kvs = processes.start("kvs", "--storage", "memory")
    old_kvs = processes.start("kvs", "--storage", "memory", env=OTHER_ENV)
    executor = processes.start("executor", "--kvs", kvs.address, "--id", "executor-a")
    with pytest.raises(RuntimeError) as caught:
        processes.start("scheduler", "--kvs", old_kvs.address, "--executor", executor.address)
    message = str(caught.value)
    assert (
        f"the KVS at {old_kvs.address} speaks cloudburst-grpc wire protocol {OTHER} and "
        f"refused this process, which speaks {OURS}; {ADVICE}"
    ) in message
    assert f"this KVS speaks cloudburst-grpc wire protocol {OTHER}" in message


def test_a_scheduler_leaves_a_discovered_executor_of_another_release_out(
    processes: Processes,
) -> None:
    agent = ConsulAgent(consul_binary())
    try:
        consul = {"CONSUL_HTTP_ADDR": agent.address}
        check = ("--consul-check-interval", "1")
        processes.start("kvs", "--storage", "memory", *check, env=consul)
        current = processes.start("executor", "--id", "executor-current", *check, env=consul)
        # Of another release, with its own KVS (not registered, so the others never see it).
        old_kvs = processes.start("kvs", "--storage", "memory", env=OTHER_ENV)
        processes.start(
            "executor",
            "--kvs",
            old_kvs.address,
            "--id",
            "executor-old",
            *check,
            env={**consul, **OTHER_ENV},
        )
        scheduler = processes.start("scheduler", *check, env=consul)
        line = scheduler.wait_for_log("executor executor-old at ")
        assert f"speaks cloudburst-grpc wire protocol {OTHER} (its Consul meta)" in line
        assert f"this scheduler speaks {OURS}: it stays out of the pool; {ADVICE}" in line
        executors_of(scheduler.address, lambda pool: pool == {current.address})
        with CloudburstConnection(scheduler.address) as cloud:
            plus_one = cloud.register(_plus_one, "plus_one")
            assert [plus_one(i).get(timeout=60) for i in range(4)] == [1, 2, 3, 4]
        assert scheduler.stderr().count("executor executor-old at ") == 1
    finally:
        for proc in reversed(processes.procs):
            proc.kill()
        agent.stop()


def _stored_at(address: str, key: str) -> bool:
    """Whether the KVS at ``address`` holds a user key (asked without a protocol version)."""
    with grpc.insecure_channel(address) as channel:
        response = kvs_service_pb2_grpc.KvsServiceStub(channel).GetValue(
            kvs_service_pb2.GetValueRequest(key=key, keyspace=lattice_pb2.KEYSPACE_USER),
            timeout=30,
        )
    return response.found


def _passing(agent: ConsulAgent, service: str, addresses: set[str]) -> None:
    """Wait until exactly ``addresses`` pass as ``service`` in Consul."""
    agent.wait(
        f"/v1/health/service/{service}?passing=true",
        lambda body: (
            {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in body} == addresses
        ),
    )


def test_a_consul_client_uses_only_schedulers_of_its_release(processes: Processes) -> None:
    agent = ConsulAgent(consul_binary())
    try:
        consul = {"CONSUL_HTTP_ADDR": agent.address}
        kvs = processes.start("kvs", "--storage", "memory")
        executor = processes.start("executor", "--kvs", kvs.address, "--id", "executor-current")
        current = processes.start(
            "scheduler", "--kvs", kvs.address, "--executor", executor.address, *CHECK, env=consul
        )
        # A scheduler of the other release, with a KVS and an executor of its own release.
        old_kvs = processes.start("kvs", "--storage", "memory", env=OTHER_ENV)
        old_executor = processes.start(
            "executor", "--kvs", old_kvs.address, "--id", "executor-old", env=OTHER_ENV
        )
        old = processes.start(
            "scheduler",
            "--kvs",
            old_kvs.address,
            "--executor",
            old_executor.address,
            *CHECK,
            env={**consul, **OTHER_ENV},
        )
        _passing(agent, "cloudburst-scheduler", {current.address, old.address})
        # Each connection picks a passing scheduler at random among those of its release.
        for _ in range(8):
            with CloudburstConnection(f"consul://{agent.address}") as cloud:
                assert cloud.address == current.address
        # Objects through the scheduler, so that losing it is noticed by put_object.
        with CloudburstConnection(
            f"consul://{agent.address}", timeout=30, direct_kvs=False
        ) as cloud:
            plus_one = cloud.register(_plus_one, "plus_one")
            assert plus_one(1).get(timeout=60) == 2
            current.kill()
            _passing(agent, "cloudburst-scheduler", {old.address})
            # Failover finds only a scheduler of another release: it stays where it was, and
            # the operation fails as the scheduler's loss, not as the other release's refusal.
            with pytest.raises(UnavailableError) as lost:
                cloud.put_object("after", 1)
            assert type(lost.value) is UnavailableError, lost.value
            assert cloud.address == current.address
        with pytest.raises(ProtocolMismatchError) as caught:
            CloudburstConnection(f"consul://{agent.address}")
        message = str(caught.value)
        assert (
            f"Consul at http://{agent.address} knows only cloudburst-schedulers of another "
            f"release (wire protocol {OTHER} at {old.address}); this SDK speaks "
            f"cloudburst-grpc wire protocol {OURS}: use the SDK of the cluster's release"
        ) in message
        assert "docs/operations.md#upgrades" in message
    finally:
        for proc in reversed(processes.procs):
            proc.kill()
        agent.stop()


def test_processes_use_a_discovered_kvs_of_their_release(processes: Processes) -> None:
    agent = ConsulAgent(consul_binary())
    try:
        consul = {"CONSUL_HTTP_ADDR": agent.address}
        # Consul lists instances by service id: the other release's KVS comes first.
        old_kvs = processes.start(
            "kvs", "--storage", "memory", "--id", "kvs-a-old", *CHECK, env={**consul, **OTHER_ENV}
        )
        kvs = processes.start(
            "kvs", "--storage", "memory", "--id", "kvs-b-current", *CHECK, env=consul
        )
        _passing(agent, "cloudburst-kvs", {old_kvs.address, kvs.address})
        executor = processes.start("executor", "--id", "executor-current", *CHECK, env=consul)
        scheduler = processes.start("scheduler", *CHECK, env=consul)
        executors_of(scheduler.address, lambda pool: pool == {executor.address})
        with CloudburstConnection(scheduler.address, direct_kvs=False) as cloud:
            plus_one = cloud.register(_plus_one, "plus_one")
            assert [plus_one(i).get(timeout=60) for i in range(3)] == [1, 2, 3]
            assert cloud.put_object("stored", 7)
        # The object is in the KVS of this release, not in the other.
        assert [_stored_at(address, "stored") for address in (kvs.address, old_kvs.address)] == [
            True,
            False,
        ]

        # A process of a third release finds no KVS of its own and says which it found.
        third = str(OTHER + 1)
        with pytest.raises(RuntimeError) as caught:
            processes.start("executor", *CHECK, env={**consul, PROTOCOL_ENV: third})
        message = str(caught.value)
        assert (
            f"Consul knows no passing KVS of this process's cloudburst-grpc wire protocol "
            f"{third}, only of other releases (kvs-a-old at {old_kvs.address} speaks {OTHER}, "
            f"kvs-b-current at {kvs.address} speaks {OURS}); {ADVICE}"
        ) in message
    finally:
        for proc in reversed(processes.procs):
            proc.kill()
        agent.stop()


def test_the_go_and_typescript_clients_of_another_release_are_refused(
    processes: Processes, tmp_path: Path
) -> None:
    serve = processes.start("serve", "--storage", "memory", env=OTHER_ENV)
    binary = tmp_path / "polyglot"
    subprocess.run(
        [required_tool("go"), "build", "-o", str(binary), "./examples/polyglot"],
        cwd=ROOT / "sdk" / "go",
        check=True,
        timeout=600,
    )
    program = ROOT / "sdk" / "typescript" / "dist" / "test" / "polyglot.js"
    if not program.exists():
        pytest.fail(f"{program.relative_to(ROOT)} is missing: run `make clients` first")
    for command in ([str(binary)], [required_tool("node"), str(program)]):
        done = subprocess.run(
            [*command, serve.address, "some_dag"], capture_output=True, text=True, timeout=240
        )
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "PROTOCOL_MISMATCH" in output, output
        assert f"this cbgrpc serve speaks cloudburst-grpc wire protocol {OTHER}" in output

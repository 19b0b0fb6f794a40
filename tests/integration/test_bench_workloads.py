"""The bench's cluster workloads, floors and targets, run once against real processes (not timed).

The bench itself (``make bench``) is where speed is judged; these tests only
check that its code paths work: the process cluster it starts, every workload
it times there, the locality workload, the storage-engine floor, and how the
targets are computed from what was measured.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench import clients, floor, report, run, systems
from bench.measure import SyncWorkload
from bench.procs import Processes, cpu_seconds


def _valkey_url(request: pytest.FixtureRequest, storage: str) -> str | None:
    return request.getfixturevalue("valkey_cluster").url if storage == "valkey" else None


@pytest.mark.parametrize("storage", ["sqlite", "valkey"])
def test_every_cluster_workload_runs_once_against_a_real_cluster(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    with Processes(tmp_path / "logs") as procs:
        system = systems.start_cluster(
            procs,
            systems.CLUSTER_STATIC,
            storage=storage,
            data_dir=tmp_path,
            valkey_url=_valkey_url(request, storage),
        )
        try:
            assert len(system.children) == 4 and all(c.alive() for c in system.children)
            kvs_data = tmp_path / f"{systems.CLUSTER_STATIC}-kvs-data"
            assert kvs_data.is_dir() == (storage == "sqlite")
            systems.register_all(systems.connect(system))
            client, records = run.system_workloads(procs, system, None)
            assert client.pid != os.getpid() and client.child.alive()
            workloads = {r.workload.name: r.workload for r in records}
            assert set(workloads) == {
                systems.CALL,
                systems.DAG_DIRECT,
                systems.DAG_GET,
                systems.GET_SMALL,
                systems.PUT_SMALL,
                systems.GET_LARGE,
                systems.PUT_LARGE,
                systems.MESSAGE,
                systems.FAN,
            }
            # Timed in the client process, but send/recv (timed inside the functions).
            remote = {n for n, w in workloads.items() if isinstance(w, clients.RemoteWorkload)}
            assert remote == set(workloads) - {systems.MESSAGE}
            for workload in workloads.values():
                latencies = workload.block(1)  # each checks its call's result
                assert len(latencies) == 1 and latencies[0] > 0, workload.key
            record = run.Record(workloads[systems.DAG_DIRECT])
            run.SYSTEM_PIDS[system.name] = list(system.pids().values())
            settings = run.parse_args(["--quick", "--callers", "2"])
            run._time_throughput(record, settings, 0.2)
            assert record.error is None and record.tp_calls >= 2 and record.tp_seconds > 0
            # Charged with the client process's CPU, not with this process's.
            assert record.tp_cpu_seconds is not None and record.tp_cpu_seconds > 0
            servers_only = cpu_seconds(run.SYSTEM_PIDS[system.name])
            assert run._client_cpu(record.workload, run.SYSTEM_PIDS[system.name]) > servers_only
            client.close()
            assert not client.child.alive()

            probe = systems.LocalityProbe(system)
            cold, repeat = probe.sample()  # checks the function saw ten 8 MiB arrays
            assert cold > 0 and repeat > 0
            assert system.conn is not None
            assert system.conn.list() and "locality_read" in system.conn.list()

            chain = systems.LongChainProbe(system, length=30)  # C8's workload, shorter
            assert chain.register() > 0
            assert chain.sample() > 0  # checks the chain's result
        finally:
            system.close()
    assert not procs.children  # every process was stopped, by its PID
    assert all(not c.alive() for c in system.children)


def test_the_floor_is_timed_in_a_client_process_of_its_own(tmp_path: Path) -> None:
    with Processes(tmp_path / "logs") as procs:
        argv = [sys.executable, "-m", "bench.floor", "--role"]
        echo = procs.start("floor-echo", [*argv, "echo"])
        hop_b = procs.start("floor-b", [*argv, "b"])
        hop_a = procs.start("floor-a", [*argv, "a", "--next", hop_b.address])
        hop_a2 = procs.start("floor-a2", [*argv, "a", "--next", hop_b.address])
        hop_a4 = procs.start("floor-a4", [*argv, "a", "--next", hop_a2.address])
        client = clients.ClientProcess(
            procs,
            "client-floor",
            ["floor", "--echo", echo.address, "--hop-a", hop_a.address, "--hop-b", hop_b.address,
             "--hop-a4", hop_a4.address],
        )  # fmt: skip
        try:
            by_key = {w.key: w for w in client.workloads}
            assert {w.name for w in client.workloads if w.system == "floor"} == {
                floor.F_UNARY,
                floor.F_BIDI,
                floor.F_HOP3_STREAM,
                floor.F_HOP3_UNARY,
                floor.F_HOP4_STREAM,
                floor.F_PUT_LARGE,
                floor.F_GET_LARGE,
            }
            for workload in client.workloads:
                latencies = workload.block(2)  # each checks the size it got back
                assert len(latencies) == 2 and min(latencies) > 0, workload.key
            got = by_key[f"floor/{floor.F_HOP3_STREAM}"].throughput(2, 0.1)
            assert got.calls >= 2 and got.seconds > 0 and len(got.latencies) == got.calls
            with pytest.raises(RuntimeError, match="no/such"):
                client.request({"op": "block", "key": "no/such", "n": 1}, 30)
            assert by_key[f"floor/{floor.F_UNARY}"].block(1)  # still answering
        finally:
            client.close()
        assert not client.child.alive() and client.child not in procs.children
        with pytest.raises(RuntimeError, match="client-floor"):
            client.request({"op": "block", "key": f"floor/{floor.F_UNARY}", "n": 1}, 30)
    assert not procs.children


@pytest.mark.parametrize("storage", systems.STORAGE_ENGINES)
def test_the_storage_engine_floor_reads_and_writes_100_bytes(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    engine = floor.EngineFloor(storage, tmp_path / "engine", _valkey_url(request, storage))
    try:
        assert engine.write() == floor.SMALL_PAYLOAD
        assert engine.read() == floor.SMALL_PAYLOAD
        assert (tmp_path / "engine").exists() == (storage == "sqlite")
    finally:
        engine.close()


def _record(
    system: str, name: str, latencies: list[float], rate: float = 0.0, cpu: float | None = None
) -> run.Record:
    record = run.Record(SyncWorkload(system, name, lambda: None), latencies=latencies)
    record.rounds = [latencies]
    record.tp_calls, record.tp_seconds = int(rate), 1.0
    record.tp_cpu_seconds = cpu
    return record


def test_cluster_targets_are_ratios_to_their_floors_and_say_pass_or_miss() -> None:
    ms = 0.001
    static = systems.CLUSTER_STATIC
    records = [
        _record("floor", floor.F_HOP3_STREAM, [1 * ms], rate=1000, cpu=1.0),
        _record("floor", floor.F_HOP4_STREAM, [1.35 * ms]),
        _record("floor", floor.F_UNARY, [0.5 * ms]),
        _record(run.ENGINE, floor.F_ENGINE_READ, [0.1 * ms]),
        _record(run.ENGINE, floor.F_ENGINE_WRITE, [0.5 * ms]),
        _record("floor", floor.F_PUT_LARGE, [2 * ms]),
        _record(static, systems.DAG_DIRECT, [1.3 * ms], rate=500, cpu=2.0),
        _record(static, systems.CALL, [1.5 * ms]),
        _record(static, systems.GET_SMALL, [0.8 * ms]),  # 0.8 / (0.5 + 0.1) = 1.33
        _record(static, systems.PUT_SMALL, [1.6 * ms]),  # 1.6 / (0.5 + 0.5) = 1.6
        _record(static, systems.PUT_LARGE, [3 * ms]),
        _record(static, systems.LOCALITY_COLD, [200 * ms]),
        _record(static, systems.LOCALITY_REPEAT, [50 * ms]),
        _record(static, systems.LONG_CHAIN, [2.5, 2.5, 1.5]),  # seconds per call
    ]
    by_key = {r.workload.key: r for r in records}
    targets = run.evaluate_targets(by_key, {}, None, {systems.CLUSTER_CONSUL: "no consul"})
    found = {t["id"]: t for t in targets}

    def check(ident: str, value: float, met: bool) -> None:
        assert found[ident]["value"] == pytest.approx(value), ident
        assert found[ident]["met"] is met, ident
        assert found[ident]["system"] == static

    check(f"C1 {static}", 1.3, True)
    assert "a bare 4-hop stream takes 1.35x the 3-hop floor" in found[f"C1 {static}"]["detail"]
    assert "4-hop" not in found[f"C2 {static}"]["detail"]
    check(f"C2 {static}", 1.5, False)
    check(f"C4-get {static}", 0.8 / 0.6, True)
    check(f"C4-put {static}", 1.6, False)
    check(f"C5-put {static}", 1.5, True)
    check(f"C6 {static}", 0.5, False)
    assert "CPU per call 4.00 ms vs the floor's 1.00 ms" in found[f"C6 {static}"]["detail"]
    check(f"C7 {static}", 4.0, False)
    check(f"C8 {static}", 2.5, False)
    assert f"C8 {systems.CLUSTER_CONSUL}" not in found  # the static cluster only
    assert found[f"C3 {static}"]["value"] is None  # not measured: no verdict
    consul = found[f"C1 {systems.CLUSTER_CONSUL}"]
    assert consul["met"] is None and "no consul" in consul["detail"]
    ids = [t["id"] for t in targets]
    assert ids[:6] == ["T1", "T2", "T3", "T4", "T5", "T6"]
    # serve with in-process executors: shown after serve's own, never counted as missed.
    inprocess = systems.SERVE_INPROCESS
    assert ids[6:8] == [f"T1 {inprocess}", f"T4 {inprocess}"]
    assert all(t["informational"] is (t["system"] == inprocess) for t in targets)
    assert ids.index(f"C1 {static}") < ids.index(f"C1 {systems.CLUSTER_CONSUL}")
    assert ids.index(f"C1 {systems.CLUSTER_CONSUL}") < ids.index(f"C7 {static}")
    assert ids.index(f"C7 {systems.CLUSTER_CONSUL}") < ids.index(f"C8 {static}")

    data = report.build({}, {"callers": 8}, records, run.FLOOR_OF, run.RAY_OF, {}, targets,
                        None, [])  # fmt: skip
    settings = {"calls": 1, "warmup": 0, "blocks": 1, "callers": 8, "tp_rounds": 1,
                "tp_seconds": 1}  # fmt: skip
    text = report.markdown({**data, "settings": settings}, [])
    assert f"| C4-put | {static} |" in text
    assert "| C4-put |  | 1.60x MISS | n/a |" in text  # the table by system

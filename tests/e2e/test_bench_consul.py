"""The bench's cluster with Consul discovery, started as `make bench` starts it (not timed)."""

from __future__ import annotations

from pathlib import Path

from bench import systems
from bench.procs import Processes


def test_the_consul_cluster_of_the_bench_serves_its_workloads(tmp_path: Path) -> None:
    with Processes(tmp_path / "logs") as procs:
        consul_child, consul = systems.start_consul(procs, systems.consul_binary())
        system = systems.start_cluster(procs, systems.CLUSTER_CONSUL, consul=consul)
        try:
            assert system.address == f"consul://{consul}"
            conn = systems.connect(system)
            scheduler = next(c for c in system.children if c.name.endswith("-scheduler"))
            assert conn.address == scheduler.address  # found through Consul
            systems.register_all(conn)
            workloads = {w.name: w for w in systems.workloads(system)}
            for name in (systems.DAG_DIRECT, systems.CALL, systems.GET_SMALL, systems.MESSAGE):
                assert len(workloads[name].block(1)) == 1
            cold, repeat = systems.LocalityProbe(system).sample()
            assert cold > 0 and repeat > 0
        finally:
            system.close()
    assert not procs.children and not consul_child.alive()

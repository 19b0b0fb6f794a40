"""DAG validation and topology (cloudburst_grpc.dags), pure code."""

from __future__ import annotations

import graphlib
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudburst.errors import InvalidArgumentError, InvalidDagError
from cloudburst.v1 import function_pb2
from cloudburst_grpc import dags as dag

Edge = tuple[str, str]


def _cycle_path(error: InvalidDagError) -> list[str]:
    return error.metadata["cycle"].split(",")


def _assert_real_cycle(path: list[str], edges: set[Edge]) -> None:
    assert len(path) >= 3, path  # at least a -> b -> a (self-loops are reported separately)
    assert path[0] == path[-1], path
    assert len(set(path[:-1])) == len(path) - 1, f"cycle {path} repeats a node"
    for upstream, downstream in itertools.pairwise(path):
        assert (upstream, downstream) in edges, f"{upstream} -> {downstream} is not an edge"


# --- errors -------------------------------------------------------------------------------


def test_empty_dag_is_rejected() -> None:
    with pytest.raises(InvalidDagError, match="at least one function"):
        dag.topology([], [])


def test_invalid_dag_error_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        dag.topology([], [])
    assert info.value.reason == "INVALID_DAG"


def test_duplicate_names_are_named_in_the_error() -> None:
    with pytest.raises(InvalidDagError, match=r"'b'.*more than once") as info:
        dag.topology(["a", "b", "c", "b"], [("a", "b"), ("b", "c")])
    assert info.value.metadata == {"functions": "b"}


def test_empty_function_name_is_rejected() -> None:
    with pytest.raises(InvalidDagError, match="must not be empty"):
        dag.topology(["a", ""], [("a", "")])


@pytest.mark.parametrize("connection", [("a", "ghost"), ("ghost", "a")])
def test_connection_to_unknown_function_is_rejected(connection: Edge) -> None:
    with pytest.raises(InvalidDagError, match="'ghost', which is not in the DAG's") as info:
        dag.topology(["a", "b"], [("a", "b"), connection])
    assert info.value.metadata == {"function": "ghost"}


def test_unregistered_function_is_rejected_by_validate() -> None:
    with pytest.raises(InvalidDagError, match=r"'b'.*not registered") as info:
        dag.validate(["a", "b", "c"], [("a", "b"), ("b", "c")], registered={"a", "c"})
    assert info.value.metadata == {"functions": "b"}


def test_unregistered_function_is_reported_before_shape_errors() -> None:
    with pytest.raises(InvalidDagError, match="not registered"):
        dag.validate(["a", "b"], [("a", "b"), ("b", "a")], registered={"a"})


def test_validate_returns_topology_when_all_registered() -> None:
    topo = dag.validate(["a", "b"], [("a", "b")], registered=["a", "b", "unused"])
    assert topo == dag.topology(["a", "b"], [("a", "b")])


def test_self_loop_is_rejected_as_a_cycle() -> None:
    with pytest.raises(InvalidDagError, match=r"'a' is connected to itself.*cycle"):
        dag.topology(["a", "b"], [("a", "b"), ("a", "a")])


def test_two_node_cycle_is_reported_with_its_path() -> None:
    edges = {("a", "b"), ("b", "a")}
    with pytest.raises(InvalidDagError, match="cycle") as info:
        dag.topology(["a", "b"], sorted(edges))
    _assert_real_cycle(_cycle_path(info.value), edges)
    assert " -> ".join(_cycle_path(info.value)) in str(info.value)


def test_long_cycle_behind_a_source_is_reported_with_a_real_path() -> None:
    functions = ["src", "a", "b", "c", "d", "sink"]
    edges = {("src", "a"), ("a", "b"), ("b", "c"), ("c", "d"), ("d", "b"), ("d", "sink")}
    with pytest.raises(InvalidDagError, match="cycle") as info:
        dag.topology(functions, sorted(edges))
    path = _cycle_path(info.value)
    _assert_real_cycle(path, edges)
    assert set(path) == {"b", "c", "d"}


def test_more_than_one_sink_is_rejected_and_sinks_named() -> None:
    with pytest.raises(InvalidDagError, match=r"exactly one sink.*has 2: 'b', 'c'") as info:
        dag.topology(["a", "b", "c"], [("a", "b"), ("a", "c")])
    assert info.value.metadata == {"sinks": "b,c"}


def test_unconnected_function_in_multi_function_dag_is_rejected() -> None:
    with pytest.raises(InvalidDagError, match="'lonely' have no connection") as info:
        dag.topology(["a", "lonely", "b"], [("a", "b")])
    assert info.value.metadata == {"functions": "lonely"}


def test_multi_function_dag_without_connections_is_rejected() -> None:
    with pytest.raises(InvalidDagError, match="no connection"):
        dag.topology(["a", "b"], [])


# --- accepted shapes ----------------------------------------------------------------------


def test_single_function_dag_is_its_own_source_and_sink() -> None:
    topo = dag.topology(["only"], [])
    assert topo.functions == ("only",)
    assert topo.sources == ("only",)
    assert topo.sink == "only"
    assert topo.upstreams == {"only": ()}
    assert topo.downstreams == {"only": ()}


def test_chain_topology() -> None:
    topo = dag.topology(["a", "b", "c"], [("b", "c"), ("a", "b")])
    assert topo.sources == ("a",)
    assert topo.sink == "c"
    assert topo.upstreams == {"a": (), "b": ("a",), "c": ("b",)}
    assert topo.downstreams == {"a": ("b",), "b": ("c",), "c": ()}


def test_join_upstream_order_follows_function_list_not_connections() -> None:
    functions = ["z_second", "join", "a_first", "m_third"]
    connections = [("m_third", "join"), ("a_first", "join"), ("z_second", "join")]
    topo = dag.topology(functions, connections)
    assert topo.upstreams["join"] == ("z_second", "a_first", "m_third")
    assert topo.sources == ("z_second", "a_first", "m_third")
    assert topo.sink == "join"


def test_fan_out_downstream_order_follows_function_list() -> None:
    functions = ["split", "y", "x", "join"]
    connections = [("split", "x"), ("split", "y"), ("x", "join"), ("y", "join")]
    topo = dag.topology(functions, connections)
    assert topo.downstreams["split"] == ("y", "x")
    assert topo.upstreams["join"] == ("y", "x")


def test_duplicate_connections_count_once() -> None:
    topo = dag.topology(["a", "b"], [("a", "b"), ("a", "b")])
    assert topo.upstreams["b"] == ("a",)
    assert topo.downstreams["a"] == ("b",)


def test_diamond_sources_and_sink() -> None:
    topo = dag.topology(
        ["s1", "s2", "mid", "sink"],
        [("s1", "mid"), ("s2", "mid"), ("mid", "sink"), ("s1", "sink")],
    )
    assert topo.sources == ("s1", "s2")
    assert topo.sink == "sink"
    assert topo.upstreams["sink"] == ("s1", "mid")


# --- properties ---------------------------------------------------------------------------


@st.composite
def _single_sink_dags(draw: st.DrawFn) -> tuple[list[str], list[Edge]]:
    size = draw(st.integers(min_value=1, max_value=9))
    order = draw(st.permutations([f"f{i}" for i in range(size)]))
    edges: set[Edge] = set()
    for i in range(size):
        for j in range(i + 1, size):
            if draw(st.booleans()):
                edges.add((order[i], order[j]))
    for node in order[:-1]:
        if not any(up == node for up, _ in edges):
            edges.add((node, order[-1]))
    listed = draw(st.permutations(order))
    connections = draw(st.permutations(sorted(edges)))
    return list(listed), list(connections)


@given(_single_sink_dags())
def test_random_single_sink_dags_are_accepted_with_consistent_topology(
    shape: tuple[list[str], list[Edge]],
) -> None:
    functions, connections = shape
    topo = dag.topology(functions, connections)
    position = {name: i for i, name in enumerate(functions)}
    assert topo.functions == tuple(functions)
    assert set(topo.upstreams) == set(functions) == set(topo.downstreams)
    for node in functions:
        for up in topo.upstreams[node]:
            assert node in topo.downstreams[up]
        for down in topo.downstreams[node]:
            assert node in topo.upstreams[down]
        for neighbours in (topo.upstreams[node], topo.downstreams[node]):
            assert list(neighbours) == sorted(neighbours, key=position.__getitem__)
    assert {(u, d) for d, ups in topo.upstreams.items() for u in ups} == set(connections)
    assert topo.sources == tuple(f for f in functions if not topo.upstreams[f])
    assert [f for f in functions if not topo.downstreams[f]] == [topo.sink]


@given(_single_sink_dags())
def test_edge_from_sink_back_to_a_source_always_makes_a_cycle(
    shape: tuple[list[str], list[Edge]],
) -> None:
    functions, connections = shape
    topo = dag.topology(functions, connections)
    back = (topo.sink, topo.sources[0])
    with pytest.raises(InvalidDagError, match="cycle") as info:
        dag.topology(functions, [*connections, back])
    if "cycle" in info.value.metadata:
        _assert_real_cycle(_cycle_path(info.value), {*connections, back})
    else:
        assert len(functions) == 1  # the back edge is a self-loop


@given(
    st.integers(min_value=2, max_value=7).flatmap(
        lambda n: st.tuples(
            st.just([f"f{i}" for i in range(n)]),
            st.lists(
                st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(
                    lambda e: e[0] != e[1]
                ),
                max_size=14,
            ),
        )
    )
)
def test_reported_cycles_are_real_and_only_acyclic_graphs_pass_the_cycle_check(
    shape: tuple[list[str], list[tuple[int, int]]],
) -> None:
    functions, index_edges = shape
    edges = {(functions[a], functions[b]) for a, b in index_edges}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in functions:
        sorter.add(name)
    for up, down in edges:
        sorter.add(down, up)
    try:
        sorter.prepare()
        acyclic = True
    except graphlib.CycleError:
        acyclic = False
    try:
        dag.topology(functions, sorted(edges))
    except InvalidDagError as error:
        if "cycle" in error.metadata:
            assert not acyclic
            _assert_real_cycle(_cycle_path(error), edges)
        else:
            assert acyclic, f"cyclic graph not reported as a cycle: {error}"
    else:
        assert acyclic


def test_upstream_first_puts_every_function_after_its_upstreams() -> None:
    functions = ["sink", "right", "left", "source"]
    connections = [("source", "left"), ("source", "right"), ("left", "sink"), ("right", "sink")]
    topo = dag.topology(functions, connections)
    assert topo.upstream_first == ("source", "right", "left", "sink")
    assert dag.topology(["a"], []).upstream_first == ("a",)


def _first_ready_order(functions: list[str], connections: list[tuple[str, str]]) -> list[str]:
    """The rule, spelled out: next comes the first listed function whose upstreams are placed."""
    placed: list[str] = []
    while len(placed) < len(functions):
        placed.append(
            next(
                f
                for f in functions
                if f not in placed and all(u in placed for u, d in connections if d == f)
            )
        )
    return placed


def test_upstream_first_takes_the_first_listed_function_that_is_ready() -> None:
    rng = random.Random(3)
    for _ in range(200):
        functions = [f"f{i}" for i in range(rng.randint(1, 12))]
        rank = {f: rng.random() for f in functions}  # edges follow a hidden order: no cycle
        connections = [
            (a, b) for a in functions for b in functions if rank[a] < rank[b] and rng.random() < 0.3
        ]
        sink = max(functions, key=rank.__getitem__)  # one sink: every other end feeds it
        ends = {f for f in functions if f != sink and all(a != f for a, _ in connections)}
        connections += [(f, sink) for f in sorted(ends)]
        topo = dag.topology(functions, connections)
        assert list(topo.upstream_first) == _first_ready_order(functions, connections)


def test_a_chain_of_thousands_listed_backwards_is_ordered_upstream_first() -> None:
    names = [f"c{i:05d}" for i in range(10_000)]
    topo = dag.topology(names[::-1], list(itertools.pairwise(names)))
    assert topo.upstream_first == tuple(names)
    assert topo.sources == ("c00000",) and topo.sink == "c09999"


# -- shared rules: keys, join order, the topology cache ------------------------------------------


def test_definitions_have_their_own_system_keys() -> None:
    assert dag.function_key("f") == "function/f"
    assert dag.dag_key("f") == "dag/f"


def test_join_arguments_put_static_arguments_first_and_spread_tuple_results() -> None:
    assert dag.join_arguments([1], [(2, 3), [4], 5]) == (1, 2, 3, [4], 5)
    assert dag.join_arguments((), [()]) == (), "an empty tuple result adds no argument"


def _dag(name: str, version: int) -> function_pb2.Dag:
    built = function_pb2.Dag(name=name, version=version, functions=["a", "b"])
    built.connections.add(upstream="a", downstream="b")
    return built


def test_the_topology_cache_keeps_one_topology_per_dag_version_up_to_its_size() -> None:
    cache = dag.TopologyCache(size=2)
    first = cache.get(_dag("d", 1))
    assert cache.get(_dag("d", 1)) is first, "computed once per version"
    second = cache.get(_dag("d", 2))
    assert second is not first
    cache.get(_dag("d", 1))  # now the most recently used
    cache.get(_dag("e", 1))  # evicts ("d", 2), the least recently used
    assert len(cache) == 2
    assert cache.get(_dag("d", 1)) is first
    assert cache.get(_dag("d", 2)) is not second, "computed again after its eviction"
    assert first.sink == "b"


def test_a_topology_cache_needs_room() -> None:
    with pytest.raises(ValueError, match="at least one"):
        dag.TopologyCache(size=0)


def test_a_topology_put_in_the_cache_is_not_computed_again() -> None:
    cache = dag.TopologyCache(size=2)
    validated = dag.validate(["a", "b"], [("a", "b")], {"a", "b"})
    cache.put(_dag("d", 1), validated)
    assert cache.get(_dag("d", 1)) is validated
    cache.get(_dag("e", 1))
    cache.put(_dag("f", 1), validated)  # evicts ("d", 1), the least recently used
    assert len(cache) == 2 and cache.get(_dag("d", 1)) is not validated

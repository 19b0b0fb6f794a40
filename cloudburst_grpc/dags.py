"""The rules of DAGs, as pure code: validation, topology, keys and join order.

Both the scheduler (which validates and places DAGs) and the executors (which
run their stages) follow these rules, so they live here, once.

A valid DAG has at least one function, no duplicate names, only registered
functions, only edges between its own functions, no cycle, exactly one sink,
and (when it has more than one function) no function without an edge.

At a join, a function receives its static arguments first, then one result
per upstream in the order its upstreams appear in the DAG's ``functions``
list (never in arrival order). A tuple result spreads into several arguments
(:func:`join_arguments`).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudburst.errors import InvalidDagError
from cloudburst.v1 import function_pb2

#: Where function definitions live in the KVS's system keyspace.
FUNCTION_PREFIX = "function/"
#: Where DAG definitions live in the KVS's system keyspace.
DAG_PREFIX = "dag/"
#: Topologies a :class:`TopologyCache` keeps by default: one per DAG version in use,
#: a few hundred bytes each.
TOPOLOGY_CACHE_SIZE = 1024


def function_key(name: str) -> str:
    """The system key of a function definition."""
    return FUNCTION_PREFIX + name


def dag_key(name: str) -> str:
    """The system key of a DAG definition."""
    return DAG_PREFIX + name


def join_arguments(static: Iterable[Any], results: Iterable[Any]) -> tuple[Any, ...]:
    """A stage's arguments: its static arguments, then each upstream result in DAG order.

    A tuple result spreads into several arguments; anything else is one argument.
    """
    arguments = list(static)
    for result in results:
        if isinstance(result, tuple):
            arguments.extend(result)
        else:
            arguments.append(result)
    return tuple(arguments)


#: The most names an error message or its metadata lists (errors stay small on the wire).
MAX_NAMES_LISTED = 10


def _listed(names: Sequence[str]) -> str:
    """Up to :data:`MAX_NAMES_LISTED` names, quoted, and how many more there are."""
    shown = ", ".join(repr(n[:80]) for n in names[:MAX_NAMES_LISTED])
    more = len(names) - MAX_NAMES_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _joined(names: Sequence[str]) -> str:
    """Up to :data:`MAX_NAMES_LISTED` names for error metadata."""
    return ",".join(n[:80] for n in names[:MAX_NAMES_LISTED])


@dataclass(frozen=True)
class Topology:
    """The shape of a valid DAG."""

    functions: tuple[str, ...]
    """The functions, in registration order."""
    upstreams: dict[str, tuple[str, ...]]
    """Each function's upstreams, in the order of ``functions``."""
    downstreams: dict[str, tuple[str, ...]]
    """Each function's downstreams, in the order of ``functions``."""
    sources: tuple[str, ...]
    """Functions without upstreams."""
    sink: str
    """The one function without downstreams; its result is the DAG's result."""
    upstream_first: tuple[str, ...] = ()
    """The functions in an order where each comes after its upstreams (ties: as listed)."""


def topology(functions: Sequence[str], connections: Iterable[tuple[str, str]]) -> Topology:
    """Compute the topology of a DAG, or raise InvalidDagError saying what is wrong.

    This checks the graph's shape only; :func:`validate` also checks that the
    functions are registered.
    """
    if not functions:
        raise InvalidDagError("a DAG needs at least one function")
    order = {name: i for i, name in enumerate(functions)}
    duplicates = sorted(f for f, count in Counter(functions).items() if count > 1)
    if duplicates:
        raise InvalidDagError(
            f"function(s) {_listed(duplicates)} listed more than once",
            {"functions": _joined(duplicates)},
        )
    if any(not name for name in functions):
        raise InvalidDagError("a DAG function name must not be empty")
    ups: dict[str, set[str]] = {f: set() for f in functions}
    downs: dict[str, set[str]] = {f: set() for f in functions}
    for upstream, downstream in connections:
        for end in (upstream, downstream):
            if end not in order:
                raise InvalidDagError(
                    f"connection ({upstream!r}, {downstream!r}) names {end!r}, which is not "
                    "in the DAG's function list; add it to the list",
                    {"function": end},
                )
        if upstream == downstream:
            raise InvalidDagError(f"function {upstream!r} is connected to itself (a cycle)")
        ups[downstream].add(upstream)
        downs[upstream].add(downstream)

    cycle = _find_cycle(functions, downs)
    if cycle:
        raise InvalidDagError(
            f"the DAG has a cycle: {' -> '.join(cycle[:MAX_NAMES_LISTED])}"
            + (" -> ..." if len(cycle) > MAX_NAMES_LISTED else ""),
            {"cycle": _joined(cycle)},
        )
    if len(functions) > 1:
        unconnected = [f for f in functions if not ups[f] and not downs[f]]
        if unconnected:
            raise InvalidDagError(
                f"function(s) {_listed(unconnected)} have no connection; "
                "connect them or leave them out",
                {"functions": _joined(unconnected)},
            )
    sinks = [f for f in functions if not downs[f]]
    if len(sinks) != 1:
        raise InvalidDagError(
            f"a DAG must have exactly one sink (a function nothing depends on); this one has "
            f"{len(sinks)}: {_listed(sinks)}",
            {"sinks": _joined(sinks)},
        )

    def ordered(names: set[str]) -> tuple[str, ...]:
        return tuple(sorted(names, key=order.__getitem__))

    return Topology(
        functions=tuple(functions),
        upstreams={f: ordered(ups[f]) for f in functions},
        downstreams={f: ordered(downs[f]) for f in functions},
        sources=tuple(f for f in functions if not ups[f]),
        sink=sinks[0],
        upstream_first=_upstream_first(functions, ups),
    )


def _upstream_first(functions: Sequence[str], ups: dict[str, set[str]]) -> tuple[str, ...]:
    """Order an acyclic graph so every function follows its upstreams, else as listed.

    Of the functions whose upstreams are all placed, the one listed first goes
    next; a heap keeps this O(n log n) in the size of the DAG.
    """
    order = {name: i for i, name in enumerate(functions)}
    waiting = {name: len(ups[name]) for name in functions}
    downs: dict[str, list[str]] = {name: [] for name in functions}
    for name in functions:
        for upstream in ups[name]:
            downs[upstream].append(name)
    ready = [order[name] for name in functions if not waiting[name]]
    heapq.heapify(ready)
    placed: list[str] = []
    while ready:
        name = functions[heapq.heappop(ready)]
        placed.append(name)
        for downstream in downs[name]:
            waiting[downstream] -= 1
            if not waiting[downstream]:
                heapq.heappush(ready, order[downstream])
    if len(placed) < len(functions):  # unreachable: topology() rejects cycles first
        raise InvalidDagError("the DAG has a cycle")
    return tuple(placed)


def validate(
    functions: Sequence[str],
    connections: Iterable[tuple[str, str]],
    registered: Collection[str],
) -> Topology:
    """Validate a DAG against the registered functions and return its topology."""
    missing = [f for f in functions if f not in registered]
    if missing:
        raise InvalidDagError(
            f"function(s) {_listed(missing)} are not registered; register them before the DAG",
            {"functions": _joined(missing)},
        )
    return topology(functions, connections)


def _find_cycle(functions: Sequence[str], downs: dict[str, set[str]]) -> list[str]:
    """Return one cycle as a path (first node repeated at the end), or []."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(functions, white)
    parent: dict[str, str] = {}
    for root in functions:
        if color[root] != white:
            continue
        stack = [(root, iter(sorted(downs[root])))]
        color[root] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = black
                stack.pop()
            elif color[child] == grey:
                path = [child]
                walk = node
                while walk != child:
                    path.append(walk)
                    walk = parent[walk]
                path.append(child)
                return list(reversed(path))
            elif color[child] == white:
                parent[child] = node
                color[child] = grey
                stack.append((child, iter(sorted(downs[child]))))
    return []


class TopologyCache:
    """The topologies of DAG versions, computed once each, the least recently used dropped.

    A DAG never changes within a version, so its topology is cached by
    ``(name, version)``; at most ``size`` versions are kept.
    """

    def __init__(self, size: int = TOPOLOGY_CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a topology cache needs room for at least one DAG, not {size}")
        self.size = size
        self._topologies: OrderedDict[tuple[str, int], Topology] = OrderedDict()

    def get(self, dag: function_pb2.Dag) -> Topology:
        """The topology of ``dag`` (a valid DAG, as stored by a scheduler)."""
        key = (dag.name, dag.version)
        topo = self._topologies.get(key)
        if topo is not None:
            self._topologies.move_to_end(key)
            return topo
        topo = topology(list(dag.functions), [(c.upstream, c.downstream) for c in dag.connections])
        self.put(dag, topo)
        return topo

    def put(self, dag: function_pb2.Dag, topo: Topology) -> None:
        """Keep ``topo``, already computed, as the topology of ``dag``'s version."""
        key = (dag.name, dag.version)
        self._topologies[key] = topo
        self._topologies.move_to_end(key)
        if len(self._topologies) > self.size:
            self._topologies.popitem(last=False)

    def __len__(self) -> int:
        return len(self._topologies)

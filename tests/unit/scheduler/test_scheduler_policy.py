"""Placement policy (cloudburst_grpc.scheduler.policy), pure code."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cloudburst.errors import NoExecutorError, UnavailableError
from cloudburst_grpc.scheduler import policy
from cloudburst_grpc.scheduler.policy import ExecutorView


def _view(
    executor_id: str,
    *,
    pinned: set[str] | None = None,
    keys: set[str] | None = None,
    load: int = 0,
    overloaded: bool = False,
) -> ExecutorView:
    return ExecutorView(
        executor_id=executor_id,
        address=f"inproc:{executor_id}",
        pinned=frozenset(pinned or ()),
        cached_keys=frozenset(keys or ()),
        load=load,
        overloaded=overloaded,
    )


# --- score --------------------------------------------------------------------------------


def test_score_of_idle_executor_without_pin_or_keys_is_zero() -> None:
    assert policy.score(_view("e"), "f", ["k"]) == 0.0


def test_score_adds_pin_and_cached_keys_and_subtracts_load() -> None:
    view = _view("e", pinned={"f"}, keys={"k1", "k2", "other"}, load=3)
    expected = policy.PINNED_WEIGHT + 2 * policy.KEY_WEIGHT - 3 * policy.LOAD_WEIGHT
    assert policy.score(view, "f", ["k1", "k2", "missing"]) == expected


def test_score_ignores_pins_of_other_functions() -> None:
    assert policy.score(_view("e", pinned={"g"}), "f", []) == 0.0


# --- place --------------------------------------------------------------------------------


def test_place_prefers_the_pinned_executor() -> None:
    executors = [_view("a"), _view("b", pinned={"f"}), _view("c")]
    assert policy.place("f", [], executors, random.Random(0)).executor_id == "b"


def test_place_prefers_the_executor_caching_the_referenced_keys() -> None:
    executors = [_view("a", keys={"x"}), _view("b", keys={"k1", "k2"}), _view("c", keys={"k1"})]
    assert policy.place("f", ["k1", "k2"], executors, random.Random(0)).executor_id == "b"


def test_place_load_penalty_outweighs_a_pin_when_heavily_loaded() -> None:
    busy_pinned = _view("pinned", pinned={"f"}, load=10)
    idle = _view("idle")
    assert policy.place("f", [], [busy_pinned, idle], random.Random(0)).executor_id == "idle"


def test_place_pin_outweighs_a_little_load() -> None:
    lightly_loaded_pinned = _view("pinned", pinned={"f"}, load=2)
    idle = _view("idle")
    chosen = policy.place("f", [], [idle, lightly_loaded_pinned], random.Random(0))
    assert chosen.executor_id == "pinned"


def test_place_prefers_less_loaded_among_otherwise_equal() -> None:
    executors = [_view("a", load=3), _view("b", load=1), _view("c", load=2)]
    assert policy.place("f", [], executors, random.Random(0)).executor_id == "b"


def test_place_equal_score_goes_to_fewer_calls() -> None:
    # Same score (4 - 4 == 0 - 0), but the idle one runs fewer calls.
    executors = [_view("pinned", pinned={"f"}, load=4), _view("idle", load=0)]
    for seed in range(20):
        assert policy.place("f", [], executors, random.Random(seed)).executor_id == "idle"


def test_place_skips_overloaded_executors() -> None:
    executors = [
        _view("best_but_full", pinned={"f"}, keys={"k"}, overloaded=True),
        _view("busy", load=5),
    ]
    assert policy.place("f", ["k"], executors, random.Random(0)).executor_id == "busy"


def test_place_without_executors_raises_no_executor() -> None:
    with pytest.raises(NoExecutorError, match=r"'f'.*no executor is registered.*retry") as info:
        policy.place("f", [], [])
    assert info.value.metadata == {"function": "f"}
    assert isinstance(info.value, UnavailableError)


def test_place_with_all_overloaded_raises_no_executor() -> None:
    executors = [_view("a", overloaded=True), _view("b", overloaded=True)]
    with pytest.raises(NoExecutorError, match=r"'f'.*all executors are overloaded.*add executors"):
        policy.place("f", [], executors, random.Random(0))


def test_place_breaks_exact_ties_at_random_and_picks_every_candidate() -> None:
    executors = [_view("a", load=1), _view("b", load=1), _view("worse", load=2)]
    rng = random.Random(1234)
    picks = Counter(policy.place("f", [], executors, rng).executor_id for _ in range(400))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 100  # roughly even, not a fixed preference


def test_place_tie_break_is_reproducible_with_same_seed() -> None:
    executors = [_view(name) for name in "abcdef"]
    first = [policy.place("f", [], executors, random.Random(7)).executor_id for _ in range(5)]
    second = [policy.place("f", [], executors, random.Random(7)).executor_id for _ in range(5)]
    assert first == second


def test_place_without_rng_still_returns_a_top_candidate() -> None:
    executors = [_view("a"), _view("b"), _view("c", load=1)]
    assert policy.place("f", [], executors).executor_id in {"a", "b"}


# --- choose_pins --------------------------------------------------------------------------


def test_choose_pins_prefers_executors_already_pinning_the_function() -> None:
    executors = [_view("a"), _view("b", pinned={"f"}, load=9), _view("c")]
    assert policy.choose_pins("f", executors, 1) == ["b"]


def test_choose_pins_then_least_loaded() -> None:
    executors = [_view("a", load=5), _view("b", load=1), _view("c", load=3), _view("d", load=0)]
    assert policy.choose_pins("f", executors, 2) == ["d", "b"]


def test_choose_pins_existing_pin_first_then_least_loaded_for_remaining_replicas() -> None:
    executors = [
        _view("a", pinned={"g"}, load=4),
        _view("b", pinned={"g"}, load=2),
        _view("c", pinned={"f", "g"}, load=7),
    ]
    assert policy.choose_pins("f", executors, 2) == ["c", "b"]


def test_choose_pins_respects_replicas_and_returns_all_when_fewer_exist() -> None:
    executors = [_view(f"e{i}", load=i) for i in range(5)]
    assert policy.choose_pins("f", executors, 3) == ["e0", "e1", "e2"]
    assert policy.choose_pins("f", executors, 10) == ["e0", "e1", "e2", "e3", "e4"]


def test_choose_pins_at_least_one_replica() -> None:
    executors = [_view("a", load=1), _view("b")]
    assert policy.choose_pins("f", executors, 0) == ["b"]


def test_choose_pins_without_executors_is_empty() -> None:
    assert policy.choose_pins("f", [], 2) == []


def test_choose_pins_equal_executors_break_ties_by_id() -> None:
    executors = [_view("c"), _view("a"), _view("b")]
    assert policy.choose_pins("f", executors, 2) == ["a", "b"]


# --- placing next to the upstream -----------------------------------------------------------


def test_place_prefers_the_executor_its_upstream_runs_on() -> None:
    executors = [_view(name, pinned={"f"}) for name in ("a", "b", "c")]
    for seed in range(20):
        assert policy.place("f", [], executors, random.Random(seed), near="b").executor_id == "b"


def test_place_leaves_the_upstreams_executor_when_it_is_busier() -> None:
    executors = [_view("a", pinned={"f"}), _view("b", pinned={"f"}, load=3)]
    assert policy.place("f", [], executors, random.Random(0), near="b").executor_id == "a"


def test_score_counts_nearness_only_on_the_upstreams_executor() -> None:
    assert policy.score(_view("e"), "f", [], near="e") == policy.NEAR_WEIGHT
    assert policy.score(_view("e"), "f", [], near="other") == 0.0

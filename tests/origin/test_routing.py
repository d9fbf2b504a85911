"""Routing decisions on crafted traffic: affinity, spill on overload, short matches, turns."""

from __future__ import annotations

import pytest

from origin.routing import (
    POLICIES,
    LeastLoaded,
    PrefixAware,
    PrefixAwareParams,
    RoundRobin,
    make_router,
)

SYSTEM_A = "You are the billing assistant of Acme. " * 20
SYSTEM_B = "You are the travel planner of Globex. " * 20
ALL = (0, 1, 2, 3)


def route(router: PrefixAware, text: str, loads=(0, 0, 0, 0), allowed=ALL) -> int:
    """Decide and record, as the pool does; returns the chosen backend."""
    decision = router.decide(text, list(loads), list(allowed))
    router.record(text, decision.order[0])
    return decision.order[0]


def test_round_robin_takes_each_available_backend_in_turn() -> None:
    rr = RoundRobin(4)
    firsts = [rr.decide(None, [0] * 4, [0, 1, 3]).order[0] for _ in range(6)]
    assert sorted(firsts[:3]) == [0, 1, 3] and firsts[:3] == firsts[3:]
    assert set(rr.decide(None, [0] * 4, [0, 1, 3]).order) == {0, 1, 3}


def test_least_loaded_takes_the_backend_with_fewest_requests_in_flight() -> None:
    ll = LeastLoaded(4)
    decision = ll.decide("x", [5, 2, 7, 3], ALL)
    assert decision.order == (1, 3, 0, 2) and decision.reason == "least_loaded"


def test_least_loaded_spreads_equal_loads_in_turn() -> None:
    ll = LeastLoaded(3)
    assert {ll.decide(None, [1, 1, 1], (0, 1, 2)).order[0] for _ in range(3)} == {0, 1, 2}


def test_same_prefix_goes_to_the_same_backend() -> None:
    router = PrefixAware(4)
    first_a = route(router, SYSTEM_A + "How do I pay?")
    first_b = route(router, SYSTEM_B + "Where to go in May?", loads=(1, 1, 1, 1))
    assert first_a != first_b      # a new prefix goes to the backend with room (smallest tree)
    for i, question in enumerate(["Refund?", "Invoice copy?", "Change card?", "VAT number?"]):
        loads = [2, 1, 3, 1]
        loads[first_a] = 2 + i % 2     # a little busier than the rest, within the thresholds
        decision = router.decide(SYSTEM_A + question, loads, ALL)
        assert decision.order[0] == first_a and decision.reason == "affinity"
        router.record(SYSTEM_A + question, decision.order[0])
    assert route(router, SYSTEM_B + "Somewhere warm?") == first_b


def test_an_overloaded_best_match_spills_to_the_least_loaded_backend() -> None:
    router = PrefixAware(4, PrefixAwareParams(balance_abs_threshold=4, balance_rel_threshold=1.5))
    home = route(router, SYSTEM_A + "q0")
    loads = [3, 3, 3, 3]
    loads[home] = 3 + 4            # exactly at the absolute threshold: still affinity
    assert router.decide(SYSTEM_A + "q1", loads, ALL).order[0] == home
    loads[home] = 3 + 5            # beyond both thresholds: spill
    decision = router.decide(SYSTEM_A + "q2", loads, ALL)
    assert decision.order[0] != home and decision.reason == "imbalance"
    assert decision.order[1] == home          # failover still tries the warm backend next


def test_relative_threshold_keeps_affinity_when_every_backend_is_busy() -> None:
    router = PrefixAware(2, PrefixAwareParams(balance_abs_threshold=4, balance_rel_threshold=1.5))
    home = route(router, SYSTEM_A + "q0", loads=(0, 0), allowed=(0, 1))
    loads = [20, 20]
    loads[home] = 29               # 9 more, but less than 1.5x
    assert router.decide(SYSTEM_A + "q1", loads, (0, 1)).order[0] == home


def test_a_short_match_goes_to_the_least_loaded_backend_when_the_others_hold_more() -> None:
    router = PrefixAware(4, PrefixAwareParams(cache_threshold=0.5))
    home = route(router, "Hello! " + SYSTEM_A)
    loads = [2, 2, 2, 2]
    other = (home + 1) % 4
    loads[other] = 0
    decision = router.decide("Hello! " + SYSTEM_B, loads, ALL)   # only "Hello! You are the " matches
    assert decision.reason == "short_match" and decision.order[0] == other


def test_a_new_prefix_goes_to_the_backend_with_most_room_among_those_in_balance() -> None:
    router = PrefixAware(4, PrefixAwareParams(balance_abs_threshold=8))
    for i, text in enumerate(["x" * 300, "y" * 100, "z" * 200]):
        router.record(text, i)                     # backend 3 holds nothing at all ...
    loads = [3, 5, 0, 9]                           # ... but is 9 requests above the least loaded
    decision = router.decide(SYSTEM_A, loads, ALL)
    assert decision.reason == "short_match" and decision.order[0] == 1   # the least held, in balance
    loads[3] = 8                                    # within the band: the emptiest wins
    assert router.decide(SYSTEM_A, loads, ALL).order[0] == 3


def test_unavailable_backends_are_never_chosen() -> None:
    router = PrefixAware(4)
    home = route(router, SYSTEM_A + "q0")
    others = tuple(i for i in ALL if i != home)
    decision = router.decide(SYSTEM_A + "q1", [0] * 4, others)
    assert home not in decision.order and set(decision.order) == set(others)


def test_forgetting_a_backend_drops_its_affinity() -> None:
    router = PrefixAware(2)
    home = route(router, SYSTEM_A + "q0", loads=(0, 0), allowed=(0, 1))
    router.forget(home)
    loads = [0, 0]
    loads[home] = 1
    assert router.decide(SYSTEM_A + "q1", loads, (0, 1)).reason == "short_match"


def test_no_routing_text_means_least_loaded() -> None:
    decision = PrefixAware(3).decide(None, [4, 0, 2], (0, 1, 2))
    assert decision.order == (1, 2, 0) and decision.reason == "least_loaded"


def test_tree_memory_per_backend_is_bounded() -> None:
    router = PrefixAware(1, PrefixAwareParams(tree_chars=1000))
    for i in range(50):
        route(router, f"{i:04d}" + SYSTEM_A, loads=(0,), allowed=(0,))
    assert router.trees[0].size <= 1000


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_built_by_name(policy: str) -> None:
    assert make_router(policy, 2).name == policy


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_router("random", 2)

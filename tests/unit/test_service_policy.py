"""The load-adaptive decode policy (service/policy.py): its ladder and how it moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.network import GenReranker
from service.policy import DecodeLevel, DecodePolicy, PolicyConfig, fixed, ladder

BUDGET = 0.010  # 10 ms


def test_ladder_goes_from_beam_to_every_head() -> None:
    assert [lv.name for lv in ladder(4, 3)] == ["beam3", "n1", "n2", "n4"]
    assert [lv.name for lv in ladder(3, 1)] == ["n1", "n2", "n3"]
    assert [lv.name for lv in ladder(1, 1)] == ["n1"]
    assert ladder(4, 3)[0] == DecodeLevel(items_per_pass=1, beam=3)


def policy(**kw: float) -> DecodePolicy:
    return DecodePolicy(ladder(4, 3), PolicyConfig(budget_s=BUDGET, **kw))  # type: ignore[arg-type]


def test_starts_with_the_most_quality_and_stays_there_at_low_load() -> None:
    p = policy()
    for _ in range(200):
        assert p.choose(waiting=0).name == "beam3"
        p.observe(queue_s=0.0002, engine_s=0.0008)  # 1 ms of a 10 ms budget


def test_steps_faster_under_load_one_level_at_a_time() -> None:
    p = policy()
    seen = []
    for _ in range(40):
        seen.append(p.choose(waiting=2).name)
        p.observe(queue_s=0.008, engine_s=0.004)  # 12 ms: over the budget
    assert seen[0] == "beam3" and seen[-1] == "n4"
    firsts = [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name]
    assert firsts == ["beam3", "n1", "n2", "n4"]  # never skips a level
    assert p.index == 3  # and never past the fastest


def test_a_deep_queue_steps_faster_at_once() -> None:
    p = policy(queue_limit=16)
    assert p.choose(waiting=15).name == "beam3"
    assert p.choose(waiting=16).name == "n1"
    assert p.choose(waiting=40).name == "n2"


def test_returns_to_quality_only_after_a_calm_stretch() -> None:
    p = policy(calm_batches=10)
    for _ in range(40):
        p.observe(queue_s=0.008, engine_s=0.004)
    assert p.level.name == "n4"
    for _ in range(9):
        p.observe(queue_s=0.0, engine_s=0.0001)
    level_before = p.level.name
    for _ in range(400):
        p.observe(queue_s=0.0, engine_s=0.0001)
    assert level_before == "n4", "one calm batch must not move it (hysteresis)"
    assert p.level.name == "beam3"


def test_middling_load_holds_the_level() -> None:
    p = policy(calm_batches=5)
    for _ in range(40):
        p.observe(queue_s=0.008, engine_s=0.004)
    for _ in range(400):  # 3.5 ms: between low (2 ms) and high (5 ms) of the budget
        p.observe(queue_s=0.0015, engine_s=0.002)
    assert p.level.name == "n4"


def test_fixed_never_moves() -> None:
    p = fixed(DecodeLevel(2), BUDGET)
    for _ in range(50):
        assert p.choose(waiting=1000) == DecodeLevel(2)
        p.observe(queue_s=1.0, engine_s=1.0)
    assert p.level == DecodeLevel(2)


def test_needs_a_level() -> None:
    with pytest.raises(ValueError, match="at least one level"):
        DecodePolicy((), PolicyConfig(budget_s=BUDGET))


def test_shed_requests_push_it_faster_and_keep_it_there() -> None:
    p = policy(calm_batches=5)
    p.pressure()
    assert p.level.name == "n1"
    for _ in range(5):
        p.pressure()
    assert p.level.name == "n4"
    # the few requests that still reach the engine look fast, but shedding goes on
    for _ in range(100):
        p.observe(queue_s=0.0, engine_s=0.0002)
        p.pressure()
    assert p.level.name == "n4"


def test_a_tiny_client_budget_running_out_is_not_pressure() -> None:
    """One client's tiny budgets expire however idle the service is: they must not take the
    quality levels from every other request. A budget that ran out after a long wait in the
    service (a fifth of the default budget or more) is pressure."""
    p = policy()
    for _ in range(50):
        p.late(waited_s=0.0003)  # a 0.3 ms budget, spent on a fast lookup
    assert p.level.name == "beam3"
    p.late(waited_s=0.2 * BUDGET)
    assert p.level.name == "n1"


def test_a_call_with_a_tight_budget_takes_the_first_level_that_fits_it_for_that_call() -> None:
    """Costs learnt per level: beam3 6 ms, n1 3 ms, n4 1 ms (m = 30). A call whose tightest
    request has 5 ms left cannot finish beam3 (6 > 0.8 * 5 ms); n1 fits (3 <= 4)."""
    p = policy()
    levels = {lv.name: lv for lv in p.levels}
    for name, cost in (("beam3", 0.006), ("n1", 0.003), ("n4", 0.001)):
        p.observe(queue_s=0.0, engine_s=cost, level=levels[name], m=30)
    assert p.choose(0, budget_left_s=0.050, m=30).name == "beam3"  # room for it
    assert p.choose(0, budget_left_s=0.005, m=30).name == "n1"
    assert p.choose(0, budget_left_s=0.002, m=30).name == "n2"  # not seen yet: taken to fit
    assert p.index == 0  # for that call only: the load's level is unchanged
    assert p.choose(0, budget_left_s=0.005, m=200).name == "beam3"  # another size: unknown
    assert p.cost(levels["beam3"], 30) == pytest.approx(0.006)
    assert p.cost(levels["beam3"], 200) is None


def test_the_fastest_level_is_the_floor_of_a_tight_budget() -> None:
    p = policy()
    for lv in p.levels:
        p.observe(queue_s=0.0, engine_s=0.004, level=lv, m=30)
    assert p.choose(0, budget_left_s=0.001, m=30).name == "n4"


def test_the_default_settings_decode_at_one_level_every_head_per_pass(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    """The default policy is fixed greedy n = heads; adaptive from beam by setting only.
    (Settings need a bundle to exist: the tiny one, not whatever artifacts/ holds.)"""
    from service.lifecycle import decode_policy
    from service.settings import Settings

    bundle = tiny_bundle[0]
    assert [lv.name for lv in decode_policy(Settings(bundle=bundle), heads=4).levels] == ["n4"]
    adaptive = decode_policy(Settings(bundle=bundle, decode_policy="adaptive"), heads=4)
    assert [lv.name for lv in adaptive.levels] == ["n1", "n2", "n4"]
    with_beam = decode_policy(Settings(bundle=bundle, decode_policy="adaptive", beam=3), heads=4)
    assert [lv.name for lv in with_beam.levels] == ["beam3", "n1", "n2", "n4"]

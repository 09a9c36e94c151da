"""The built-in policies, on usage histories built by hand (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from memplug import InvalidInput, Scope, TierCost
from memplug.policies import CostPolicy, FrequencyPolicy, FrequencyThresholds
from memplug.usage import ItemUsage
from memplug_kv import KVTier

NOW = datetime(2026, 1, 10, tzinfo=UTC)
ANN, BO = Scope("ann"), Scope("bo")


def usage(item_id, level=1, reads_ago=(), tokens=20, scope=ANN, created_days_ago=1.0, half_life_s=86400.0):
    times = tuple(sorted(NOW - timedelta(seconds=s) for s in reads_ago))
    heat = sum(0.5 ** (s / half_life_s) for s in reads_ago)
    return ItemUsage(item_id, level, len(times), 0, times[-1] if times else None, heat, tokens,
                     NOW - timedelta(days=created_days_ago), times, scope)


def moves_of(moves):
    return {(m.src_level, m.dst_level): set(m.item_ids) for m in moves}


def test_frequency_thresholds():
    t = FrequencyThresholds(promote_reads=3, promote_window_s=3600, weights_reads=5, weights_window_s=86400,
                            weights_min_items=2, demote_idle_s=7 * 86400)
    policy = FrequencyPolicy(t)
    hot = [60, 120, 180]  # three reads in the last hour
    sustained = [600 * k for k in range(1, 7)]  # six reads in the last day
    plan = policy.plan([
        usage(1, reads_ago=hot),
        usage(2, reads_ago=[60, 7200, 9000]),  # three reads, but only one in the window
        usage(3, reads_ago=sustained), usage(4, reads_ago=sustained),  # two candidates: enough
        usage(5, reads_ago=sustained, scope=BO),  # alone in its scope: KV only
        usage(6, level=2, reads_ago=[8 * 86400]),  # idle for 8 days
        usage(7, level=3, created_days_ago=30),  # never read since written
        usage(8, level=0, reads_ago=hot),  # the context buffer's own turn: not moved
    ], NOW)
    assert moves_of(plan) == {(1, 2): {1, 5}, (1, 3): {3, 4}, (2, 1): {6}, (3, 2): {7}}
    assert all(m.reason for m in plan)


COSTS = [
    TierCost("pgvector", 1, prompt_tokens_per_token=1.0),  # a prompt token: 1.5 ms (the prior)
    TierCost("kv", 2, read_ms_per_token=0.05, write_ms_per_token=2.0, bytes_per_token=7000.0),
    TierCost("lora", 3, read_ms=2.0, write_ms=60_000.0, write_ms_per_item=8_000.0),
]


def cost_policy(**settings):
    p = CostPolicy()
    p.half_life_s = p.horizon_s = 86400.0
    for k, v in settings.items():
        setattr(p, k, v)
    return p


def test_cost_policy_places_each_item_where_it_is_cheapest():
    policy = cost_policy()
    # Predicted reads ~ heat * ln 2. KV encoding costs 2 ms a token and saves 1.45 ms a token per
    # read: an item read once (0.7 predicted reads) stays text, one read three times (2.1) moves.
    # Weights need enough saving across the scope to pay for a retrain.
    plan = policy.plan([usage(1, reads_ago=[100]), usage(2, reads_ago=[100, 200, 300])], COSTS, NOW)
    assert moves_of(plan) == {(1, 2): {2}}
    # Ten long items read ~40 times each: as text 25 s each; an adapter costs 140 s to train.
    busy = [usage(i, reads_ago=[10] * 60, tokens=400) for i in range(10, 20)]
    assert moves_of(policy.plan(busy, [COSTS[0], COSTS[2]], NOW)) == {(1, 3): set(range(10, 20))}
    # With KV at hand (1.6 s each, encode included) the adapter no longer pays ...
    assert moves_of(policy.plan(busy, COSTS, NOW)) == {(1, 2): set(range(10, 20))}
    # ... until the reads are many more.
    busier = [usage(i, reads_ago=[10] * 2000, tokens=400) for i in range(10, 20)]
    assert moves_of(policy.plan(busier, COSTS, NOW)) == {(1, 3): set(range(10, 20))}
    # One item alone never pays for a retrain.
    assert moves_of(policy.plan(busy[:1], [COSTS[0], COSTS[2]], NOW)) == {}


def test_cost_policy_budgets_and_demotion():
    busy = [usage(i, reads_ago=[10] * 2000, tokens=400) for i in range(10, 20)]
    retrained = [COSTS[0], COSTS[1], TierCost("lora", 3, read_ms=2.0, write_ms=60_000.0,
                                              write_ms_per_item=8_000.0, writes_24h=4)]
    plan = cost_policy(max_retrains=4).plan(busy, retrained, NOW)
    assert moves_of(plan) == {(1, 2): set(range(10, 20))}  # KV instead
    # The KV budget keeps the items with the most saving per byte: here room for two of 400 tokens.
    plan = cost_policy(max_kv_bytes=2 * 400 * 7000.0).plan(busy, COSTS[:2], NOW)
    assert len(moves_of(plan)[(1, 2)]) == 2
    # A KV item over budget leaves at once; an unread one only once idle.
    items = [usage(1, level=2, reads_ago=[10] * 60, tokens=400), usage(2, level=2, reads_ago=[10] * 50, tokens=400),
             usage(3, level=2, created_days_ago=2), usage(4, level=2, created_days_ago=40)]
    plan = cost_policy(max_kv_bytes=400 * 7000.0, demote_idle_s=30 * 86400.0).plan(items, COSTS[:2], NOW)
    assert {m.item_ids: m.reason for m in plan} == {(2,): "over the scope's KV budget",
                                                    (4,): "idle for 30 d, cheaper at level 1"}
    # No text tier, no opinion.
    assert cost_policy().plan(items, COSTS[1:], NOW) == []


def test_cost_policy_climbs_by_heat_when_the_kv_budget_binds():
    # Room in KV for two items of 400 tokens. Moving the three hottest into the weights
    # frees KV for the next two; the cold ones stay text: text -> KV -> weights by heat.
    items = ([usage(i, reads_ago=[10] * 2000, tokens=400) for i in (1, 2, 3)]
             + [usage(i, reads_ago=[10] * 60, tokens=400) for i in (4, 5)]
             + [usage(i, reads_ago=[10], tokens=400) for i in (6, 7, 8)])
    plan = cost_policy(max_kv_bytes=2 * 400 * 7000.0).plan(items, COSTS, NOW)
    assert moves_of(plan) == {(1, 3): {1, 2, 3}, (1, 2): {4, 5}}
    # Without the budget the two middle items fit in KV as well, and weights do not pay.
    assert moves_of(cost_policy().plan(items, COSTS, NOW)) == {(1, 2): {1, 2, 3, 4, 5}}


def test_an_item_the_adapter_did_not_hold_waits_before_another_retrain():
    from dataclasses import replace

    t = FrequencyThresholds(promote_reads=3, promote_window_s=3600, weights_reads=5, weights_window_s=86400,
                            weights_min_items=2)
    hot = [usage(i, level=2, reads_ago=[10] * 6) for i in (1, 2, 3)]
    assert moves_of(FrequencyPolicy(t).plan(hot, NOW)) == {(2, 3): {1, 2, 3}}
    # Item 3 was trained an hour ago and not recalled; items 1 and 2 alone still make a batch.
    declined = [*hot[:2], replace(hot[2], declined=((3, NOW - timedelta(hours=1)),))]
    assert moves_of(FrequencyPolicy(t).plan(declined, NOW)) == {(2, 3): {1, 2}}
    # With one candidate left, no retrain.
    assert moves_of(FrequencyPolicy(t).plan(declined[1:], NOW)) == {}
    busy = [usage(i, reads_ago=[10] * 2000, tokens=400) for i in (1, 2)]
    busy.append(replace(usage(3, reads_ago=[10] * 2000, tokens=400), declined=((3, NOW - timedelta(hours=1)),)))
    assert moves_of(cost_policy().plan(busy, [COSTS[0], COSTS[2]], NOW)) == {(1, 3): {1, 2}}


def test_policies_are_plugins_chosen_by_setting(make_memory, user):
    mem = make_memory(plugins=[FrequencyPolicy(), CostPolicy(), KVTier()],
                      options={"policy": "frequency", "freq_promote_reads": 2})
    it = mem.write(user, "Cy collects stamps.")
    for _ in range(2):
        mem.read(user, "What does Cy collect?")
    plans = [p for p in mem.hook.memplug_plan(memory=mem, scope=Scope(user), usage=mem.usage(user)) if p]
    assert plans == [[m for m in plans[0]]] and plans[0][0].item_ids == (it.id,) and plans[0][0].dst_level == 2
    assert "2+ reads" in plans[0][0].reason


def test_measured_costs_and_inspect(make_memory, user):
    from helpers.counting import CountingTier

    from memplug import Move

    mem = make_memory(plugins=[CountingTier()])
    it = mem.write(user, "Eli brews cider.")
    for _ in range(2):
        mem.read(user, "What does Eli brew?")
    # Costs: buffered samples are folded into a running mean shared through Postgres.
    tier = f"test-{user}"
    for v in (1.0, 3.0):
        mem.measure(tier, "read_ms", v)
    mem.measure(tier, "write_ms", 7.0, db=None)
    assert mem.measured(tier) == {"read_ms": (2.0, 2), "write_ms": (7.0, 1)}
    assert make_memory().measured(tier)["read_ms"] == (2.0, 2)
    with pytest.raises(InvalidInput, match="finite"):
        mem.measure(tier, "read_ms", float("nan"))
    costs = [c for c in mem.hook.memplug_costs(memory=mem, scope=Scope(user)) if c]
    assert [(c.tier, c.level, c.prompt_tokens_per_token) for c in costs] == [("pgvector", 1, 1.0)]

    mem.consolidate(user, [Move((it.id,), 1, 9, "hot")])
    [row] = mem.inspect(user)
    assert (row["id"], row["level"], row["reads"]) == (it.id, 9, 2) and row["heat"] > 1.9
    assert row["bytes"]["pgvector"] > 0
    assert [(h["tier"], h["level"], h["reason"]) for h in row["history"]] == [
        ("pgvector", 1, "write"), ("counting", 9, "hot: counted")]

"""make_plan refuses what a cache would ignore or crash on, and check_prompt checks a prompt against a plan."""

from __future__ import annotations

import pytest

from headwise.api import make_plan
from headwise.budgets import check_prompt, layer_fractions
from headwise.errors import HeadwiseError


@pytest.mark.parametrize(("options", "match"), [
    (["schedule=foo"], "unknown schedule 'foo'"),
    (["schedule=pyramid", "slope=-7"], r"slope must be in \[0, 1\), got -7"),
    (["schedule=pyramid", "slope=1"], r"slope must be in \[0, 1\)"),
    (["schedule=pyramid", "slope=nan"], r"slope must be in \[0, 1\)"),
    (["slope=0.3"], "slope applies only with schedule=pyramid"),
    (["floor=0.1"], "floor applies only with allocation=adaptive"),
])
def test_bad_plan_options_are_refused_by_make_plan(options, match):
    with pytest.raises(HeadwiseError, match=match):
        make_plan("knorm", ratio=0.5, options=options)


def test_layer_fractions_raise_headwise_errors():
    with pytest.raises(HeadwiseError, match="unknown schedule"):
        layer_fractions(4, "foo")
    with pytest.raises(HeadwiseError, match="slope"):
        layer_fractions(4, "pyramid", slope=-7)


def test_good_plan_options_still_pass():
    plan = make_plan("knorm", ratio=0.5, options=["schedule=pyramid", "slope=0.3", "allocation=adaptive", "floor=0.1"])
    assert (plan.schedule, plan.slope, plan.allocation, plan.floor) == ("pyramid", 0.3, "adaptive", 0.1)


@pytest.mark.parametrize("kwargs", [{"ratio": 0.5}, {"budget": 16}, {"options": ["window=8"]},
                                    {"options": ["schedule=pyramid"]}])
def test_the_full_policy_refuses_what_it_would_ignore(kwargs):
    with pytest.raises(HeadwiseError, match="keeps the whole cache"):
        make_plan("full", **kwargs)


def test_the_full_policy_at_ratio_zero_is_the_baseline():
    assert not make_plan("full").policy.compresses
    assert make_plan("full", ratio=0.0, prompt_length=10).ratio == 0.0


def test_check_prompt_refuses_a_ratio_below_the_policy_minimum():
    plan = make_plan("snapkv", ratio=0.75)  # sinks 4 + window 28 = 32
    with pytest.raises(HeadwiseError, match="keeps 20 of 81 tokens, below the minimum of policy 'snapkv'"):
        check_prompt(plan, 81)
    check_prompt(plan, 128)  # keeps 32
    check_prompt(make_plan("snapkv", ratio=0.0), 10)  # nothing removed: nothing to refuse
    check_prompt(make_plan("full"), 1)
    with pytest.raises(HeadwiseError, match="larger than the prompt"):
        check_prompt(make_plan("knorm", budget=100), 50)
    with pytest.raises(HeadwiseError, match="keeps 20 of 81"):
        make_plan("snapkv", ratio=0.75, prompt_length=81)

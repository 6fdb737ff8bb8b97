"""The Python entry points for compression: build a cache, then use it with any generation loop.

Example
-------
>>> cache = make_cache(model, "snapkv", ratio=0.75)          # doctest: +SKIP
>>> model.generate(input_ids, **cache_kwargs(model, cache))  # doctest: +SKIP

(``cache_kwargs`` is :func:`headwise.compat.cache_kwargs`: ``{"cache": cache}`` from transformers 5.24 on,
``{"past_key_values": cache}`` before; the name is read from the model's signature.)

Question-agnostic use (one compressed context, several questions): prefill the context with the cache
(:func:`headwise.generation.prefill`, optionally in chunks), call ``cache.seal()``, then append each
question to a copy of the cache (``copy.deepcopy``) and decode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import headwise.attention  # registers the "headwise" attention function
from headwise.act import SinkCalibration, parse_calibration
from headwise.budgets import check_prompt
from headwise.cache import HeadwiseCache, Plan
from headwise.errors import HeadwiseError
from headwise.policies import POLICIES, make_policy
from headwise.select import Selector, parse_selector
from headwise.sparse import Pattern, parse_pattern

PLAN_OPTIONS = ("schedule", "slope", "allocation", "floor", "group_reduce", "compensate", "chunk")


def policy_names() -> list[str]:
    """Names of the registered policies."""
    return list(POLICIES)


def _convert(raw: Any, default: Any, key: str) -> Any:
    """Convert a command-line string to the type of an option's default."""
    if not isinstance(raw, str) or isinstance(default, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise HeadwiseError(f"option {key}={raw}: expected a {type(default).__name__}") from exc
    return raw


def parse_options(options: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["window=64", "schedule=pyramid"]`` or a dict -> a dict (values still strings from the CLI)."""
    if options is None:
        return {}
    if isinstance(options, dict):
        return dict(options)
    parsed: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HeadwiseError(f"option '{item}' is not KEY=VALUE")
        parsed[key.strip()] = value.strip()
    return parsed


def make_plan(
    policy: str,
    *,
    ratio: float | None = None,
    budget: int | None = None,
    mode: str = "prefill",
    prompt_length: int | None = None,
    options: list[str] | dict[str, Any] | None = None,
    select: str | Selector | None = None,
    sparse: str | Pattern | None = None,
    act: str | SinkCalibration | None = None,
) -> Plan:
    """Validate everything and build a :class:`~headwise.cache.Plan` (no model needed).

    With ``prompt_length``, the plan is also checked against the prompt (:func:`headwise.budgets.check_prompt`).
    ``select`` adds a decode-time selection rule (:mod:`headwise.select`), as a rule or in ``--select``'s form
    (``"quest:budget=256"``), or as the option ``select``; it combines with any policy, ``full`` included.
    ``sparse`` adds a sparse prefill pattern (:mod:`headwise.sparse`), as a pattern or in ``--sparse``'s form
    (``"ashape:local_blocks=4"``); it too combines with any policy.
    ``act`` adds attention-sink calibration (:mod:`headwise.act`), as a :class:`~headwise.act.SinkCalibration` or in
    ``--act``'s form (``"profile.json:beta=0.4"``); it combines with any policy that prefills without a dense
    prefill, but not with ``sparse``, ``select`` or ``compensate`` (:class:`~headwise.cache.Plan`).
    A policy that does not compress (``full``) takes no ratio above 0, no budget and no options. A policy that needs
    one allocation (:meth:`~headwise.policies.base.Policy.allocation`: ``kvzip``'s global one) gets it by default,
    and a policy's preferred plan options (:meth:`~headwise.policies.base.Policy.plan_defaults`) apply unless given.
    """
    opts = parse_options(options)
    if "select" in opts:  # also a plan option, so that -o select=quest:budget=256 reaches bench and serve
        if select is not None:
            raise HeadwiseError("give the selection rule once: as select= or as the option select")
        select = opts.pop("select")
    plan_defaults = {f.name: f.default for f in dataclasses.fields(Plan) if f.name in PLAN_OPTIONS}
    plan_opts = {k: _convert(opts.pop(k), plan_defaults[k], k) for k in list(opts) if k in plan_defaults}
    if policy not in POLICIES:
        raise HeadwiseError(f"unknown policy '{policy}'; available: {', '.join(POLICIES)}")
    policy_defaults = {f.name: f.default for f in dataclasses.fields(POLICIES[policy])}
    policy_opts = {k: _convert(v, policy_defaults.get(k), k) for k, v in opts.items()}
    try:
        pol = make_policy(policy, policy_opts)
    except HeadwiseError as exc:
        raise HeadwiseError(f"{exc} (plan options: {', '.join(PLAN_OPTIONS)})") from exc
    if not pol.compresses and (ratio or budget is not None or policy_opts or plan_opts):
        raise HeadwiseError(f"policy '{policy}' keeps the whole cache: it takes no ratio, budget or options")
    if ratio is None and budget is None and not pol.compresses:
        ratio = 0.0
    if (needs := pol.allocation()) not in (None, "own"):  # the allocation the policy needs, unless asked for
        plan_opts.setdefault("allocation", needs)  # (then Plan checks it)
    given = set(plan_opts)
    for key, value in pol.plan_defaults().items():
        plan_opts.setdefault(key, value)
    selector = parse_selector(select) if isinstance(select, str) else select
    pattern = parse_pattern(sparse) if isinstance(sparse, str) else sparse
    calibration = parse_calibration(act) if isinstance(act, str) else act
    plan = Plan(policy=pol, ratio=ratio, budget=budget, mode=mode, select=selector, sparse=pattern, act=calibration,
                **plan_opts)
    for key, needs, applies in (("slope", "schedule=pyramid", plan.schedule == "pyramid"),
                                ("floor", "allocation=adaptive or global", plan.allocation in ("adaptive", "global"))):
        if key in given and not applies:
            raise HeadwiseError(f"option {key} applies only with {needs}")
    if prompt_length is not None:
        check_prompt(plan, prompt_length)
    return plan


def make_cache(
    model: torch.nn.Module,
    policy: str = "full",
    *,
    ratio: float | None = None,
    budget: int | None = None,
    mode: str = "prefill",
    prompt_length: int | None = None,
    options: list[str] | dict[str, Any] | None = None,
    select: str | Selector | None = None,
    sparse: str | Pattern | None = None,
    act: str | SinkCalibration | None = None,
) -> HeadwiseCache:
    """A compressed cache for ``model`` and select the ``"headwise"`` attention on it.

    Parameters
    ----------
    model : transformers causal LM
    policy : str
        A name from :func:`policy_names`.
    ratio : float, optional
        Fraction of the tokens removed, in [0, 1).
    budget : int, optional
        Tokens kept per KV head (instead of ``ratio``).
    mode : str
        ``"prefill"`` (compress after each prefill chunk) or ``"decode"`` (also hold the budget while decoding).
    prompt_length : int, optional
        When known, used to check the budget against the prompt.
    options : list of "KEY=VALUE" or dict
        Policy options (e.g. ``window``, ``sinks``) and plan options (``schedule``, ``slope``, ``allocation``,
        ``floor``, ``group_reduce``).
    select : str or Selector, optional
        A decode-time selection rule, e.g. ``"quest:budget=256"`` (see :func:`make_plan`).
    sparse : str or Pattern, optional
        A sparse prefill pattern, e.g. ``"ashape:local_blocks=4"`` (see :func:`make_plan`).
    act : str or SinkCalibration, optional
        Attention-sink calibration of a profile's sink heads, e.g. ``"profile.json:beta=0.4"`` (see :func:`make_plan`).
    """
    plan = make_plan(policy, ratio=ratio, budget=budget, mode=mode, prompt_length=prompt_length, options=options,
                     select=select, sparse=sparse, act=act)
    if plan.needs_dense_prefill():
        raise HeadwiseError(f"policy '{policy}' with allocation '{plan.allocation}' needs a dense prefill (a "
                            "reconstruction of the context, or every layer's scores at once): build its cache with "
                            "headwise.dense.prefill, as `headwise serve` does for a context and `headwise bench` "
                            "question-agnostic")
    model.set_attn_implementation(headwise.attention.NAME)
    return HeadwiseCache(model.config, plan)

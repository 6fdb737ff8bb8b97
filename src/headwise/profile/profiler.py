"""Profile every attention head of a model on calibration inputs and assign head roles.

Three kinds of pass, all through :func:`headwise.capture.capture`:

1. one prose pass (standard-library docstrings): sinks, locality, entropy, attention maps, a token-level sample,
   and the head view of that sample (:func:`headwise.explain.headview.head_view`: a joint 2-D map of each head's
   queries and keys, and the attention of a few of its tokens), from one more forward pass over the sample alone
   (causal attention: the same queries and keys as in the long pass);
2. one repeated-random-tokens pass: previous-token and induction scores (Olsson et al. 2022);
3. ``runs`` needle-in-a-haystack generations: the copy-paste retrieval score of Wu et al. 2024. The prompt is
   prefilled with the ordinary attention and only its last token and the greedy decoding steps are captured,
   so each generated token has the argmax position of every head when it was produced. Runs whose answer is
   wrong are excluded from the score, counted, and reported loudly; if every run fails, profiling stops with
   a :class:`~headwise.errors.HeadwiseError` rather than return empty scores.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm
from transformers import DynamicCache

from headwise.capture import CaptureSettings, capture
from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.explain.headview import HeadView, head_view
from headwise.generation import Sampling, decode, prefill, stop_token_ids
from headwise.models import LoadedModel
from headwise.profile.data import (
    STDLIB_MODULES,
    needle_task,
    prose_ids,
    python_version,
    repeated_random_ids,
)
from headwise.profile.metrics import (
    RoleThresholds,
    aggregate_kv,
    assign_roles,
    copy_paste_hits,
    kv_aggregation,
    sink_scores,
)
from headwise.profile.schema import HeadProfile


@dataclass(frozen=True)
class ProfileSettings:
    """How to profile.

    Parameters
    ----------
    length
        Tokens of the prose pass and of each needle prompt.
    repeat_length
        Tokens of the repeated-random-tokens pass (two copies of ``repeat_length // 2`` tokens).
    runs
        Needle-in-a-haystack runs for the retrieval score.
    seed
        Seed of every calibration input.
    max_new_tokens
        Generation budget per needle run.
    sample_tokens
        Leading tokens of the prose sample kept for the token-level view and the head view of the report.
    capture
        What the attention capture accumulates.
    thresholds
        Role thresholds.
    """

    length: int = 2048
    repeat_length: int = 1024
    runs: int = 4
    seed: int = 0
    max_new_tokens: int = 16
    sample_tokens: int = 256
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    thresholds: RoleThresholds = field(default_factory=RoleThresholds)

    def __post_init__(self) -> None:
        if self.length < 64 or self.repeat_length < 8:
            raise HeadwiseError(f"--length must be >= 64 and the repeat length >= 8, got {self.length}, "
                                f"{self.repeat_length}")
        if self.runs < 1:
            raise HeadwiseError(f"--runs must be at least 1, got {self.runs}")
        if self.thresholds.local_window not in self.capture.windows:
            raise HeadwiseError(f"the role window {self.thresholds.local_window} is not among the capture windows "
                                f"{self.capture.windows}")


@dataclass
class ProfileResult:
    """A profile plus what the report draws: pooled maps, the token sample, its head view, and timings."""

    profile: HeadProfile
    maps: torch.Tensor
    sample_tokens: list[str]
    sample_received: torch.Tensor
    timings: dict[str, float]
    head_view: HeadView


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).double()


def _prose_pass(
    lm: LoadedModel, settings: ProfileSettings,
) -> tuple[dict, torch.Tensor, list[str], torch.Tensor, list, list[int]]:
    """Sinks, locality, entropy, maps, the token sample and its ids from one prose pass."""
    ids = prose_ids(lm.tokenizer, settings.length, settings.seed)
    if len(ids) > lm.info.context_length:
        raise HeadwiseError(f"--length {len(ids)} exceeds the model's context ({lm.info.context_length})")
    with torch.inference_mode(), capture(lm.model, replace(settings.capture, keep_argmax=False)) as rec:
        lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    layers = [rec.layers[i] for i in range(lm.info.num_layers)]
    th = settings.thresholds
    per_layer = [sink_scores(st.received_mean(), st.visible, th) for st in layers]
    metrics = {name: _stack([s[name] for s in per_layer]) for name in per_layer[0]}
    locality = _stack([st.locality() for st in layers])
    for i, w in enumerate(settings.capture.windows):
        metrics[f"locality_{w}"] = locality[:, :, i]
    metrics["entropy"] = _stack([st.entropy() for st in layers])
    maps = _stack([st.attention_map() for st in layers]).float()
    n = min(settings.sample_tokens, len(ids))
    tokens = [lm.tokenizer.decode([t]) for t in ids]
    received = _stack([st.received_mean()[:, :n] for st in layers]).float()
    sinks = _other_sinks(layers, tokens, th)
    return metrics, maps, tokens[:n], received, sinks, ids[:n]


def _other_sinks(layers: list, tokens: list[str], th: RoleThresholds) -> list[dict]:
    """Positions beyond the first that exceed the ACT threshold in some head, most-flagged first (top 10)."""
    gu = torch.zeros(len(tokens))
    act = torch.zeros(len(tokens))
    for st in layers:
        seen = st.visible >= min(th.min_seen, float(st.visible.max()))
        score = st.received_mean().masked_fill(~seen, 0.0)
        gu += (score > th.gu_sink).sum(0)
        act += (score > th.act_sink).sum(0)
    found = [
        {"position": p, "token": tokens[p], "heads_gu": int(gu[p]), "heads_act": int(act[p])}
        for p in range(1, len(tokens)) if act[p] > 0
    ]
    return sorted(found, key=lambda s: (-s["heads_act"], s["position"]))[:10]


def _repeat_pass(lm: LoadedModel, settings: ProfileSettings) -> dict[str, torch.Tensor]:
    """Previous-token and induction scores on a repeated random token sequence."""
    ids = repeated_random_ids(lm.tokenizer, settings.repeat_length, settings.seed)
    with torch.inference_mode(), capture(lm.model, replace(settings.capture, keep_argmax=False)) as rec:
        rec.set_input(ids)
        lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    layers = [rec.layers[i] for i in range(lm.info.num_layers)]
    return {
        "prev_token": _stack([st.previous_token() for st in layers]),
        "induction": _stack([st.induction() for st in layers]),
    }


def _absolute_argmax(stats, prompt_length: int) -> torch.Tensor:
    """``[heads, steps]`` absolute argmax positions of one-query passes (the prompt's last token, then decoding).

    Pass ``t`` sees ``prompt_length + t`` positions; a sliding-window cache layer holds only the last
    ``key_lengths[t]`` of them, so its indices are shifted by the difference.
    """
    shifts = [prompt_length + t - n for t, n in enumerate(stats.key_lengths)]
    return torch.cat(stats.argmax, 1) + torch.tensor(shifts, dtype=torch.int32)


def _needle_run(lm: LoadedModel, settings: ProfileSettings, run: int) -> tuple[torch.Tensor | None, dict]:
    """One needle-in-a-haystack generation; the per-head retrieval scores, or None when the answer is wrong."""
    task = needle_task(lm.tokenizer, settings.length, settings.seed + 1000 + run, chat=lm.instruct)
    ids = torch.tensor([task.ids])
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        prefill(lm.model, ids[:, :-1], cache)
        with capture(lm.model, CaptureSettings(argmax_only=True)) as rec:
            logits = forward(lm.model, cache, ids[:, -1:]).logits[:, -1, :]
            tokens = decode(lm.model, logits, cache, max_new_tokens=settings.max_new_tokens, sampling=Sampling(),
                            stop_ids=stop_token_ids(lm))
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    info = {"seed": task.seed, "depth": round(task.depth, 3), "expected": task.answer, "answer": text.strip(),
            "prompt_tokens": len(task.ids)}
    if task.answer not in text:
        return None, info
    argmax = torch.stack([_absolute_argmax(rec.layers[i], len(task.ids)) for i in range(lm.info.num_layers)])
    return copy_paste_hits(argmax, tokens, task.ids, task.needle_positions), info


def _retrieval(lm: LoadedModel, settings: ProfileSettings, bar: tqdm) -> tuple[torch.Tensor, dict]:
    scores, failures = [], []
    for run in range(settings.runs):
        bar.set_postfix_str(f"needle run {run + 1}/{settings.runs}")
        score, info = _needle_run(lm, settings, run)
        if score is None:
            failures.append(info)
            print(f"headwise: WARNING: needle run {run + 1} answered {info['answer']!r}, expected "
                  f"{info['expected']!r}; excluded from the retrieval scores", file=sys.stderr)
        else:
            scores.append(score)
        bar.update(1)
    summary = {"runs": settings.runs, "passed": len(scores), "failed": len(failures), "failures": failures}
    if not scores:
        raise HeadwiseError(
            f"all {settings.runs} needle-in-a-haystack runs answered wrong (e.g. {failures[0]['answer']!r} for "
            f"{failures[0]['expected']!r}), so no retrieval score can be measured; "
            "try a shorter --length or a different --seed"
        )
    if failures:
        print(f"headwise: WARNING: {len(failures)} of {settings.runs} needle runs failed the correctness gate; "
              f"retrieval scores average the {len(scores)} correct runs", file=sys.stderr)
    return torch.stack(scores).mean(0), summary


def profile_model(lm: LoadedModel, settings: ProfileSettings | None = None, *, progress: bool = True) -> ProfileResult:
    """Measure every head of ``lm`` and assign roles; see the module docstring for the passes."""
    settings = settings or ProfileSettings()
    info = lm.info
    timings: dict[str, float] = {}
    with tqdm(total=2 + settings.runs, desc=f"profiling {lm.name}", unit="pass", disable=not progress) as bar:
        start = time.perf_counter()
        bar.set_postfix_str("prose")
        metrics, maps, tokens, received, sinks, sample_ids = _prose_pass(lm, settings)
        timings["prose_seconds"] = time.perf_counter() - start
        view = head_view(lm, sample_ids, max_points=len(sample_ids))
        timings["head_view_seconds"] = view.seconds
        bar.update(1)
        start = time.perf_counter()
        bar.set_postfix_str("repeated tokens")
        metrics.update(_repeat_pass(lm, settings))
        timings["repeat_seconds"] = time.perf_counter() - start
        bar.update(1)
        start = time.perf_counter()
        metrics["retrieval"], runs = _retrieval(lm, settings, bar)
        timings["needle_seconds"] = time.perf_counter() - start
    kv_metrics = {name: aggregate_kv(v, info.group_size, kv_aggregation(name)) for name, v in metrics.items()}
    th = settings.thresholds
    profile = HeadProfile(
        model=lm.name,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        layer_types=list(info.layer_types),
        settings={
            "length": settings.length, "repeat_length": settings.repeat_length, "runs": settings.runs,
            "seed": settings.seed, "max_new_tokens": settings.max_new_tokens,
            "windows": list(settings.capture.windows), "n_sink": settings.capture.n_sink, "chat": lm.instruct,
            "dtype": lm.dtype,
            "prose": f"docstrings of {len(STDLIB_MODULES)} standard-library modules, Python {python_version()}",
        },
        thresholds=asdict(th),
        metrics={name: v.tolist() for name, v in metrics.items()},
        kv_metrics={name: v.tolist() for name, v in kv_metrics.items()},
        roles=assign_roles(metrics, th),
        kv_roles=assign_roles(kv_metrics, th),
        sinks=sinks,
        retrieval_runs=runs,
    )
    profile.validate()
    return ProfileResult(profile, maps, tokens, received, timings, view)

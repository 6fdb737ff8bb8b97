"""Benchmark report from the answers: the calibration gate, headline means with intervals, paired comparisons,
per-task scores, costs, plots and provenance, as a terminal table, Markdown (BENCHMARKS.md) and one HTML page.

Input: *part* records (one cell on one context, :mod:`headwise.bench.runner`), from headwise and from peer runners
(``library`` tells them apart), each brought to one shape by :func:`harmonize`. Old-format records (one record
per cell, without ``cell`` and ``context_id``) are not supported: they are refused with a one-line error.
Calibration parts (``calibration: true``) feed the gate (:func:`headwise.bench.calibration.gate`, headwise's
full cache) and nothing else.

Every figure is computed from the answers (``samples`` of each part), not from part means:

- **Headline**, per model and length: per library x method x ratio x protocol, the score over the tasks that pass
  the gate there, as the mean of the task means, with a 95% bootstrap interval that resamples whole contexts
  within each task (:mod:`headwise.bench.intervals`); fidelity likewise: the answer NLL above the full cache's own
  (``nll - nll_full``) and top-1 agreement.
- **Ahead only by paired intervals**: within one model, length and ratio, the method with the highest headline
  score is the best; every other one is compared with it on the answers both have (same task, seed and answer
  id), and is *behind* (or *ahead*) only where the paired 95% interval of the difference excludes zero, *tied*
  otherwise.
- **Per task**: every task, those beyond the model (or not calibrated) included and flagged.
- **Costs**: KV MiB held and read per decoding step (less than held only with decode-time selection) and
  prefill/compression seconds (means over parts), decode tokens per second (over answers),
  seconds per answer (part wall seconds over answers); the sweep's wall time per library, model and length.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headwise.bench.calibration import FULL, GATE, Gate, gate
from headwise.bench.intervals import Interval, bootstrap_mean, excludes_zero, paired_difference
from headwise.errors import HeadwiseError
from headwise.policies import POLICIES
from headwise.report.html import esc, img, page, table, write_atomic

MIB = 2**20

PLOTS = {
    "score_vs_ratio.png": "Score (gate-passing tasks, mean of task means, 95% interval) vs fraction of KV removed",
    "nll_vs_ratio.png": "Answer NLL above the full cache's own vs fraction of KV removed",
    "top1_vs_ratio.png": "Top-1 agreement with the full cache's answer vs fraction of KV removed",
    "kv_bytes_vs_ratio.png": "KV-cache MiB held after prefill vs fraction removed",
    "sparse_heads.png": "Share of the causal attention sparse prefill computed, per layer (rows) and KV head (columns)",
    "needle_heads.png": "Where the needle went: the share of the needle's tokens each KV head held (rows: compressed "
                        "layers, columns: KV heads), over wrong and over right answers, every ratio",
}

ALIASES = {"peak_rss_bytes": "peak_rss", "peak_rss_delta_bytes": "peak_rss_delta"}
#: headwise options that name an input file rather than change the method; left out of method labels.
INPUT_OPTIONS = ("profile",)


def harmonize(record: dict) -> dict:
    """Bring a record to the report's fields: a peer's nested ``metrics`` and ``metadata`` lifted to the top,
    ``peak_rss_bytes``-style aliases renamed, a ``"<library>:"`` prefix dropped from the method name, and a
    headwise method run with options named with them (``snapkv window=32``), so variants get rows of their own,
    and a model run in another precision than float32 named with it (``smollm2-135m bfloat16``), so that a table
    never mixes precisions."""
    flat = {**record.get("metadata", {}), **record.get("metrics", {}), **record}
    flat = {ALIASES.get(k, k): v for k, v in flat.items()}
    if flat.get("dtype", "float32") != "float32":
        flat["model"] = f"{flat['model']} {flat['dtype']}"
    method = str(flat["method"]).removeprefix(f"{flat['library']}:")
    if flat["library"] == "headwise":
        options = sorted((k, v) for k, v in (flat.get("options") or {}).items() if k not in INPUT_OPTIONS)
        method = " ".join([method, *(f"{k}={v}" for k, v in options)])
    flat["method"] = method
    return flat


# ---------------------------------------------------------------------------------------------- answers

Setting = tuple[str, str, float, str]  # library, method, ratio, protocol


@dataclass(frozen=True)
class Answer:
    """One scored answer of one part, with what the report groups, pairs and clusters it by."""

    setting: Setting
    model: str
    length: int
    task: str
    pair: tuple  # (task, seed, answer id): the same answer under another setting
    context: tuple  # (task, seed, context id): the answers sharing a prefill
    score: float
    nll_gap: float | None  # NLL above the full cache's own
    top1: float | None


def setting(record: dict) -> Setting:
    return (record["library"], record["method"], float(record["ratio"]), record["protocol"])


def reported(records: Iterable[dict]) -> list[dict]:
    """The parts behind the reported figures (calibration parts left out); an old-format record is refused."""
    parts = []
    for r in records:
        if "context_id" not in r or "samples" not in r:
            raise HeadwiseError(
                f"record {r.get('key', '?')} ({r['library']} {r['method']}) is in the old one-record-per-cell "
                "format, which the report no longer reads: rerun the sweep into a new --out folder"
            )
        if not r.get("calibration"):
            parts.append(r)
    return parts


def _number(value: object) -> float | None:
    """A measured value, or None where there is none: absent, null, or NaN (a peer that cannot measure it)."""
    return None if value is None or math.isnan(float(value)) else float(value)


def _gap(sample: dict) -> float | None:
    nll, floor = _number(sample.get("nll")), _number(sample.get("nll_full"))
    return None if nll is None or floor is None else nll - floor


def answers(parts: Iterable[dict]) -> list[Answer]:
    """Every answer of the parts."""
    return [
        Answer(
            setting(r),
            r["model"],
            r["length"],
            r["task"],
            (r["task"], r.get("seed"), s["id"]),
            (r["task"], r.get("seed"), r["context_id"]),
            float(s["score"]),
            _gap(s),
            _number(s.get("top1")),
        )
        for r in parts
        for s in r["samples"]
    ]


def estimate(rows: Sequence[Answer], value: str) -> Interval | None:
    """Mean of ``value`` (answers lacking it skipped) over the tasks' means, with its context-cluster interval."""
    rows = [a for a in rows if getattr(a, value) is not None]
    if not rows:
        return None
    return bootstrap_mean([getattr(a, value) for a in rows], [a.context for a in rows], [a.task for a in rows])


def compare(a: Sequence[Answer], b: Sequence[Answer]) -> tuple[Interval, int] | None:
    """Paired score difference ``a - b`` on the answers both have, and their number (None when there are none)."""
    other = {x.pair: x for x in b}
    common = [(x, other[x.pair]) for x in a if x.pair in other]
    if not common:
        return None
    diff = paired_difference(
        [x.score for x, _ in common],
        [y.score for _, y in common],
        [x.context for x, _ in common],
        [x.task for x, _ in common],
    )
    return diff, len(common)


@dataclass
class Line:
    """One setting's headline at a model and length."""

    setting: Setting
    rows: list[Answer]
    score: Interval
    nll_gap: Interval | None
    top1: Interval | None
    tasks: int
    verdict: str = ""  # best, tied, behind, ahead (of the best); empty when alone at its ratio
    versus_best: tuple[Interval, int] | None = None


def headline(rows: Sequence[Answer]) -> list[Line]:
    """Lines per setting, and within each ratio the best one and every other one's paired verdict against it."""
    by_setting: dict[Setting, list[Answer]] = defaultdict(list)
    for a in rows:
        by_setting[a.setting].append(a)
    lines = [
        Line(s, r, estimate(r, "score"), estimate(r, "nll_gap"), estimate(r, "top1"), len({a.task for a in r}))
        for s, r in by_setting.items()
    ]
    lines.sort(key=lambda line: (line.setting[2], -line.score.mean, line.setting))
    by_ratio: dict[float, list[Line]] = defaultdict(list)
    for line in lines:
        by_ratio[line.setting[2]].append(line)
    for group in by_ratio.values():
        if len(group) < 2:
            continue
        best = group[0]
        best.verdict = "best"
        for line in group[1:]:
            line.versus_best = compare(line.rows, best.rows)
            if line.versus_best is None or not excludes_zero(line.versus_best[0]):
                line.verdict = "tied"
            else:
                line.verdict = "behind" if line.versus_best[0].hi < 0 else "ahead"
    return lines


@dataclass
class Panel:
    """Everything reported at one model and length."""

    model: str
    length: int
    tasks: dict[str, str]  # every task -> "pass", "beyond the model" or "not calibrated"
    lines: list[Line]  # the headline, over the gate-passing tasks
    per_task: dict[Setting, dict[str, tuple[Interval, int]]]
    parts: list[dict] = field(repr=False)


def task_status(gate_result: Gate, model: str, task: str, length: int) -> str:
    passes = gate_result.get((model, task, length))
    return "not calibrated" if passes is None else "pass" if passes[2] else "beyond the model"


def analyse(records: Sequence[dict]) -> tuple[Gate, list[Panel]]:
    """The gate, and one panel per model and length of the reported parts."""
    gate_result = gate(records)
    parts = reported(records)
    everything = answers(parts)
    panels = []
    for model, length in sorted({(r["model"], r["length"]) for r in parts}):
        rows = [a for a in everything if a.model == model and a.length == length]
        tasks = {t: task_status(gate_result, model, t, length) for t in sorted({a.task for a in rows})}
        per_task: dict[Setting, dict[str, tuple[Interval, int]]] = defaultdict(dict)
        grouped: dict[tuple[Setting, str], list[Answer]] = defaultdict(list)
        for a in rows:
            grouped[a.setting, a.task].append(a)
        for (s, task), group in sorted(grouped.items()):
            per_task[s][task] = (estimate(group, "score"), len(group))
        lines = headline([a for a in rows if tasks[a.task] == "pass"])
        panel_parts = [r for r in parts if r["model"] == model and r["length"] == length]
        panels.append(Panel(model, length, tasks, lines, dict(per_task), panel_parts))
    return gate_result, panels


# ---------------------------------------------------------------------------------------------- tables


def fmt(interval: Interval | None, digits: int = 3, sign: bool = False) -> str:
    """``0.750 [0.620, 0.860]``; ``[n/a]`` when the interval cannot be estimated; empty for no value."""
    if interval is None:
        return ""
    spec = f"{'+' if sign else ''}.{digits}f"
    if math.isnan(interval.lo):  # a single context per task: no spread to estimate
        return f"{interval.mean:{spec}} [n/a]"
    return f"{interval.mean:{spec}} [{interval.lo:{spec}}, {interval.hi:{spec}}]"


def label(library: str, method: str, protocol: str) -> str:
    """A setting's name: method, with the protocol when question-aware and the library when a peer."""
    parts = [method]
    if protocol != "agnostic":
        parts.append(f"[{protocol}]")
    if library != "headwise":
        parts.append(f"({library})")
    return " ".join(parts)


def star(name: str) -> str:
    return f"{name} ★"


def bold(name: str) -> str:
    return f"**{name}**"


GATE_HEADERS = ["model", "task", "length", "full-cache mean", "answers", f"gate (>= {GATE:g})"]


def gate_rows(gate_result: Gate) -> list[list[object]]:
    return [
        [m, t, n, f"{mean:.3f}", count, "pass" if ok else "beyond the model"]
        for (m, t, n), (mean, count, ok) in gate_result.items()
    ]


HEADLINE_HEADERS = [
    "method",
    "ratio",
    "score [95% CI]",
    "answers",
    "tasks",
    "NLL above full",
    "top-1",
    "vs best (paired, answers)",
    "verdict",
]


def headline_rows(panel: Panel, strong: Callable[[str], str]) -> list[list[object]]:
    """The headline table; the best of each ratio through ``strong``, those tied with it marked ``≈``."""
    passing = sum(status == "pass" for status in panel.tasks.values())
    rows = []
    for line in panel.lines:
        library, method, ratio, protocol = line.setting
        name = label(library, method, protocol)
        name = strong(name) if line.verdict == "best" else f"{name} ≈" if line.verdict == "tied" else name
        versus = "" if line.versus_best is None else f"{fmt(line.versus_best[0], sign=True)} ({line.versus_best[1]})"
        rows.append(
            [
                name,
                f"{ratio:g}",
                fmt(line.score),
                len(line.rows),
                f"{line.tasks}/{passing}",
                fmt(line.nll_gap),
                fmt(line.top1),
                versus,
                line.verdict,
            ]
        )
    return rows


def per_task_table(panel: Panel) -> tuple[list[str], list[list[object]]]:
    """Score [95% CI] (answers) per setting and task, every task, flagged when not in the headline."""
    tasks = list(panel.tasks)
    headers = ["method", "ratio", *(t if panel.tasks[t] == "pass" else f"{t} ({panel.tasks[t]})" for t in tasks)]
    settings = sorted(panel.per_task, key=lambda s: (s[2], s[0] != "headwise", s[1], s[3]))
    rows = []
    for s in settings:
        cells = panel.per_task[s]
        rows.append(
            [
                label(s[0], s[1], s[3]),
                f"{s[2]:g}",
                *(f"{fmt(cells[t][0])} ({cells[t][1]})" if t in cells else "" for t in tasks),
            ]
        )
    return headers, rows


def _mean(values: Iterable[float | None]) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


COST_HEADERS = [
    "method",
    "ratio",
    "KV MiB",
    "KV read/step MiB",
    "prefill s",
    "prefill computed",
    "compress s",
    "decode tok/s",
    "s/answer",
    "parts",
    "shared prefill",
]


def read_bytes(part: dict) -> float | None:
    """KV bytes one decoding step of a part reads: those held, times the fraction its answers' steps read (all
    of them but with decode-time selection, and in records older than that field)."""
    if part.get("kv_bytes") is None:
        return None
    return part["kv_bytes"] * _mean(x.get("read_fraction", 1.0) for x in part["samples"])


def cost_rows(panel: Panel) -> list[list[object]]:
    """Costs per setting over every task of the panel (parts and their answers)."""
    by_setting: dict[Setting, list[dict]] = defaultdict(list)
    for r in panel.parts:
        by_setting[setting(r)].append(r)
    rows = []
    for s in sorted(by_setting, key=lambda s: (s[2], s[0] != "headwise", s[1], s[3])):
        parts = by_setting[s]
        n_answers = sum(len(r["samples"]) for r in parts)
        tps = _mean(x.get("decode_tokens_per_second") for r in parts for x in r["samples"])
        rows.append(
            [
                label(s[0], s[1], s[3]),
                f"{s[2]:g}",
                f"{_mean(r.get('kv_bytes') for r in parts) / MIB:.2f}",
                f"{_mean(read_bytes(r) for r in parts) / MIB:.2f}",
                f"{_mean(r.get('prefill_seconds') for r in parts):.3f}",
                f"{_mean(r.get('computed_fraction', 1.0) for r in parts):.1%}",
                f"{_mean(r.get('compress_seconds') for r in parts):.3f}",
                f"{tps:.1f}",
                f"{sum(r.get('wall_seconds', 0.0) for r in parts) / n_answers:.2f}",
                len(parts),
                sum(bool(r.get("shared_prefill")) for r in parts),
            ]
        )
    return rows


SWEEP_HEADERS = ["library", "model", "length", "parts", "answers", "wall s", "s/answer", "shared prefill"]


def sweep_rows(records: Sequence[dict]) -> list[list[object]]:
    """Per library, model and length: the sweep's parts (calibration included), answers and summed wall time."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[r["library"], r["model"], r["length"]].append(r)
    rows = []
    for (library, model, length), parts in sorted(groups.items()):
        wall = sum(r.get("wall_seconds", 0.0) for r in parts)
        n_answers = sum(len(r["samples"]) for r in parts)
        rows.append(
            [
                library,
                model,
                length,
                len(parts),
                n_answers,
                f"{wall:.0f}",
                f"{wall / n_answers:.2f}",
                sum(bool(r.get("shared_prefill")) for r in parts),
            ]
        )
    return rows


PROVENANCE_HEADERS = ["library", "model", "fingerprint", "git commit", "versions", "machine"]


def provenance_rows(records: Sequence[dict]) -> list[list[object]]:
    """Distinct (library, model, fingerprint, commit, versions, machine) combinations found in the records."""
    seen: dict[tuple, list[object]] = {}
    for r in records:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(r.get("versions", {}).items()))
        machine = r.get("machine", {})
        where = f"{machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs"
        row = [r["library"], r["model"], r.get("fingerprint") or "", r.get("git_commit") or "", versions, where]
        seen.setdefault(tuple(row), row)
    return list(seen.values())


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table ("|" in a cell escaped, and "<", so a cell holds no HTML)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("<", "&lt;") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(row) for row in rows)])


def panel_title(panel: Panel) -> str:
    return f"{panel.model}, {panel.length} tokens"


def headline_note(panel: Panel) -> str:
    passing = [t for t, status in panel.tasks.items() if status == "pass"]
    if not passing:
        return "No task passes the calibration gate here: no headline."
    return f"Headline over the gate-passing tasks ({', '.join(passing)}): mean of task means."


def terminal_table(records: Sequence[dict]) -> str:
    """The calibration gate and the headline per model and length, as text."""
    if not records:
        return "no results"
    gate_result, panels = analyse(records)
    out = ["calibration gate", text_table(GATE_HEADERS, gate_rows(gate_result)) if gate_result else "(none)"]
    for panel in panels:
        out += ["", f"{panel_title(panel)}: {headline_note(panel)}"]
        rows = headline_rows(panel, star)
        if rows:
            out.append(text_table(HEADLINE_HEADERS, rows))
    return "\n".join(out)


PROTOCOL_NOTE = (
    "Question-agnostic (default): the context is prefilled and compressed, the cache sealed, and each question "
    "answered on its own copy (question and template suffix fed uncompressed, greedy answer). Question-aware "
    "rows ([aware]) compress the whole prompt, question included. Scores and fidelity are computed from the "
    "answers; intervals are 95% percentile bootstraps resampling whole contexts within each task. "
    f"A task counts in the headline at a model and length only if the full cache scores at least {GATE:g} on "
    "the calibration seed there. Within a ratio, ★ (bold in Markdown) is the best method; ≈ marks a method "
    "whose paired 95% interval of the difference with the best, on the same answers, contains zero (tied). "
    "NLL above full: the answer NLL of the full cache's answer in this cache minus the full cache's own; "
    "top-1: the fraction of its tokens still ranked first. KV bytes are those physically held after prefill."
)


def markdown_report(records: Sequence[dict]) -> str:
    """The whole report in Markdown (for BENCHMARKS.md): the gate, then per model and length the headline, the
    per-task scores and the costs, then the sweep's wall time and the provenance."""
    if not records:
        return "no results"
    gate_result, panels = analyse(records)
    out = [PROTOCOL_NOTE, "", "### Calibration gate", "", markdown_table(GATE_HEADERS, gate_rows(gate_result))]
    for panel in panels:
        out += ["", f"### {panel_title(panel)}", "", headline_note(panel)]
        rows = headline_rows(panel, bold)
        if rows:
            out += ["", markdown_table(HEADLINE_HEADERS, rows)]
        out += [
            "",
            f"#### Per task, {panel_title(panel)}",
            "",
            markdown_table(*per_task_table(panel)),
            "",
            f"#### Costs, {panel_title(panel)}",
            "",
            markdown_table(COST_HEADERS, cost_rows(panel)),
        ]
    out += [
        "",
        "### Sweep wall time (sum of part wall seconds, calibration included)",
        "",
        markdown_table(SWEEP_HEADERS, sweep_rows(records)),
        "",
        "### Provenance",
        "",
        markdown_table(PROVENANCE_HEADERS, provenance_rows(records)),
    ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def _figure_png(draw: Callable[[object, Panel], None], panels: Sequence[Panel], title: str) -> bytes:
    """Draw one axis per panel with matplotlib's Agg backend and return the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        draw(ax, panel)
        ax.set_title(panel_title(panel))
        ax.set_xlim(-0.02, 1)
        ax.set_xlabel("fraction of KV removed")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


#: Methods in a fixed order, so each gets its own colour, the same in every plot and every report.
KNOWN_METHODS = (*POLICIES, "expected_attention", "adakv_expected_attention")


def _colour(method: str) -> tuple[float, ...]:
    """A distinct tab20 colour per known method; others share the colours after them."""
    index = KNOWN_METHODS.index(method) if method in KNOWN_METHODS else len(KNOWN_METHODS) + sum(map(ord, method))
    from matplotlib import colormaps

    return tuple(colormaps["tab20"](index % 20))


def _style(library: str, method: str, protocol: str) -> dict:
    """Line style: colour by method (stable across plots), dotted with crosses for peers, squares when aware."""
    peer = library != "headwise"
    marker = ("x" if peer else "o") if protocol == "agnostic" else "s"
    return {"linestyle": ":" if peer else "-", "marker": marker, "color": _colour(method)}


def _draw_lines(ylabel: str, ylim: tuple[float, float] | None) -> Callable[[object, dict], None]:
    """A drawer of (ratio, interval) lines per library x method x protocol; the full caches as dashed levels."""

    def draw(ax, lines: dict) -> None:
        for (library, method, protocol), pts in sorted(lines.items()):
            pts = sorted(pts)
            name = label(library, method, protocol)
            if method == FULL:
                ax.axhline(
                    pts[0][1].mean, color="black" if library == "headwise" else "grey", linestyle="--", label=name
                )
                continue
            if [x for x, _ in pts] == [0.0]:  # the full cache with sparse prefill: a level of its own
                ax.axhline(pts[0][1].mean, color=_colour(method), linestyle=":", label=name)
                continue
            xs = [x for x, _ in pts]
            ys = [iv.mean for _, iv in pts]
            err = [
                [0 if math.isnan(iv.lo) else max(iv.mean - iv.lo, 0) for _, iv in pts],
                [0 if math.isnan(iv.hi) else max(iv.hi - iv.mean, 0) for _, iv in pts],
            ]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=name, **_style(library, method, protocol))
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)

    return draw


def _plot(
    panels: Sequence[Panel],
    points_of: Callable[[Panel], dict],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> bytes:
    draw = _draw_lines(ylabel, ylim)
    return _figure_png(lambda ax, panel: draw(ax, points_of(panel)), panels, title)


def _headline_points(value: str) -> Callable[[Panel], dict]:
    def points(panel: Panel) -> dict:
        lines: dict[tuple[str, str, str], list[tuple[float, Interval]]] = defaultdict(list)
        for line in panel.lines:
            interval = getattr(line, value)
            if interval is not None:
                library, method, ratio, protocol = line.setting
                lines[library, method, protocol].append((ratio, interval))
        return lines

    return points


def _kv_points(panel: Panel) -> dict:
    by: dict[Setting, list[float]] = defaultdict(list)
    for r in panel.parts:
        by[setting(r)].append(r["kv_bytes"] / MIB)
    lines: dict[tuple[str, str, str], list[tuple[float, Interval]]] = defaultdict(list)
    for (library, method, ratio, protocol), values in by.items():
        mean = sum(values) / len(values)
        lines[library, method, protocol].append((ratio, Interval(mean, mean, mean)))
    return lines


def sparse_heads(panels: Sequence[Panel]) -> dict[str, list[list[float]]]:
    """Per sparse setting (named with its panel), the mean over its parts of the computed share per layer and KV
    head."""
    out = {}
    for panel in panels:
        by: dict[Setting, list[list[list[float]]]] = defaultdict(list)
        for r in panel.parts:
            if r.get("computed_fractions"):
                by[setting(r)].append(r["computed_fractions"])
        for (library, method, ratio, protocol), grids in sorted(by.items()):
            mean = [[sum(g[i][h] for g in grids) / len(grids) for h in range(len(grids[0][i]))]
                    for i in range(len(grids[0]))]
            out[f"{panel_title(panel)}: {label(library, method, protocol)} at {ratio:g}"] = mean
    return out


def _heads_png(grids: dict[str, list[list[float]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids) + 1, 5.0), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        shown = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(name, 30)), fontsize=7)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
    fig.colorbar(shown, ax=axes[0].tolist(), label="computed share")
    fig.suptitle(PLOTS["sparse_heads.png"], fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grid(kept: dict[str, list[float]]) -> list[list[float]]:
    return [kept[layer] for layer in sorted(kept, key=int)]


def needle_heads(panels: Sequence[Panel]) -> dict[tuple[str, str], dict[str, tuple[list[list[float]], int]]]:
    """Per panel and compressed method (its label), the mean share of the needle each KV head held over the wrong
    answers and over the right ones (every ratio), with how many answers each mean has."""
    out: dict[tuple[str, str], dict[str, tuple[list[list[float]], int]]] = {}
    for panel in panels:
        by: dict[str, dict[str, list[list[list[float]]]]] = defaultdict(lambda: {"wrong": [], "right": []})
        for r in panel.parts:
            for s in r.get("samples", ()):
                if s.get("needle_kept"):
                    kind = "right" if s["score"] >= 1 else "wrong"
                    by[label(r["library"], r["method"], r["protocol"])][kind].append(_grid(s["needle_kept"]))
        for name, kinds in sorted(by.items()):
            out[panel_title(panel), name] = {
                kind: ([[sum(g[i][h] for g in grids) / len(grids) for h in range(len(grids[0][i]))]
                        for i in range(len(grids[0]))], len(grids)) for kind, grids in kinds.items() if grids}
    return out


def _needle_png(found: dict[tuple[str, str], dict[str, tuple[list[list[float]], int]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(found), 2, figsize=(5.4, 2.6 * len(found) + 0.6), squeeze=False,
                             layout="constrained")
    shown = None
    for row, ((title, name), kinds) in zip(axes, found.items(), strict=True):
        for ax, kind in zip(row, ("wrong", "right"), strict=True):
            if kind not in kinds:
                ax.set_axis_off()
                continue
            grid, count = kinds[kind]
            shown = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(f"{title}: {name}, {kind} ({count})", 30)), fontsize=6)
            ax.set_xticks(range(len(grid[0])))
            ax.set_xlabel("KV head", fontsize=6)
            ax.set_ylabel("layer", fontsize=6)
            ax.tick_params(labelsize=5)
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), label="share of the needle held", shrink=0.6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plots(panels: Sequence[Panel]) -> dict[str, bytes]:
    """The PNG plots, one axis per model and length (and the per-head pictures of sparse prefill and of where the
    needle went, when the records have them)."""
    pngs = {
        "score_vs_ratio.png": _plot(
            panels, _headline_points("score"), "score", PLOTS["score_vs_ratio.png"], (-0.03, 1.03)
        ),
        "nll_vs_ratio.png": _plot(
            panels, _headline_points("nll_gap"), "NLL above full (nats/token)", PLOTS["nll_vs_ratio.png"]
        ),
        "top1_vs_ratio.png": _plot(
            panels, _headline_points("top1"), "top-1 agreement", PLOTS["top1_vs_ratio.png"], (-0.03, 1.03)
        ),
        "kv_bytes_vs_ratio.png": _plot(panels, _kv_points, "KV MiB", PLOTS["kv_bytes_vs_ratio.png"]),
    }
    grids = sparse_heads(panels)
    if grids:
        pngs["sparse_heads.png"] = _heads_png(grids)
    found = needle_heads(panels)
    if found:
        pngs["needle_heads.png"] = _needle_png(found)
    return pngs


# ---------------------------------------------------------------------------------------------- HTML


def render_html(
    records: Sequence[dict],
    gate_result: Gate,
    panels: Sequence[Panel],
    pngs: dict[str, bytes],
    title: str = "headwise benchmark",
) -> str:
    """The report page: the gate, plots embedded as data URIs, the tables per model and length, provenance."""
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{esc(PROTOCOL_NOTE)}</p>',
        "<h2>Calibration gate</h2>" + table(GATE_HEADERS, gate_rows(gate_result), text_columns=2),
    ]
    for name, png in pngs.items():
        body.append(f"<h2>{esc(PLOTS[name])}</h2>{img(png, PLOTS[name])}")
    for panel in panels:
        body.append(f"<h2>{esc(panel_title(panel))}</h2><p>{esc(headline_note(panel))}</p>")
        rows = headline_rows(panel, star)
        if rows:
            body.append(table(HEADLINE_HEADERS, rows, text_columns=1))
        body.append("<h3>Per task</h3>" + table(*per_task_table(panel), text_columns=1))
        body.append("<h3>Costs</h3>" + table(COST_HEADERS, cost_rows(panel), text_columns=1))
    body.append(
        "<h2>Sweep wall time (sum of part wall seconds, calibration included)</h2>"
        + table(SWEEP_HEADERS, sweep_rows(records), text_columns=2)
    )
    body.append("<h2>Provenance</h2>" + table(PROVENANCE_HEADERS, provenance_rows(records), text_columns=6))
    return page(title, "\n".join(body))


def build_report(records: Sequence[dict], out_dir: Path) -> Path:
    """Write the PNG plots and ``report.html`` into ``out_dir`` (atomically); return the HTML path."""
    gate_result, panels = analyse(records)
    pngs = plots(panels)
    for name, png in pngs.items():
        write_atomic(out_dir / name, png)
    path = out_dir / "report.html"
    write_atomic(path, render_html(records, gate_result, panels, pngs))
    return path

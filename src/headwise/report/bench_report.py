"""Benchmark report: a terminal table, PNG plots (matplotlib Agg) and one self-contained HTML page.

Input is a list of results records (see :mod:`headwise.bench.store`) from headwise and from peer runners
(``library`` tells them apart). Scores are averaged over tasks for the plots and the summary table; the
detail table lists every cell. The full cache (``method == "full"``) of each library is the baseline:
a dashed horizontal line in the score plot. Peers are drawn dotted with cross markers, headwise solid.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from headwise.policies import POLICIES
from headwise.report.html import esc, img, page, table, write_atomic

MIB = 2**20
FULL = "full"

PLOTS = {
    "score_vs_ratio.png": "Score (mean over tasks) vs fraction of the KV cache removed",
    "kv_bytes_vs_ratio.png": "KV-cache MiB held after prefill vs fraction removed",
    "prefill_vs_length.png": "Prefill seconds vs prompt length",
}


ALIASES = {"peak_rss_bytes": "peak_rss", "peak_rss_delta_bytes": "peak_rss_delta"}
#: headwise options that name an input file rather than change the method; left out of method labels.
INPUT_OPTIONS = ("profile",)


def harmonize(record: dict) -> dict:
    """Bring a record to the report's fields: a peer's nested ``metrics`` and ``metadata`` lifted to the top,
    ``peak_rss_bytes``-style aliases renamed, a ``"<library>:"`` prefix dropped from the method name, and a
    headwise method run with options named with them (``snapkv window=32``), so variants get rows of their own."""
    flat = {**record.get("metadata", {}), **record.get("metrics", {}), **record}
    flat = {ALIASES.get(k, k): v for k, v in flat.items()}
    method = str(flat["method"]).removeprefix(f"{flat['library']}:")
    if flat["library"] == "headwise":
        options = sorted((k, v) for k, v in (flat.get("options") or {}).items() if k not in INPUT_OPTIONS)
        method = " ".join([method, *(f"{k}={v}" for k, v in options)])
    flat["method"] = method
    return flat


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def group_mean(records: Iterable[dict], keys: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of ``value`` over the records sharing the same ``keys`` fields (records without ``value`` skipped)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.get(value) is not None:
            groups[tuple(r[k] for k in keys)].append(float(r[value]))
    return {k: _mean(v) for k, v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))}


def label(library: str, method: str, protocol: str) -> str:
    """Legend label of a line: method, with the protocol when question-aware and the library when a peer."""
    parts = [method]
    if protocol != "agnostic":
        parts.append(f"[{protocol}]")
    if library != "headwise":
        parts.append(f"({library})")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- tables

SUMMARY_KEYS = ("library", "model", "method", "ratio", "protocol")


def summary(records: Sequence[dict]) -> tuple[list[str], list[list[object]]]:
    """Headers and rows: one row per library x model x method x ratio x protocol, a score column per
    task/length, then the mean score, KV MiB, prefill seconds and decode tokens per second."""
    columns = sorted({(r["task"], r["length"]) for r in records}, key=lambda c: (c[0], c[1]))
    scores = group_mean(records, (*SUMMARY_KEYS, "task", "length"), "score")
    headers = ["library", "model", "method", "ratio", "protocol", *(f"{t} {n}" for t, n in columns),
               "mean score", "KV MiB", "prefill s", "decode tok/s"]
    metrics = [group_mean(records, SUMMARY_KEYS, name)
               for name in ("score", "kv_bytes", "prefill_seconds", "decode_tokens_per_second")]
    rows = []
    for key in metrics[0]:
        cells = [f"{scores[(*key, *c)]:.2f}" if (*key, *c) in scores else "" for c in columns]
        mean, kv, pre, tps = (m.get(key, float("nan")) for m in metrics)
        rows.append([*key[:3], f"{key[3]:g}", key[4], *cells, f"{mean:.3f}", f"{kv / MIB:.1f}", f"{pre:.2f}",
                     f"{tps:.1f}"])
    return headers, rows


def score_grid(records: Sequence[dict]) -> tuple[list[str], list[list[object]]]:
    """Headers and rows of the side-by-side view: one row per library x method x protocol, one column per
    length x ratio holding the score averaged over tasks (the full cache's row has ratio 0 only). A mean over
    fewer tasks than the length has anywhere in the records says so: ``0.250 (3/6 tasks)``."""
    group = ("library", "method", "protocol", "length", "ratio")
    means = group_mean(records, group, "score")
    tasks: dict[tuple, set] = defaultdict(set)  # per cell of the grid
    length_tasks: dict[int, set] = defaultdict(set)  # per length, over all methods
    for r in records:
        tasks[tuple(r[k] for k in group)].add(r["task"])
        length_tasks[r["length"]].add(r["task"])
    columns = sorted({(length, ratio) for (*_, length, ratio) in means})
    rows: dict[tuple, dict] = defaultdict(dict)
    for (library, method, protocol, length, ratio), value in means.items():
        done, wanted = len(tasks[library, method, protocol, length, ratio]), len(length_tasks[length])
        partial = f" ({done}/{wanted} tasks)" if done < wanted else ""
        rows[library, method, protocol][length, ratio] = f"{value:.3f}{partial}"
    headers = ["library", "method", "protocol", *(f"{n} @{r:g}" for n, r in columns)]
    body = [[*key, *(cells.get(c, "") for c in columns)] for key, cells in rows.items()]
    return headers, body


DETAIL_HEADERS = ["library", "method", "ratio", "protocol", "task", "length", "samples", "score", "KV MiB",
                  "peak RSS +MiB", "prefill s", "decode tok/s"]


def detail_rows(records: Sequence[dict]) -> list[list[object]]:
    """One row per cell (record)."""
    ordered = sorted(records, key=lambda r: (r["task"], r["length"], r["library"], r["method"], r["ratio"],
                                             r["protocol"]))
    return [
        [r["library"], r["method"], f"{r['ratio']:g}", r["protocol"], r["task"], r["length"], r.get("n_samples", ""),
         f"{r['score']:.3f}", f"{r.get('kv_bytes', 0) / MIB:.1f}", f"{r.get('peak_rss_delta', 0) / MIB:.0f}",
         f"{r.get('prefill_seconds', 0):.2f}", f"{r.get('decode_tokens_per_second', 0):.1f}"]
        for r in ordered
    ]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table ("|" in a cell escaped)."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(row) for row in rows)])


def terminal_table(records: Sequence[dict]) -> str:
    """The summary table as text."""
    if not records:
        return "no results"
    return text_table(*summary(records))


# ---------------------------------------------------------------------------------------------- plots


def _figure_png(draw: Callable[[object], None], panels: Sequence[object], title: str) -> bytes:
    """Draw one panel per item with matplotlib's Agg backend and return the PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        draw(ax, panel)
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
    colour = _colour(method)
    marker = ("x" if peer else "o") if protocol == "agnostic" else "s"
    return {"linestyle": ":" if peer else "-", "marker": marker, "color": colour}


def _lines(records: Sequence[dict], length: int, value: str) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """Per (library, method, protocol), the (ratio, mean value over tasks) points at one length."""
    means = group_mean([r for r in records if r["length"] == length and r["method"] != FULL],
                       ("library", "method", "protocol", "ratio"), value)
    lines: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for (library, method, protocol, ratio), v in means.items():
        lines[(library, method, protocol)].append((ratio, v))
    return {k: sorted(v) for k, v in lines.items()}


def _draw_vs_ratio(
    records: Sequence[dict], value: str, scale: float, ylabel: str, ylim: tuple[float, float] | None = None
) -> Callable[[object, int], None]:
    def draw(ax, length: int) -> None:
        for (library, method, protocol), points in _lines(records, length, value).items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [y / scale for y in ys], label=label(library, method, protocol),
                    **_style(library, method, protocol))
        baselines = group_mean([r for r in records if r["length"] == length and r["method"] == FULL],
                               ("library",), value)
        for (library,), v in baselines.items():
            ax.axhline(v / scale, color="black" if library == "headwise" else "grey", linestyle="--",
                       label=label(library, FULL, "agnostic"))
        ax.set_title(f"{length} tokens")
        ax.set_xlim(0, 1)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel("fraction of KV removed")
        ax.set_ylabel(ylabel)

    return draw


def plot_score_vs_ratio(records: Sequence[dict]) -> bytes:
    lengths = sorted({r["length"] for r in records})
    draw = _draw_vs_ratio(records, "score", 1.0, "score", (-0.03, 1.03))
    return _figure_png(draw, lengths, PLOTS["score_vs_ratio.png"])


def plot_kv_vs_ratio(records: Sequence[dict]) -> bytes:
    lengths = sorted({r["length"] for r in records})
    return _figure_png(_draw_vs_ratio(records, "kv_bytes", MIB, "KV MiB"), lengths, PLOTS["kv_bytes_vs_ratio.png"])


def plot_prefill_vs_length(records: Sequence[dict]) -> bytes:
    """Prefill seconds vs length, one line per library x method x protocol (mean over ratios and tasks)."""

    def draw(ax, _panel: None) -> None:
        means = group_mean(records, ("library", "method", "protocol", "length"), "prefill_seconds")
        lines: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
        for (library, method, protocol, length), v in means.items():
            lines[(library, method, protocol)].append((length, v))
        for (library, method, protocol), points in lines.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, label=label(library, method, protocol), **_style(library, method, protocol))
        ax.set_xlabel("target length (tokens)")
        ax.set_ylabel("prefill seconds (mean over ratios)")

    return _figure_png(draw, [None], PLOTS["prefill_vs_length.png"])


PLOTTERS: dict[str, Callable[[Sequence[dict]], bytes]] = {
    "score_vs_ratio.png": plot_score_vs_ratio,
    "kv_bytes_vs_ratio.png": plot_kv_vs_ratio,
    "prefill_vs_length.png": plot_prefill_vs_length,
}


# ---------------------------------------------------------------------------------------------- HTML


PROVENANCE_KEYS = ("library", "model", "git_commit")


def provenance_rows(records: Sequence[dict]) -> list[list[object]]:
    """Distinct (library, model, commit, versions, machine) combinations found in the records."""
    seen: dict[tuple, list[object]] = {}
    for r in records:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(r.get("versions", {}).items()))
        machine = r.get("machine", {})
        where = f"{machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs"
        row = [*(r.get(k) or "" for k in PROVENANCE_KEYS), versions, where]
        seen.setdefault(tuple(row), row)
    return list(seen.values())


PROTOCOL_NOTE = (
    "Question-agnostic (default): the context is prefilled and compressed before the question is appended; "
    "the question and the chat template's suffix are then fed uncompressed and the answer is decoded greedily. "
    "Question-aware rows ([aware]) compress the whole prompt, question included. KV bytes are the bytes "
    "physically held by keys and values after the compressed prefill. Scores are means over samples (and over "
    "tasks in the plots and the summary)."
)


def render_html(records: Sequence[dict], plots: dict[str, bytes], title: str = "headwise benchmark") -> str:
    """The report page: plots embedded as data URIs, summary and detail tables, provenance."""
    body = [f"<h1>{esc(title)}</h1>", f"<p class=\"meta\">{esc(PROTOCOL_NOTE)}</p>"]
    for name, png in plots.items():
        body.append(f"<h2>{esc(PLOTS[name])}</h2>{img(png, PLOTS[name])}")
    headers, rows = score_grid(records)
    body.append("<h2>Mean score by length @ ratio removed</h2>" + table(headers, rows, text_columns=3))
    headers, rows = summary(records)
    body.append("<h2>Summary</h2>" + table(headers, rows, text_columns=5))
    body.append("<h2>Every cell</h2>" + table(DETAIL_HEADERS, detail_rows(records), text_columns=5))
    body.append("<h2>Provenance</h2>" + table(["library", "model", "git commit", "versions", "machine"],
                                              provenance_rows(records), text_columns=5))
    return page(title, "\n".join(body))


def build_report(records: Sequence[dict], out_dir: Path) -> Path:
    """Write the PNG plots and ``report.html`` into ``out_dir`` (atomically); return the HTML path."""
    plots = {name: plot(records) for name, plot in PLOTTERS.items()}
    for name, png in plots.items():
        write_atomic(out_dir / name, png)
    path = out_dir / "report.html"
    write_atomic(path, render_html(records, plots))
    return path

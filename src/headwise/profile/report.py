"""Profile outputs: ``profile.json``, PNG heatmaps (layers x heads per metric) and a self-contained HTML report.

The report embeds everything (PNG as data URIs, per-head data as base64 bytes read by a small inline script), so
it works offline with no CDN. Token text is HTML-escaped on the server side and only ever set as text by the
script; the embedded JSON escapes ``<`` so no token can close the script element.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from headwise.explain import headview_page
from headwise.profile.metrics import ROLES
from headwise.profile.profiler import ProfileResult
from headwise.profile.schema import HeadProfile
from headwise.report.html import esc, img, page, table, write_atomic

ROLE_COLORS = {"retrieval": "#d62728", "induction": "#9467bd", "sink": "#7f7f7f", "local": "#1f77b4",
               "mixed": "#e6b800"}
HTML_MAP_SIZE = 32


def heatmap_metrics(profile: HeadProfile) -> list[str]:
    """Metrics drawn as heatmaps, in report order."""
    local = sorted((k for k in profile.metrics if k.startswith("locality_")), key=lambda k: int(k.split("_")[1]))
    wanted = ["retrieval", "induction", "prev_token", "sink_first", "sink_other", *local, "entropy"]
    return [m for m in wanted if m in profile.metrics]


def heatmap_png(profile: HeadProfile, metric: str) -> bytes:
    """A layers x heads heatmap of one metric as PNG bytes."""
    values = profile.metric(metric).numpy()
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * profile.num_heads, 1.2 + 0.22 * profile.num_layers), dpi=100)
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(profile.num_heads))
    ax.set_title(f"{profile.model}: {metric}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _bytes_b64(values: torch.Tensor) -> str:
    """Values in [0, 1] as base64 of uint8 (row-major)."""
    data = (values.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy().tobytes()
    return base64.b64encode(data).decode("ascii")


def _map_bytes(maps: torch.Tensor) -> tuple[str, int]:
    """Pooled maps ``[L, H, S, S]`` shrunk to at most 32 x 32, square-root scaled per head, as base64."""
    size = maps.shape[-1]
    if size > HTML_MAP_SIZE and size % HTML_MAP_SIZE == 0:
        f = size // HTML_MAP_SIZE
        maps = maps.reshape(*maps.shape[:2], HTML_MAP_SIZE, f, HTML_MAP_SIZE, f).sum((3, 5)) / f
        size = HTML_MAP_SIZE
    scaled = maps.clamp(min=0).sqrt()
    peak = scaled.amax((-1, -2), keepdim=True).clamp(min=1e-12)
    return _bytes_b64(scaled / peak), size


def _received_bytes(received: torch.Tensor) -> str:
    """Attention received per sample token ``[L, H, T]``, scaled per head by its largest value after position 0."""
    peak = received[..., 1:].amax(-1, keepdim=True) if received.shape[-1] > 1 else received.amax(-1, keepdim=True)
    return _bytes_b64(received / peak.clamp(min=1e-12))


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _grid(profile: HeadProfile) -> str:
    """The clickable layers x heads grid, one button per head colored by role."""
    head_cells = "".join(f"<th>h{h}</th>" for h in range(profile.num_heads))
    rows = []
    for layer in range(profile.num_layers):
        kind = "S" if profile.layer_types[layer] == "sliding_attention" else ""
        cells = []
        for head in range(profile.num_heads):
            role = profile.roles[layer][head]
            tip = ", ".join(f"{m} {_fmt(profile.metrics[m][layer][head])}" for m in heatmap_metrics(profile))
            cells.append(
                f'<td><button class="cell" style="background:{ROLE_COLORS[role]}" data-layer="{layer}" '
                f'data-head="{head}" title="{esc(f"L{layer} h{head}: {role}; {tip}")}">{esc(role[0].upper())}'
                "</button></td>"
            )
        rows.append(f"<tr><th>L{layer}{kind}</th>{''.join(cells)}</tr>")
    return f'<table class="grid"><thead><tr><th></th>{head_cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary(profile: HeadProfile) -> str:
    rows = []
    for role in ROLES:
        q = sum(r == role for row in profile.roles for r in row)
        kv = sum(r == role for row in profile.kv_roles for r in row)
        layers = sorted({i for i, row in enumerate(profile.roles) if role in row})
        rows.append([role, q, kv, ", ".join(map(str, layers)) or "-"])
    return table(["role", "query heads", "KV heads", "layers"], rows, text_columns=1)


def _runs(profile: HeadProfile) -> str:
    runs = profile.retrieval_runs
    text = f"Needle runs: {runs.get('passed', 0)} of {runs.get('runs', 0)} answered correctly."
    if not runs.get("failed"):
        return f"<p>{esc(text)}</p>"
    failures = table(["seed", "depth", "expected", "answer"],
                     [[f["seed"], f["depth"], f["expected"], f["answer"]] for f in runs["failures"]], text_columns=4)
    return (f'<p class="warn">{esc(text)} {esc(runs["failed"])} failed the correctness gate and are excluded from '
            f"the retrieval scores.</p>{failures}")


SCRIPT = """
const D = JSON.parse(document.getElementById('hw-data').textContent);
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const maps = bytes(D.maps), recv = bytes(D.received);
function show(layer, head) {
  const H = D.heads, S = D.mapSize, T = D.tokens;
  document.getElementById('sel').textContent = 'layer ' + layer + ', head ' + head + ' (' + D.roles[layer][head] +
    ', KV head ' + Math.floor(head / D.group) + ')';
  const rows = D.metricNames.map(m => {
    const v = D.metrics[m][layer][head];
    return '<tr><td class="text">' + m + '</td><td>' + (v === null ? 'n/a' : v.toFixed(3)) + '</td></tr>';
  });
  document.getElementById('metrics').innerHTML = '<table>' + rows.join('') + '</table>';
  const canvas = document.getElementById('map'), ctx = canvas.getContext('2d');
  const image = ctx.createImageData(S, S), base = (layer * H + head) * S * S;
  for (let i = 0; i < S * S; i++) {
    const v = maps[base + i];
    image.data.set([255 - v, 255 - Math.round(v * 0.6), 255, 255], i * 4);
  }
  const tmp = document.createElement('canvas');
  tmp.width = S; tmp.height = S; tmp.getContext('2d').putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
  const offset = (layer * H + head) * T;
  document.querySelectorAll('#tokens span').forEach((el, t) => {
    el.style.background = 'rgba(214, 39, 40, ' + (recv[offset + t] / 255).toFixed(3) + ')';
  });
  document.querySelectorAll('button.cell').forEach(b => b.classList.toggle('on',
    b.dataset.layer == layer && b.dataset.head == head));
  HV.show(layer, head);
}
document.querySelectorAll('button.cell').forEach(b => b.addEventListener('click',
  () => show(Number(b.dataset.layer), Number(b.dataset.head))));
show(D.start[0], D.start[1]);
"""

STYLE = """
.grid td, .grid th { padding: 1px; border: none; }
button.cell { width: 2.1rem; height: 1.3rem; border: 2px solid transparent; color: #fff; font-size: 0.7rem;
              cursor: pointer; padding: 0; }
button.cell.on { border-color: #000; }
.warn { background: #fff3cd; border: 1px solid #e0a800; padding: 0.5rem; font-weight: bold; }
.panel { display: flex; gap: 2rem; flex-wrap: wrap; align-items: flex-start; }
#map { width: 320px; height: 320px; border: 1px solid #c9d1d9; image-rendering: pixelated; }
#tokens { font-family: ui-monospace, monospace; font-size: 0.8rem; white-space: pre-wrap; border: 1px solid #c9d1d9;
          padding: 0.5rem; max-height: 22rem; overflow: auto; }
.legend span { display: inline-block; padding: 0 0.5rem; color: #fff; margin-right: 0.3rem; }
"""


def _start_head(profile: HeadProfile) -> list[int]:
    """The head shown first: the strongest retrieval head (or head 0 of layer 0)."""
    scores = profile.metric("retrieval") if "retrieval" in profile.metrics else torch.zeros(1, 1)
    flat = int(torch.nan_to_num(scores, nan=-1.0).argmax())
    return [flat // scores.shape[1], flat % scores.shape[1]]


def render_html(result: ProfileResult, heatmaps: dict[str, bytes]) -> str:
    """The self-contained HTML report of a profile."""
    p = result.profile
    start = _start_head(p)
    maps_b64, map_size = _map_bytes(result.maps)
    data = {
        "heads": p.num_heads, "group": p.num_heads // p.num_kv_heads, "mapSize": map_size,
        "tokens": len(result.sample_tokens), "roles": p.roles, "metricNames": list(p.metrics),
        "metrics": json.loads(p.to_json())["metrics"], "maps": maps_b64,
        "received": _received_bytes(result.sample_received), "start": start,
        "headView": headview_page.view_data(result.head_view, (start[0], start[1])),
    }
    data_json = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    legend = "".join(f'<span style="background:{c}">{esc(r)}</span>' for r, c in ROLE_COLORS.items())
    tokens = "".join(f'<span title="{t}">{esc(tok)}</span>' for t, tok in enumerate(result.sample_tokens))
    settings = table(["setting", "value"], [[k, v] for k, v in p.settings.items()], text_columns=2)
    thresholds = table(["threshold", "value"], [[k, v] for k, v in p.thresholds.items()], text_columns=1)
    timings = ", ".join(f"{k.replace('_seconds', '')} {v:.1f} s" for k, v in result.timings.items())
    sinks = table(["position", "token", "heads > 0.3 (Gu)", "heads > 0.1 (ACT)"],
                  [[s["position"], repr(s["token"]), s["heads_gu"], s["heads_act"]] for s in p.sinks], text_columns=2)
    pictures = "".join(f"<h3>{esc(m)}</h3>{img(png, m)}" for m, png in heatmaps.items())
    body = f"""
<h1>Head profile: {esc(p.model)}</h1>
<p class="meta">{esc(p.num_layers)} layers, {esc(p.num_heads)} query heads, {esc(p.num_kv_heads)} KV heads.
Timings: {esc(timings)}.</p>
{_runs(p)}
<h2>Roles</h2>{_summary(p)}
<h2>Heads</h2>
<p class="legend">{legend} (rows marked S are sliding-window layers). Click a head.</p>
<div class="panel"><div>{_grid(p)}</div>
<div><h3 id="sel"></h3><div id="metrics"></div></div></div>
<div class="panel"><div><h3>Attention pattern (pooled, query rows x key columns)</h3>
<canvas id="map" width="320" height="320"></canvas></div>
<div style="flex:1;min-width:300px"><h3>Attention received by the first sample tokens</h3>
<div id="tokens">{tokens}</div></div></div>
<h2>Head view of the sample</h2>
<p>{esc(headview_page.EXPLANATION)} It follows the head selected in the grid above.</p>{headview_page.SECTION}
<h2>Sinks beyond the first token</h2>{sinks if p.sinks else "<p>None above the ACT threshold.</p>"}
<h2>Heatmaps</h2>{pictures}
<h2>Settings</h2>{settings}{thresholds}
<script type="application/json" id="hw-data">{data_json}</script>
"""
    view_script = headview_page.script("JSON.parse(document.getElementById('hw-data').textContent).headView")
    return page(f"headwise profile: {p.model}", body, extra_style=STYLE + headview_page.STYLE,
                script=view_script + SCRIPT)


def write_outputs(result: ProfileResult, out: Path) -> dict[str, Path]:
    """Write ``profile.json``, ``heatmap_<metric>.png`` and ``report.html`` under ``out``; return their paths."""
    out = Path(out)
    paths = {"profile": out / "profile.json", "report": out / "report.html"}
    result.profile.save(paths["profile"])
    heatmaps = {m: heatmap_png(result.profile, m) for m in heatmap_metrics(result.profile)}
    for metric, png in heatmaps.items():
        paths[metric] = out / f"heatmap_{metric}.png"
        write_atomic(paths[metric], png)
    write_atomic(paths["report"], render_html(result, heatmaps))
    return paths

"""The head view as self-contained HTML: a section shared by ``heads.html`` and the profile report.

Everything is inline (no CDN, no external file). Token text travels in the embedded JSON, which escapes ``<``, ``>``
and ``&`` so no token can close the script element, and the script only ever sets it as text. To keep the page
small at 4K-8K tokens, attention rows are stored as one byte per key (:func:`row_bytes`: a square-root scale, so
weak attention stays visible), deflated and inflated by the browser's own ``DecompressionStream`` (no library);
the 2-D points are one byte per coordinate, on a square grid per head (:func:`point_bytes`).

:func:`script` defines ``HV`` from the data of :func:`view_data`, with ``HV.show(layer, head)`` and
``HV.pick(query index)``; a page wires its head grid to ``HV.show``. ``#hv`` carries ``data-ready`` once the rows
are inflated, ``data-drawn`` after each drawing, and sends an ``hv-draw`` event then.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import torch

from headwise.explain.headview import HeadView, long_range_mass
from headwise.report.html import esc, page, write_atomic


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def row_bytes(rows: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """Attention rows ``[..., n]`` as uint8 ``round(255 * sqrt(min(p / peak, 1)))``, and the peaks ``[...]``.

    The peak is a row's largest weight after the first token: the first token is the usual attention sink and
    often takes most of the mass, which would leave every other token blank; it saturates instead.
    """
    peak = (rows[..., 1:] if rows.shape[-1] > 1 else rows).amax(-1)
    scaled = (rows / peak.clamp(min=1e-30)[..., None]).clamp(max=1).sqrt() * 255
    return scaled.round().to(torch.uint8).contiguous().numpy().tobytes(), peak


def point_bytes(queries: torch.Tensor, keys: torch.Tensor) -> bytes:
    """Points ``[layers, heads, m, 2]`` of queries and keys as uint8 ``[layers, heads, 2, m, 2]``.

    Each head's queries and keys share one square grid of 256 x 256 cells around their bounding box, so the
    picture keeps its proportions and the two sets stay comparable.
    """
    both = torch.stack([queries, keys], 2)  # [L, H, 2, m, 2]
    low = both.amin((2, 3), keepdim=True)
    high = both.amax((2, 3), keepdim=True)
    span = (high - low).amax(-1, keepdim=True).clamp(min=1e-12)
    corner = (low + high) / 2 - span / 2
    cells = ((both - corner) / span * 255).round().clamp(0, 255).to(torch.uint8)
    return cells.contiguous().numpy().tobytes()


def view_data(view: HeadView, start: tuple[int, int]) -> dict:
    """The JSON the script reads."""
    rows, peak = row_bytes(view.rows)
    return {
        "model": view.model, "layers": view.layers, "heads": view.num_heads,
        "group": view.num_heads // view.num_kv_heads, "tokens": view.tokens, "queries": view.query_positions,
        "points": view.point_positions, "pointData": _b64(point_bytes(view.queries_2d, view.keys_2d)),
        "rows": _b64(zlib.compress(rows, 6)), "rowMax": [float(f"{p:.4g}") for p in peak.reshape(-1).tolist()],
        "first": [float(f"{p:.4g}") for p in view.rows[..., 0].reshape(-1).tolist()],
        "far": long_range_mass(view.rows, view.query_positions).round(decimals=3).tolist(),
        "explained": view.explained.round(decimals=3).tolist(), "start": list(start),
    }


def script_json(data: dict) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` escaped."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


FACTORY = """
function headView(D) {
  const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
  const inflate = s => new Response(new Blob([bytes(s)]).stream().pipeThrough(new DecompressionStream('deflate')))
    .arrayBuffer().then(b => new Uint8Array(b));
  const n = D.tokens.length, P = D.queries.length, M = D.points.length, H = D.heads;
  const pts = bytes(D.pointData), root = document.getElementById('hv'), text = document.getElementById('hv-text');
  const state = {layer: D.start[0], head: D.start[1], query: P - 1};
  let rows = null;
  const fragment = document.createDocumentFragment();
  const spans = D.tokens.map((t, i) => {
    const s = document.createElement('span');
    s.textContent = t;
    s.title = '#' + i;
    fragment.appendChild(s);
    return s;
  });
  text.appendChild(fragment);
  const scrollTo = t => { text.scrollTop = spans[t].offsetTop - text.offsetTop - text.clientHeight / 3; };
  const queryButtons = D.queries.map((p, j) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'hv-qbtn';
    b.textContent = '#' + p + ' ' + D.tokens[p];
    b.addEventListener('click', () => pick(j));
    document.getElementById('hv-queries').appendChild(b);
    spans[p].classList.add('hv-q');
    spans[p].addEventListener('click', () => pick(j));
    return b;
  });
  function scatter(li, p, top) {
    const canvas = document.getElementById('hv-scatter'), ctx = canvas.getContext('2d');
    const pad = 10, k = (canvas.width - 2 * pad) / 255, base = (li * H + state.head) * 4 * M;
    const at = (set, i) => [pad + pts[base + (set * M + i) * 2] * k,
                            canvas.height - pad - pts[base + (set * M + i) * 2 + 1] * k];
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    [[1, 'rgba(255, 127, 14, 0.75)'], [0, 'rgba(31, 119, 180, 0.75)']].forEach(([set, color]) => {
      ctx.fillStyle = color;
      for (let i = 0; i < M; i++) {
        const [x, y] = at(set, i);
        ctx.fillRect(x - 2, y - 2, 4, 4);
      }
    });
    const ring = (set, t, color) => {
      const i = D.points.indexOf(t);
      if (i < 0) return;
      const [x, y] = at(set, i);
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(x, y, 7, 0, 2 * Math.PI);
      ctx.stroke();
    };
    top.slice(0, 3).forEach(t => ring(1, t, '#a50f15'));
    ring(0, p, '#000');
  }
  const weight = (r, t) => t === 0 ? D.first[r] : (rows[r * n + t] / 255) ** 2 * D.rowMax[r];
  function topKeys(r, p) {
    const found = [];
    for (let t = 0; t <= p; t++) if (rows[r * n + t] > 0) found.push(t);
    return found.sort((a, b) => weight(r, b) - weight(r, a)).slice(0, 10);
  }
  function table(r, top) {
    const body = document.querySelector('#hv-top tbody');
    body.replaceChildren(...top.map(t => {
      const tr = document.createElement('tr');
      [String(t), D.tokens[t], weight(r, t).toPrecision(2)].forEach((value, c) => {
        const td = document.createElement('td');
        td.textContent = value;
        if (c === 1) td.className = 'text';
        tr.appendChild(td);
      });
      tr.addEventListener('click', () => scrollTo(t));
      return tr;
    }));
  }
  function draw() {
    const li = D.layers.indexOf(state.layer), p = D.queries[state.query];
    const sel = document.getElementById('hv-sel');
    queryButtons.forEach((b, j) => b.classList.toggle('on', j === state.query));
    if (li < 0) {
      sel.textContent = 'layer ' + state.layer + ' is not in this head view';
      return;
    }
    sel.textContent = 'layer ' + state.layer + ', head ' + state.head + ' (KV head ' +
      Math.floor(state.head / D.group) + '), query #' + p + ' ' + JSON.stringify(D.tokens[p]);
    const e = D.explained[li][state.head];
    document.getElementById('hv-pca').textContent = 'The two components explain ' + (100 * e[0]).toFixed(1) +
      '% and ' + (100 * e[1]).toFixed(1) + '% of the variance of this head\\'s ' + M + ' drawn tokens\\' vectors.';
    const r = (li * H + state.head) * P + state.query;
    const top = rows === null ? [] : topKeys(r, p);
    scatter(li, p, top);
    if (rows === null) return;
    spans.forEach((s, t) => {
      const v = rows[r * n + t];
      s.style.background = v ? 'rgba(214, 39, 40, ' + (v / 255).toFixed(3) + ')' : '';
      s.classList.toggle('hv-now', t === p);
      s.classList.toggle('hv-future', t > p);
    });
    table(r, top);
    root.dataset.drawn = state.layer + ',' + state.head + ',' + p;
    root.dispatchEvent(new CustomEvent('hv-draw', {detail: {query: state.query}}));
  }
  function show(layer, head) {
    state.layer = layer;
    state.head = head;
    draw();
  }
  function pick(j) {
    state.query = j;
    draw();
    scrollTo(D.queries[j]);
  }
  inflate(D.rows).then(r => {
    rows = r;
    root.dataset.ready = '1';
    draw();
  });
  return {show, pick, data: D};
}
"""


def script(data_js: str) -> str:
    """The head-view script, with ``HV`` built from the JavaScript expression ``data_js`` (the parsed data)."""
    return f"{FACTORY}const HV = headView({data_js});\n"

STYLE = """
#hv-scatter { width: 360px; height: 360px; border: 1px solid #c9d1d9; }
#hv-text { font-family: ui-monospace, monospace; font-size: 0.8rem; white-space: pre-wrap; border: 1px solid #c9d1d9;
           padding: 0.5rem; max-height: 28rem; overflow: auto; }
#hv-text span.hv-q { outline: 1px solid #1f77b4; cursor: pointer; }
#hv-text span.hv-now { outline: 2px solid #000; }
#hv-text span.hv-future { color: #8c959f; }
#hv-top tr { cursor: pointer; }
button.hv-qbtn { margin: 0 0.3rem 0.3rem 0; border: 1px solid #1f77b4; background: #fff; cursor: pointer;
                 font-family: ui-monospace, monospace; white-space: pre; }
button.hv-qbtn.on { background: #1f77b4; color: #fff; }
.hv-legend span { display: inline-block; width: 0.8rem; height: 0.8rem; margin: 0 0.2rem 0 0.8rem; }
.hv-panel { display: flex; gap: 2rem; flex-wrap: wrap; align-items: flex-start; }
"""


#: The head-view markup; a page also needs :data:`STYLE` and :func:`script` (given :func:`view_data`).
SECTION = """
<div id="hv">
<p>Query tokens (outlined in the text; click one): <span id="hv-queries"></span></p>
<h3 id="hv-sel"></h3>
<div class="hv-panel">
<div><canvas id="hv-scatter" width="360" height="360"></canvas>
<p class="hv-legend meta"><span style="background:#1f77b4"></span>queries<span style="background:#ff7f0e"></span>keys;
black ring: the selected query, red rings: its three most attended keys (when drawn).</p>
<p class="meta" id="hv-pca"></p></div>
<div><h3>Most attended keys</h3>
<table id="hv-top"><thead><tr><th>position</th><th class="text">token</th><th>attention</th></tr></thead>
<tbody></tbody></table></div></div>
<h3>Attention of the selected query over the text (red; grey: later tokens)</h3>
<div id="hv-text"></div>
</div>"""


EXPLANATION = (
    "Left: the selected head's queries and keys in one plane (AttentionViz, Yeh et al. 2023): the keys are moved "
    "and both sets scaled so that their centres and mean lengths agree, which changes no attention weight, then "
    "projected on their two principal components; a query attends most to keys in the direction it points. "
    "Below: the attention of the selected query token over the whole context; a deeper red is more attention "
    "(square-root scale, relative to the largest weight after the first token, which often takes most)."
)


def _grid(view: HeadView) -> str:
    """A layers x heads grid of buttons for the standalone page."""
    head_cells = "".join(f"<th>h{h}</th>" for h in range(view.num_heads))
    rows = "".join(
        f"<tr><th>L{layer}</th>"
        + "".join(f'<td><button class="cell" data-layer="{layer}" data-head="{h}" title="layer {layer}, head {h}">'
                  "</button></td>" for h in range(view.num_heads))
        + "</tr>"
        for layer in view.layers
    )
    return f'<table class="grid"><thead><tr><th></th>{head_cells}</tr></thead><tbody>{rows}</tbody></table>'


GRID_SCRIPT = """
document.getElementById('hv').addEventListener('hv-draw', e => document.querySelectorAll('button.cell').forEach(b => {
  const far = HV.data.far[HV.data.layers.indexOf(Number(b.dataset.layer))][Number(b.dataset.head)][e.detail.query];
  b.style.background = 'rgba(31, 119, 180, ' + (0.08 + 0.92 * far).toFixed(3) + ')';
  b.title = 'layer ' + b.dataset.layer + ', head ' + b.dataset.head + ': long-range attention ' + far.toFixed(3);
}));
document.querySelectorAll('button.cell').forEach(b => b.addEventListener('click', () => {
  document.querySelectorAll('button.cell').forEach(c => c.classList.toggle('on', c === b));
  HV.show(Number(b.dataset.layer), Number(b.dataset.head));
}));
document.querySelector('button.cell').click();
"""

GRID_STYLE = """
.grid td, .grid th { padding: 1px; border: none; }
button.cell { width: 1.6rem; height: 1.1rem; border: 2px solid transparent; background: #fff; cursor: pointer;
              padding: 0; }
button.cell.on { border-color: #000; }
"""


def render_page(view: HeadView, source: str) -> str:
    """The standalone ``heads.html`` for a text read from ``source``."""
    start = (view.layers[0], 0)
    body = f"""
<h1>Head view: {esc(view.model)}</h1>
<p class="meta">{esc(source)}: {view.length} tokens; {len(view.layers)} layers x {view.num_heads} query heads
({view.num_kv_heads} KV heads); computed in {view.seconds:.1f} s.</p>
<p>{esc(EXPLANATION)} Click a head in the grid: the deeper its blue, the more of the selected query's attention
goes beyond the first token and the 32 most recent ones.</p>
<div class="hv-panel"><div>{_grid(view)}</div><div style="flex:1;min-width:360px">{SECTION}</div>
</div>
<script type="application/json" id="hv-data">{script_json(view_data(view, start))}</script>"""
    return page(f"headwise head view: {view.model}", body, extra_style=STYLE + GRID_STYLE,
                script=script("JSON.parse(document.getElementById('hv-data').textContent)") + GRID_SCRIPT)


def write_view(view: HeadView, out: Path, source: str) -> dict[str, Path]:
    """Write ``heads.html`` and ``heads.json`` (the numbers, rows reduced to their top keys) under ``out``."""
    paths = {"html": Path(out) / "heads.html", "json": Path(out) / "heads.json"}
    write_atomic(paths["html"], render_page(view, source))
    write_atomic(paths["json"], json.dumps(view.summary(), indent=1))
    return paths

"""A self-contained HTML page that shows an :class:`~headwise.explain.rollout.Attribution` as highlighted text.

Every prompt token is a ``<span>`` whose background grows with its relevance (square-root scale, so that the
long tail of small values stays visible next to a few large ones) and whose title gives its position and value;
a table lists the most relevant tokens in their context and a plot shows relevance along the positions. All
token text is HTML-escaped (a token can be ``<script>``); no script, CDN or external file.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from headwise.explain.rollout import Attribution
from headwise.report.html import esc, img, page, table, write_atomic

EXTRA_STYLE = """
.context { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem;
           line-height: 1.7; border: 1px solid #e1e4e8; padding: 0.8rem; }
.context span { border-radius: 2px; }
.context span.gone { text-decoration: line-through; color: #8b949e; }
.answer { white-space: pre-wrap; border-left: 4px solid rgb(230, 120, 0); padding-left: 0.8rem; }
"""

#: The paper behind each method, cited on the page.
CITATIONS = {
    "rollout": "Attention rollout: Abnar and Zuidema 2020, “Quantifying Attention Flow in Transformers”.",
    "flow": "Attention flow: Abnar and Zuidema 2020, “Quantifying Attention Flow in Transformers”.",
    "retrieval heads": "The attention of the profile's retrieval heads: Wu et al. 2024, “Retrieval Head "
                       "Mechanistically Explains Long-Context Factuality”.",
}

#: The highlight colour (RGB) whose opacity shows relevance.
COLOUR = (230, 120, 0)


def colour_scale(relevance: list[float]) -> float:
    """The relevance drawn at full colour: the largest but the first token's.

    The first token is an attention sink in most models: it takes far more rollout relevance than any other and
    would leave every other token pale. It is drawn at full colour whenever it exceeds this scale.
    """
    rest = relevance[1:] or relevance
    return max(max(rest), 1e-12)


def highlight(position: int, token: str, value: float, scale: float, held: float = 1.0) -> str:
    """One token as an escaped ``<span>``, its background's opacity ``sqrt(value / scale)`` (at most 1); struck
    through when no attributing head held it (``held`` 0: evicted from their caches)."""
    alpha = math.sqrt(min(1.0, max(value, 0.0) / scale))
    r, g, b = COLOUR
    gone = ' class="gone"' if held == 0 else ""
    kept = "" if held == 1 else f", held by {held:.0%} of the heads' steps"
    return (f'<span{gone} style="background: rgba({r}, {g}, {b}, {alpha:.3f})" '
            f'title="position {position}: {value:.3g}{kept}">{esc(token)}</span>')


def in_context(tokens: list[str], position: int, width: int) -> str:
    """The token at ``position`` in brackets with ``width`` tokens either side, newlines shown as ``⏎``."""
    before = "".join(tokens[max(0, position - width) : position])
    after = "".join(tokens[position + 1 : position + 1 + width])
    return f"…{before}[{tokens[position]}]{after}…".replace("\n", "⏎")


def relevance_png(attribution: Attribution) -> bytes:
    """Relevance along the prompt's positions (log scale), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 2.6))
    values = [max(v, 1e-12) for v in attribution.relevance]
    ax.plot(range(len(values)), values, linewidth=0.8, color="#c06000")
    ax.set_yscale("log")
    ax.set_xlabel("prompt position")
    ax.set_ylabel(f"{attribution.method} relevance")
    ax.margins(x=0)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def attribution_page(attribution: Attribution, *, note: str = "", top_k: int = 15, width: int = 6,
                     held: list[float] | None = None) -> str:
    """The whole page: the answer (with ``note``, e.g. how it was generated), the prompt as highlighted text, the
    ``top_k`` tokens in their context (``width`` tokens either side) and the plot of relevance along the prompt.
    ``held`` (one share per prompt token, from :func:`headwise.explain.retrieval.retrieval_attribution`) strikes
    through the tokens a compressed cache evicted from every attributing head."""
    a = attribution
    scale = colour_scale(a.relevance)
    held = held or [1.0] * len(a.tokens)
    spans = "".join(highlight(i, t, v, scale, k)
                    for i, (t, v, k) in enumerate(zip(a.tokens, a.relevance, held, strict=True)))
    rows = [(in_context(a.tokens, i, width), i, repr(a.tokens[i]), f"{a.relevance[i]:.4g}") for i in a.top(top_k)]
    target = (f"the answer ({len(a.targets)} positions, {a.targets[0]} to {a.targets[-1]})" if a.answer
              else f"the next token (position {a.targets[0]})")
    share = f"; {a.answer_share:.3g} stayed on the answer's own tokens" if a.answer else ""
    body = (
        f"<h1>Why this answer: {esc(a.method)}</h1>"
        f'<p class="meta">model {esc(a.model)}; {len(a.tokens)} prompt tokens; target: {esc(target)}; '
        f"{a.seconds:.1f} s{esc(share)}. {esc(CITATIONS.get(a.method, ''))}</p>"
        "<h2>Answer</h2>"
        f'<p class="answer">{esc(a.answer) if a.answer else "<em>(empty: the next token is attributed)</em>"}</p>'
        + (f'<p class="meta">{esc(note)}</p>' if note else "")
        + "<h2>Context</h2>"
        f'<p class="meta">Background opacity: square root of the relevance over {scale:.3g} (the largest after the '
        "first token, which is usually an attention sink and is clipped at full colour). Hover a token for its "
        "position and value.</p>"
        f'<div class="context">{spans}</div>'
        "<h2>Most relevant tokens</h2>"
        + table(["context", "position", "token", "relevance"], rows)
        + "<h2>Relevance along the prompt</h2>"
        + img(relevance_png(a), f"{a.method} relevance along the prompt positions")
    )
    return page(f"headwise attribution: {a.model}", body, extra_style=EXTRA_STYLE)


def write_attribution_page(attribution: Attribution, path: Path, *, note: str = "",
                           held: list[float] | None = None) -> None:
    """Write :func:`attribution_page` to ``path`` atomically."""
    write_atomic(Path(path), attribution_page(attribution, note=note, held=held))

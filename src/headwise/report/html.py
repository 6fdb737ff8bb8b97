"""Building blocks for self-contained HTML reports (no CDN, no external file, works offline).

Everything that comes from data (token text, file names, model output) must pass through :func:`esc`:
a token can be ``<script>``.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d232a; line-height: 1.45; padding: 0 1rem; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #c9d1d9; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f5f7; }
td.text, th.text { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
.meta { color: #57606a; font-size: 0.85rem; }
code, pre { background: #f6f8fa; padding: 0.1rem 0.3rem; border-radius: 3px; }
"""


def esc(value: object) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def png_data_uri(png: bytes | Path) -> str:
    """A ``data:`` URI for a PNG given as bytes or a file path."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(png: bytes | Path, alt: str) -> str:
    """An ``<img>`` element embedding the PNG."""
    return f'<img src="{png_data_uri(png)}" alt="{esc(alt)}">'


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], text_columns: int = 1) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned, the rest right-aligned."""

    def cell(tag: str, i: int, value: object) -> str:
        cls = ' class="text"' if i < text_columns else ""
        return f"<{tag}{cls}>{esc(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, *, extra_style: str = "", script: str = "") -> str:
    """A complete HTML document; ``body`` and ``script`` are trusted markup built with :func:`esc`."""
    script_tag = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{STYLE}{extra_style}</style></head>"
        f"<body>{body}{script_tag}</body></html>\n"
    )


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that readers never see a partial one (temp file, made durable, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

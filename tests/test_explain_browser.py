"""The head view in headless Chromium, driven by Playwright: real clicks on a head and a query token, then a look at
what was drawn (the label, every token's highlight, the canvas), a screenshot, and a clean console."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from headwise.explain.headview import head_view
from headwise.explain.headview_page import row_bytes, write_view
from headwise.profile.data import prose_ids
from profile_helpers import fake_answer, tiny_loaded

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("headless Chromium is not installed: run scripts/install-browser.sh (make test does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[test]'")

#: Offline and quiet: Playwright drives the system Chromium (never `playwright install`, which downloads one).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
EVIL = "</script><script>window.PWNED = 1</script>"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, path: Path):
    """A new page on ``path`` that records console errors and uncaught exceptions."""
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.goto(path.as_uri())
    return page, errors


@pytest.fixture(scope="module")
def view_page(tmp_path_factory):
    lm = tiny_loaded("gemma3")
    view = head_view(lm, prose_ids(lm.tokenizer, 300, 0), query_positions=[40, 150, -1], max_points=120)
    view.tokens[7] = EVIL
    return view, write_view(view, tmp_path_factory.mktemp("heads"), "sample.txt")["html"]


def alphas(page) -> list[float]:
    """The opacity of every token's red highlight (0 when it has none)."""
    out = []
    for color in page.eval_on_selector_all("#hv-text span", "els => els.map(e => e.style.backgroundColor)"):
        numbers = [float(v) for v in re.findall(r"[\d.]+", color)]
        out.append(0.0 if not numbers else numbers[3] if len(numbers) == 4 else 1.0)
    return out


def expected_alphas(view, layer: int, head: int, query: int) -> list[float]:
    data, _ = row_bytes(view.rows[view.layers.index(layer), head, query])
    return [v / 255 for v in data]


def colored_pixels(page) -> dict[str, int]:
    return page.evaluate("""() => {
      const c = document.getElementById('hv-scatter');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let blue = 0, orange = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 2] > d[i] + 60) blue++;
        if (d[i] > d[i + 2] + 60) orange++;
      }
      return {blue, orange};
    }""")


def test_click_a_head_and_a_query_token(browser, view_page, tmp_path):
    view, path = view_page
    page, errors = open_page(browser, path)
    page.wait_for_selector("#hv[data-ready]")
    assert page.get_attribute("#hv", "data-drawn") == "0,0,299"

    page.click('button.cell[data-layer="3"][data-head="2"]')
    assert page.text_content("#hv-sel").startswith("layer 3, head 2 (KV head 0), query #299")
    assert page.get_attribute("#hv", "data-drawn") == "3,2,299"
    assert alphas(page) == pytest.approx(expected_alphas(view, 3, 2, 2), abs=0.01)
    assert page.get_attribute('button.cell[data-layer="3"][data-head="2"]', "class") == "cell on"

    page.click("#hv-text span.hv-q >> nth=1")  # the token at position 150
    assert "query #150" in page.text_content("#hv-sel")
    assert page.get_attribute("#hv", "data-drawn") == "3,2,150"
    drawn = alphas(page)
    assert drawn == pytest.approx(expected_alphas(view, 3, 2, 1), abs=0.01)
    assert max(drawn[151:]) == 0 and max(drawn[:151]) == 1.0  # nothing after the query; the peak at full colour
    assert page.get_attribute("#hv-text span:nth-child(152)", "class") == "hv-future"
    assert page.eval_on_selector_all("#hv-top tbody tr", "rows => rows.length") == 10

    pixels = colored_pixels(page)
    assert pixels["blue"] > 100 and pixels["orange"] > 100, pixels  # queries and keys both drawn
    assert page.text_content("#hv-text span:nth-child(8)") == EVIL and page.evaluate("window.PWNED") is None
    shot = tmp_path / "headview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    keep = Path(__file__).parent.parent / "build" / "explain-headview-screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)
    assert errors == []
    page.close()


def test_console_errors_are_detected(browser, view_page, tmp_path):
    _, path = view_page
    broken = tmp_path / "broken.html"
    broken.write_text(path.read_text().replace("DecompressionStream('deflate')", "DecompressionStream('zip')"))
    page, errors = open_page(browser, broken)
    page.wait_for_load_state("load")
    assert any("uncaught" in e and "zip" in e for e in errors), errors
    page.close()


def test_profile_report_head_view_follows_the_grid(browser, tmp_path):
    from headwise.profile import ProfileSettings, profile_model
    from headwise.profile.report import write_outputs

    lm = tiny_loaded("llama")
    mp = pytest.MonkeyPatch()
    fake_answer(mp, lm)
    try:
        result = profile_model(lm, ProfileSettings(length=96, repeat_length=40, runs=1, sample_tokens=60,
                                                   max_new_tokens=4), progress=False)
    finally:
        mp.undo()
    page, errors = open_page(browser, write_outputs(result, tmp_path)["report"])
    page.wait_for_selector("#hv[data-ready]")
    page.click('button.cell[data-layer="2"][data-head="1"]')
    assert page.text_content("#sel").startswith("layer 2, head 1")
    assert page.text_content("#hv-sel").startswith("layer 2, head 1 (KV head 0), query #59")
    assert page.get_attribute("#hv", "data-drawn") == "2,1,59"
    assert alphas(page) == pytest.approx(expected_alphas(result.head_view, 2, 1, 3), abs=0.01)
    assert errors == []
    page.close()

"""The HTML profile report in headless Chromium: it renders, its script runs, and the console stays clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from headwise.profile import ProfileSettings, profile_model
from headwise.profile.report import write_outputs
from profile_helpers import fake_answer, tiny_loaded

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("headless Chromium is not installed: run scripts/install-browser.sh (make test does)",
                allow_module_level=True)


def run_chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open ``page`` headless with console messages logged to stderr."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile-dir'}",
        "--enable-logging=stderr", "--v=0", "--window-size=1200,1800", *extra, page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    lm = tiny_loaded("gemma3")
    mp = pytest.MonkeyPatch()
    fake_answer(mp, lm)
    try:
        result = profile_model(lm, ProfileSettings(length=96, repeat_length=40, runs=1, sample_tokens=60,
                                                   max_new_tokens=4), progress=False)
    finally:
        mp.undo()
    result.sample_tokens[5] = "<script>alert('x')</script>"
    return write_outputs(result, tmp_path_factory.mktemp("report"))["report"]


def test_report_renders_without_console_errors(report, tmp_path):
    dom = run_chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_lines(dom.stderr) == []
    assert 'id="sel">layer ' in dom.stdout  # the inline script ran and selected a head
    assert "<td>" in dom.stdout.split('id="metrics"')[1][:400]
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom.stdout
    shot = tmp_path / "report.png"
    run = run_chromium(report, tmp_path, f"--screenshot={shot}")
    assert run.returncode == 0 and console_lines(run.stderr) == []
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    keep = Path(__file__).parent.parent / "build" / "profile-report-screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)


def test_console_errors_are_detected(report, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("const D = JSON.parse", "const D = JSON.parseX"))
    run = run_chromium(broken, tmp_path, "--dump-dom")
    assert any("Uncaught TypeError" in line for line in console_lines(run.stderr))

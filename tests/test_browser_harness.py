"""The headless-Chromium checker can fail: hand-made pages with one defect each are caught.

A checker that always says "clean" would pass every report test, so each defect the report test
relies on (an image that did not load, a network request, a console or script error, a figure
drawn at zero size, a missing findings table) is planted in a tiny page and must be reported.
The tests share one browser (the module-scoped ``chromium`` fixture) and skip with a reason when
Chromium or Playwright is absent.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import engramlab.report.browser as browser_impl
from browser import chromium, skip_reason  # noqa: F401  (chromium is a fixture)
from engramlab.errors import EngramError

# A valid 1x1 GIF, inline: an image that loads without any request.
GIF = "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="
SVG = '<svg width="120" height="80" viewBox="0 0 120 80"><rect width="60" height="40" fill="teal"/></svg>'


def page(tmp_path: Path, body: str, name: str = "page.html") -> Path:
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head>"
                    f"<body>{body}</body></html>")
    return path


GOOD = f"""
<section id="summary"><h2>Summary</h2><figure>{SVG}<figcaption>a</figcaption></figure></section>
<section id="findings-section"><h2>Findings</h2>
  <figure><img src="{GIF}" width="40" height="30" alt="dot"></figure>
  <table id="findings"><thead><tr><th>claim</th></tr></thead>
  <tbody><tr><td>a</td></tr><tr><td>b</td></tr><tr><td>c</td></tr></tbody></table>
</section>
<svg width="8" height="8"><circle r="4"/></svg>
<script>document.querySelector('th').addEventListener('click', () => {{}});</script>
"""


def test_good_page_is_clean(chromium, tmp_path):
    report = chromium.check(page(tmp_path, GOOD))
    assert report.problems() == []
    assert report.headings == ["Summary", "Findings"]
    assert report.sections == [("summary", "Summary"), ("findings-section", "Findings")]
    assert report.findings_rows == 3
    # The svg outside a <figure> (an icon) is not a figure; the figures keep their drawn sizes.
    assert [(f.kind, f.width, f.height, f.loaded) for f in report.figures] == [
        ("svg", 120, 80, True), ("img", 40, 30, True)]


def test_broken_image_is_not_loaded(chromium, tmp_path):
    report = chromium.check(page(tmp_path, '<figure><img src="data:image/png;base64,AAAA" '
                                           'width="40" height="30"></figure>'))
    assert [f.loaded for f in report.figures] == [False]
    assert report.requests == []  # a broken inline image is a load failure, not a request
    assert report.problems() == ["img figure #0 did not load"]


def test_network_and_sibling_requests_are_recorded(chromium, tmp_path):
    (tmp_path / "fig.gif").write_bytes(b"GIF89a")
    body = ('<img src="http://example.invalid/x.png"><img src="fig.gif">'
            '<script>fetch("http://example.invalid/data.json").catch(() => {});</script>')
    path = page(tmp_path, body)
    report = chromium.check(path)
    # A file next to the page is a request too: report.html must not depend on its directory.
    assert sorted(report.requests) == sorted(["http://example.invalid/x.png", "http://example.invalid/data.json",
                                              (tmp_path / "fig.gif").resolve().as_uri()])
    assert any(p.startswith("network request: http://example.invalid/") for p in report.problems())


def test_console_and_script_errors_are_recorded(chromium, tmp_path):
    body = '<script>console.error("boom"); console.log("fine");</script><script>null.x;</script>'
    report = chromium.check(page(tmp_path, body))
    assert report.console_errors == ["boom"]
    assert len(report.js_errors) == 1 and "null" in report.js_errors[0]


def test_zero_size_and_hidden_figures(chromium, tmp_path):
    body = ('<figure><svg width="0" height="0"><rect width="5" height="5"/></svg></figure>'
            f'<figure style="display:none">{SVG}</figure>'
            f'<figure><svg width="50" height="50"></svg></figure>'  # drawn, but empty
            f'<figure style="visibility:hidden">{SVG}</figure>')
    report = chromium.check(page(tmp_path, body))
    assert [(f.width, f.height) for f in report.figures] == [(0, 0), (0, 0), (50, 50), (0, 0)]
    assert [f.loaded for f in report.figures] == [True, True, False, True]
    assert len(report.problems()) == 4


def test_reveal_measures_frames_a_script_hides(chromium, tmp_path):
    """A slider shows one frame at a time; ``reveal`` measures the frames it hides."""
    body = (f'<div class="slider"><div class="frame"><figure>{SVG}</figure></div>'
            f'<div class="frame"><figure>{SVG}</figure></div></div>'
            '<script>document.querySelector(".frame").style.display = "none";</script>')
    path = page(tmp_path, body)
    assert [(f.width, f.height) for f in chromium.check(path).figures] == [(0, 0), (120, 80)]
    assert [(f.width, f.height) for f in chromium.check(path, reveal=".slider .frame").figures] == [
        (120, 80), (120, 80)]


def test_missing_findings_table_and_headings(chromium, tmp_path):
    report = chromium.check(page(tmp_path, "<section id='a'><p>no heading</p></section>"))
    assert report.findings_rows is None
    assert report.headings == [] and report.sections == [("a", "")]


def test_screenshot_has_the_viewport_size(chromium, tmp_path):
    out = chromium.screenshot(page(tmp_path, GOOD), tmp_path / "shots" / "top.png", width=640, height=360)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (640, 360)  # IHDR width, height


def test_missing_page_is_a_one_line_error(chromium, tmp_path):
    with pytest.raises(EngramError, match="no such HTML file"):
        chromium.check(tmp_path / "absent.html")


def test_missing_chromium_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(browser_impl, "find_chromium", lambda: None)
    with pytest.raises(EngramError, match="Chromium not found"):
        browser_impl.Browser().__enter__()


# Run in a child interpreter: Playwright's sync API cannot start a second time in a thread
# whose first (the module's shared browser) is still running.
_TWO_LAUNCHES = """
import json, os, sys, time
from pathlib import Path
from engramlab.report.browser import Browser

def descendants(root):
    parent = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            parent[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    out, todo = set(), [root]
    while todo:
        node = todo.pop()
        kids = [p for p, pp in parent.items() if pp == node]
        out.update(kids)
        todo += kids
    return out

def lingering(pids):
    # Alive, or a zombie that this process tree has not reaped. Chromium's zygotes outlive the
    # browser by a moment and are reparented to init, whose job reaping them then is.
    out = []
    for p in pids:
        try:
            state, ppid = (Path("/proc") / str(p) / "stat").read_text().rpartition(")")[2].split()[:2]
        except OSError:
            continue
        if state != "Z" or int(ppid) == os.getpid() or int(ppid) in pids:
            out.append(p)
    return out

seen, left = [], []
for _ in range(2):
    with Browser() as b:
        assert b.check(sys.argv[1]).problems() == []
        pids = descendants(os.getpid())
    seen.append(len(pids))
    for _ in range(100):  # Chromium's helpers exit within a second or two of the browser
        if not lingering(pids):
            break
        time.sleep(0.1)
    left += lingering(pids)
print(json.dumps({"seen": seen, "left": left}))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_two_launches_leave_no_processes(tmp_path):
    """Closing a browser ends its driver and every Chromium process: none is left, live or zombie."""
    done = subprocess.run([sys.executable, "-c", _TWO_LAUNCHES, str(page(tmp_path, GOOD))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert min(result["seen"]) >= 2  # the driver and Chromium were found while running
    assert result["left"] == []

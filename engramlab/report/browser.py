"""Look at a report page the way a reader does: in headless Chromium.

Two uses: the tests load ``report.html`` and check what a reader would see (every figure drawn
at a non-zero size, every section heading, a findings row per finding, no console error, no
network request), and the README's screenshot of the report's top is taken here.

Chromium is the system's own (Debian's ``chromium`` package), driven by Playwright's Python API
with ``executable_path``: nothing is downloaded. Playwright is imported only when a browser is
started, so the package imports without it; a missing Playwright or Chromium raises a one-line
``EngramError`` saying what to install.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from engramlab.errors import EngramError

# Flags for a closed, quiet, root-friendly run. Without the background-networking ones Chromium
# reaches for update and sync servers, which a closed network refuses (and logs as errors).
CHROMIUM_ARGS = (
    "--no-sandbox",  # root (CI) cannot use the setuid sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# URL prefixes that never leave the page: inline data and blank/internal documents.
LOCAL_SCHEMES = ("data:", "about:", "blob:")


def find_chromium() -> str | None:
    """The path of a system Chromium (``chromium`` on PATH, as Debian installs it), or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Figure(NamedTuple):
    """One drawn figure: ``kind`` is "img" or "svg"; its size in CSS pixels; whether it loaded."""

    kind: str
    width: float
    height: float
    loaded: bool


@dataclass
class PageReport:
    """What a reader's browser saw of one page."""

    headings: list[str] = field(default_factory=list)  # every <h2>'s text, in page order
    sections: list[tuple[str, str]] = field(default_factory=list)  # (section id, its h2 text)
    figures: list[Figure] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    js_errors: list[str] = field(default_factory=list)  # uncaught exceptions (pageerror)
    requests: list[str] = field(default_factory=list)  # every URL but the page's own and data:
    findings_rows: int | None = None  # rows of <table id="findings"> <tbody>; None: no such table

    def problems(self) -> list[str]:
        """One line per thing a reader would notice: empty when the page is clean."""
        out = [f"{f.kind} figure #{i} did not load" for i, f in enumerate(self.figures) if not f.loaded]
        out += [f"{f.kind} figure #{i} has size {f.width:g}x{f.height:g}"
                for i, f in enumerate(self.figures) if f.width <= 0 or f.height <= 0]
        out += [f"console error: {e}" for e in self.console_errors]
        out += [f"script error: {e}" for e in self.js_errors]
        out += [f"network request: {u}" for u in self.requests]
        return out


# Runs in the page once it has loaded. A figure is every <img> (a broken image anywhere is a
# defect) and every outermost <svg> inside a <figure> (small inline icons elsewhere are not).
# Elements matching ``reveal`` that are hidden (display: none) are shown first.
_INSPECT_JS = """(reveal) => {
  if (reveal) for (const el of document.querySelectorAll(reveal))
    if (getComputedStyle(el).display === 'none') el.style.setProperty('display', 'block', 'important');
  const box = el => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
  const figs = [];
  for (const el of document.querySelectorAll('img, figure svg')) {
    if (el.tagName.toLowerCase() === 'svg' && el.parentElement.closest('svg')) continue;
    const [w, h] = box(el);
    const shown = getComputedStyle(el).visibility !== 'hidden';
    const kind = el.tagName.toLowerCase() === 'img' ? 'img' : 'svg';
    const loaded = kind === 'img' ? (el.complete && el.naturalWidth > 0) : el.childElementCount > 0;
    figs.push([kind, shown ? w : 0, shown ? h : 0, loaded]);
  }
  const text = el => (el ? el.textContent.replace(/\\s+/g, ' ').trim() : '');
  const table = document.querySelector('table#findings');
  return {
    headings: [...document.querySelectorAll('h2')].map(text),
    sections: [...document.querySelectorAll('section[id]')].map(s => [s.id, text(s.querySelector('h2'))]),
    figures: figs,
    findings_rows: table ? table.querySelectorAll('tbody tr').length : null,
  };
}"""

# Wait one frame and one task after "load", so scripts that run on load have acted.
_SETTLE_JS = "() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)))"


class Browser:
    """One headless Chromium for several pages (``with Browser() as b: b.check(path)``).

    Starting Chromium costs about a second; a test module shares one. Each page gets a fresh
    context (no cache or storage carried between pages)."""

    def __init__(self, executable: str | None = None):
        self.executable = executable or find_chromium()
        self._pw = self._browser = None

    def __enter__(self) -> "Browser":
        if self.executable is None:
            raise EngramError("Chromium not found on PATH: install your system's chromium package "
                              "(Debian: apt-get install chromium)")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise EngramError("playwright is not installed: pip install playwright==1.63.0 "
                              "(it drives the system Chromium; never run `playwright install`)") from None
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=self.executable, headless=True, args=list(CHROMIUM_ARGS))
        except Exception:
            self._pw.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._browser is not None:
                self._browser.close()
        finally:
            self._pw.stop()
            self._pw = self._browser = None

    def _open(self, html_path, width: int, height: int):
        url = _page_url(html_path)
        context = self._browser.new_context(viewport={"width": width, "height": height})
        return context, context.new_page(), url

    def check(self, html_path, width: int = 1280, height: int = 900, reveal: str | None = None) -> PageReport:
        """Load ``html_path`` from its file:// URL and report what the page shows and does.

        ``reveal``: a CSS selector of elements the page hides on purpose, such as a slider's
        other frames (``".slider .frame"``); they are shown before figures are measured, so a
        figure in them is checked too instead of reading as zero-sized."""
        context, page, url = self._open(html_path, width, height)
        report = PageReport()
        page.on("console", lambda m: m.type == "error" and report.console_errors.append(m.text))
        page.on("pageerror", lambda e: report.js_errors.append(str(e)))

        def request(route):
            u = route.request.url
            if u == url or u.startswith(LOCAL_SCHEMES):
                route.continue_()
            else:  # recorded, then refused: a check never reaches the network
                report.requests.append(u)
                route.abort()

        page.route("**/*", request)
        try:
            page.goto(url, wait_until="load")
            page.evaluate(_SETTLE_JS)
            seen = page.evaluate(_INSPECT_JS, reveal)
        finally:
            context.close()
        report.headings = seen["headings"]
        report.sections = [tuple(s) for s in seen["sections"]]
        report.figures = [Figure(*f) for f in seen["figures"]]
        report.findings_rows = seen["findings_rows"]
        return report

    def screenshot(self, html_path, png_path, width: int = 1280, height: int = 900) -> Path:
        """Save the top ``width`` x ``height`` pixels of ``html_path`` as a PNG."""
        context, page, url = self._open(html_path, width, height)
        out = Path(png_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            page.goto(url, wait_until="load")
            page.evaluate(_SETTLE_JS)
            page.screenshot(path=str(out))
        finally:
            context.close()
        return out


def _page_url(html_path) -> str:
    path = Path(html_path)
    if not path.is_file():
        raise EngramError(f"{path}: no such HTML file (write the report first: engram report DIR)")
    return path.resolve().as_uri()


def check_page(html_path, **kw) -> PageReport:
    """``Browser().check`` with a browser of its own (for one page; share a Browser for several).

    Playwright's sync API runs one instance per thread: inside ``with Browser()``, use that
    browser's ``check`` rather than this function."""
    _page_url(html_path)  # a missing page fails before a browser starts
    with Browser() as b:
        return b.check(html_path, **kw)


def screenshot(html_path, png_path, width: int = 1280, height: int = 900) -> Path:
    """``Browser().screenshot`` with a browser of its own."""
    _page_url(html_path)
    with Browser() as b:
        return b.screenshot(html_path, png_path, width=width, height=height)

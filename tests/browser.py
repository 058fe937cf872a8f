"""Headless-Chromium helpers for tests (not a test module): ``import browser`` from a test.

The implementation lives in ``engramlab.report.browser`` (the screenshot script uses it too);
this module adds what tests need around it: why a browser test must be skipped, and a
module-scoped ``chromium`` fixture so a test module starts one browser, not one per test.
"""

import importlib.util

import pytest

from engramlab.report.browser import Browser, Figure, PageReport, check_page, find_chromium, screenshot

__all__ = ["Browser", "Figure", "PageReport", "check_page", "find_chromium", "screenshot",
           "skip_reason", "needs_browser", "chromium"]


def skip_reason() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if find_chromium() is None:
        return ("Chromium is not installed (Debian: apt-get install chromium; "
                "`make test` installs it as root with CI=true)")
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


# Mark a test module with ``pytestmark = browser.needs_browser``.
needs_browser = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium shared by a test module's tests (import this name into the module)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with Browser() as b:
        yield b

"""Screenshot the top of a report page with headless Chromium (the README's picture).

    python scripts/screenshot_report.py runs/demo/study/report.html docs/report-top.png

Uses the system Chromium through ``engramlab.report.browser`` (Playwright with
``executable_path``; nothing is downloaded). Exits 2 with one line when Chromium, Playwright or
the page is missing.
"""

import argparse
import sys

from engramlab.errors import EngramError
from engramlab.report.browser import screenshot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the HTML page (report.html)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    parser.add_argument("--height", type=int, default=900, help="viewport height in CSS pixels")
    args = parser.parse_args(argv)
    if args.width <= 0 or args.height <= 0:
        parser.error("--width and --height must be positive")
    try:
        out = screenshot(args.report, args.out, width=args.width, height=args.height)
    except EngramError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screenshot of a `bench report --html` page in headless Chromium (Debian's package, driven by playwright), as the
picture in docs/ablations.md is made:
``python benchmarks/report_screenshot.py report/index.html docs/figures/report.png``.
Prints the console errors the page raised (there should be none) and fails if there were any."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def chromium_executable() -> str:
    """Debian's Chromium (what playwright drives here), or exit with what to install."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("no chromium on PATH: apt-get install chromium")
    return chromium


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1800, help="clip the screenshot to this height (0: the whole page)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = chromium_executable()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height or 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.page.resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(args.png), full_page=not args.height)
        browser.close()
    print(f"wrote {args.png}; console errors: {len(errors)}")
    for e in errors:
        print("  " + e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

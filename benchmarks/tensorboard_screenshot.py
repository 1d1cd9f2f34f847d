"""Screenshot of TensorBoard's scalars page for a run logged with ``--report-to tensorboard``, in headless Chromium
(Debian's package, driven by playwright), as the picture in the README is made:
``python benchmarks/tensorboard_screenshot.py runs/<dir>/trackers docs/figures/tensorboard.png``.
Starts ``tensorboard --logdir`` on a free local port, waits for the charts, and stops it."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from report_screenshot import chromium_executable  # (benchmarks/, beside this script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logdir", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument(
        "--filter", default="", help="TensorBoard's tag filter (a regular expression), e.g. 'train|eval/test'"
    )
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--wait", type=float, default=8.0, help="seconds to let the charts draw")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = chromium_executable()
    port = free_port()
    board = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(args.logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("tensorboard did not start")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            query = f"?tagFilter={urllib.parse.quote(args.filter)}" if args.filter else ""
            page.goto(f"{url}{query}#timeseries")
            page.wait_for_load_state("networkidle")
            time.sleep(args.wait)
            page.screenshot(path=str(args.png))
            browser.close()
    finally:
        board.terminate()
        board.wait(timeout=30)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

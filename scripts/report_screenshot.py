"""A screenshot of a run's report.html in headless Chromium: what docs/report.png shows.

    python scripts/report_screenshot.py runs/demo docs/report.png

The report test (`tests/test_report.py`) takes its screenshot with `screenshot()` below, the
same flags and window, so the picture in the docs is made the way the suite checks it. Needs
Chromium (Debian's `chromium` package; `.ci/run` installs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

WINDOW = (1100, 1600)  # a desktop width: the report's text column with its margins


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")


def screenshot(report_html: Path, out_png: Path, window: tuple[int, int] = WINDOW) -> Path:
    """Render `report_html` headless at `window` and save it as `out_png`."""
    exe = browser()
    if exe is None:
        raise SystemExit("no Chromium found (Debian: apt install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                 f"--window-size={window[0]},{window[1]}", "--hide-scrollbars",
                 f"--screenshot={out_png}"]
        subprocess.run([exe, *flags, Path(report_html).resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    return out_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    report = args.run_dir / "report.html"
    if not report.is_file():
        raise SystemExit(f"{report}: not found (fashionfuse report {args.run_dir} first)")
    print(screenshot(report, args.out))


if __name__ == "__main__":
    main()

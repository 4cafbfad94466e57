"""Headless Chromium, driven by Playwright, for checking pages the project serves or writes.

Playwright's own browser download is not used (it needs a hub this machine cannot reach): it drives the
system's Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``, or ``$POSTTRAIN_CHROMIUM``) with
the flags a closed network needs (no background networking, component updates or sync).

    python -m pipeline.browser data/evaluate/report.html --screenshot docs/report.png

checks that the evaluation report renders its metrics table and plots, takes a full-page screenshot,
and exits non-zero, saying what is missing, if anything is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM_ENV = "POSTTRAIN_CHROMIUM"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The Chromium executable: ``$POSTTRAIN_CHROMIUM``, else ``chromium`` on PATH, else None."""
    return os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator:
    """A Playwright page in headless system Chromium; closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(f"no Chromium found: install Debian's chromium package or set ${CHROMIUM_ENV}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def check_report(path: str | Path, screenshot: str | Path | None = None) -> dict:
    """Open an evaluation report and measure what a reader sees: the metrics table's rows and columns,
    the differences against SFT (how many are marked as effects), the per-family rows, the provenance line,
    the plots with a visible size, the reward-hacking flags, the sample browser (families, rows, and whether
    opening the first family shows its rows), and how much of a full-page screenshot is not blank.

    Returns ``{"variants", "metric_rows", "difference_rows", "effects", "family_rows", "provenance", "plots",
    "visible_plots", "reward_flags", "sample_families", "sample_rows", "rows_visible_closed",
    "rows_visible_opened", "ink"}``.
    """
    from io import BytesIO

    path = Path(path).resolve()
    with browser_page() as page:
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        variants = page.locator("#metrics thead th").count() - 1
        metric_rows = page.locator("#metrics tbody tr").count()
        plots = page.locator("figure.plot svg")
        plot_count = page.locator("figure.plot").count()
        visible = sum(1 for i in range(plots.count())
                      if (box := plots.nth(i).bounding_box()) and box["width"] > 50 and box["height"] > 50)
        rows = page.locator("table.samples tbody tr")
        shown = lambda: sum(1 for i in range(rows.count()) if rows.nth(i).is_visible())  # noqa: E731
        found = {"difference_rows": page.locator("#differences tbody tr").count(),
                 "effects": page.locator("#differences td.effect").count(),
                 "family_rows": page.locator("#families tbody tr").count(),
                 "provenance": page.locator("#provenance").count() and page.is_visible("#provenance"),
                 "reward_flags": page.locator("#reward-flags li").count(),
                 "sample_families": page.locator("details.family").count(), "sample_rows": rows.count(),
                 "rows_visible_closed": shown()}
        image = page.screenshot(full_page=True)
        if found["sample_families"]:
            page.locator("details.family summary").first.click()
        found["rows_visible_opened"] = shown()
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(image)
    from PIL import Image

    pixels = Image.open(BytesIO(image)).convert("L")
    histogram = pixels.histogram()
    ink = 1 - sum(histogram[250:]) / max(1, sum(histogram))  # share of pixels that are not (near) white
    return {"variants": variants, "metric_rows": metric_rows, "plots": plot_count, "visible_plots": visible,
            **found, "ink": round(ink, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Check that an evaluation report renders in headless Chromium.")
    parser.add_argument("report", help="the report page, e.g. data/evaluate/report.html")
    parser.add_argument("--screenshot", help="write a full-page PNG here")
    args = parser.parse_args()
    found = check_report(args.report, args.screenshot)
    print(", ".join(f"{k} {v}" for k, v in found.items()))
    problems = [what for what, bad in (("no variant columns", found["variants"] < 1),
                                       ("no metric rows", found["metric_rows"] < 1),
                                       ("plots not visible", found["visible_plots"] < found["plots"] or not found["plots"]),
                                       ("blank page", found["ink"] < 0.01)) if bad]
    if problems:
        sys.exit("report check failed: " + "; ".join(problems))


if __name__ == "__main__":
    main()

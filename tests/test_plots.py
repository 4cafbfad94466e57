"""`dvc plots show` works offline: the page DVC writes renders every plot in headless Chromium with every
request outside the file blocked (the offline template of pipeline.vega, configured in .dvc/config)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT, make_project, sh
from pipeline.browser import browser_page, chromium_path

needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                    reason="no Chromium here (CI installs Debian's chromium and runs this)")


def test_the_project_configures_dvc_to_use_the_offline_template():
    from pipeline.vega import PACKAGES, TEMPLATE

    config = (ROOT / ".dvc" / "config").read_text()
    assert "html_template = plots/offline.html" in config and TEMPLATE.as_posix() == ".dvc/plots/offline.html"
    page = (ROOT / TEMPLATE).read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page and "cdn.jsdelivr" not in page
    assert all(f"/* {name}@{version} */" in page for name, (version, _, _) in PACKAGES.items())


@needs_chromium
@pytest.mark.slow
def test_dvc_plots_show_renders_every_plot_with_the_network_blocked(tmp_path):
    project = make_project(tmp_path / "project")
    archive = subprocess.run(["git", "archive", "HEAD", "data/plots", "data/metrics"], cwd=ROOT, capture_output=True,
                             check=True).stdout                          # the plots the repo carries
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive, check=True)
    sh("dvc", "plots", "show", "-o", str(tmp_path / "out"), cwd=project)
    page_file = tmp_path / "out" / "index.html"
    assert "cdn.jsdelivr" not in page_file.read_text()
    outside = []
    with browser_page() as page:
        def only_files(route):
            if route.request.url.startswith(("file://", "data:")):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        page.route("**/*", only_files)
        page.goto(page_file.as_uri())
        divs = page.locator("body > div[id]").count()
        page.wait_for_function(f"document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length >= {divs}",
                               timeout=30_000)
        drawn = page.evaluate("""[...document.querySelectorAll('.vega-embed canvas')]
                                   .filter(c => c.width > 50 && c.height > 50).length""")
        page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
    assert divs >= 10 and drawn >= divs and outside == []

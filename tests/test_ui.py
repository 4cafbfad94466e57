"""`posttrain ui`: the MLflow UI served on 127.0.0.1 and opened on the runs table, checked in headless Chromium
against a real `mlflow server` over a chain's store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from pipeline.browser import browser_page, chromium_path

needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                    reason="no Chromium here (CI installs Debian's chromium and runs this)")


@needs_chromium
@pytest.mark.slow
def test_posttrain_ui_prints_a_url_that_opens_on_the_runs_table_of_the_stage_runs(sft_chain):
    from test_label import free_port, listening_addresses

    port = free_port()
    script = str(Path(sys.executable).parent / "posttrain")
    proc = subprocess.Popen([script, "ui", "--port", str(port)], cwd=sft_chain, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()                                  # printed once the server answers
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/"), line
        assert listening_addresses(port) == {"127.0.0.1"}
        url = line.split()[2]
        with browser_page(1440, 900) as page:
            page.goto(url)
            page.wait_for_selector("text=sft-", timeout=120_000)        # a stage run's row: <stage>-<digest>
            assert page.locator(".ag-row").count() >= 3                 # base, prepare and sft runs
            assert page.get_by_role("heading", name="Runs").is_visible()
            assert not page.locator("text=No data available for the selected time range").count()  # not GenAI
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while listening_addresses(port) and time.monotonic() < deadline:  # the server went with it
        time.sleep(0.5)
    assert not listening_addresses(port)


def test_posttrain_ui_without_a_chain_says_so(tmp_path):
    script = str(Path(sys.executable).parent / "posttrain")
    done = subprocess.run([script, "ui", "--store", f"sqlite:///{tmp_path / 'none.db'}"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no experiment 'posttrain'" in done.stderr

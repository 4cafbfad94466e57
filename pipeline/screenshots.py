"""The README's screenshots, taken from the chain's own results in headless Chromium.

    python -m pipeline.screenshots            # after `make pipeline`; writes docs/*.png

Starts the MLflow UI on a free port of 127.0.0.1 over the project's store (``mlruns/mlflow.db``), and
photographs: the runs table the experiment opens on (``mlflow_runs.png``), a training curve (sft's
``train/loss`` per step, ``mlflow_curve.png``), the compare view of evaluate's variant runs
(``mlflow_compare.png``), the offline ``dvc plots show`` page (``dvc_plots.png``) and the report's metrics with
their intervals and differences (``report.png``). Each page is waited for until its content is drawn, so
a screenshot never shows a spinner; a page that never draws stops the script with its name.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.browser import browser_page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(store: Path) -> Iterator[str]:
    """The MLflow UI over ``store`` on 127.0.0.1 (a free port); yields its base URL; stopped on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("mlflow server exited") from None
                time.sleep(0.2)
        else:
            raise RuntimeError("mlflow server did not start in 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def shoot_mlflow(url: str, store: Path, docs: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("posttrain")
    eid = experiment.experiment_id
    sft = json.loads(Path("data/sft/run.json").read_text())["run_id"]
    evaluate = json.loads(Path("data/evaluate/run.json").read_text())["run_id"]
    variants = [r.info.run_id for r in client.search_runs([eid], f"tags.mlflow.parentRunId = '{evaluate}'")]
    with browser_page(1440, 900) as page:
        page.goto(f"{url}/#/experiments/{eid}")
        page.wait_for_selector("text=evaluate-", timeout=120_000)  # the runs table, with the stage runs
        page.wait_for_timeout(1500)
        page.screenshot(path=str(docs / "mlflow_runs.png"))
        page.goto(f"{url}/#/metric?runs={json.dumps([sft])}&metric=%22train%2Floss%22&experiments={json.dumps([eid])}"
                  "&plot_metric_keys=%5B%22train%2Floss%22%5D&x_axis=step")
        page.wait_for_selector(".js-plotly-plot, canvas, svg.main-svg", timeout=120_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(docs / "mlflow_curve.png"))
        page.goto(f"{url}/#/compare-runs?runs={json.dumps(variants)}&experiments={json.dumps([eid])}")
        page.wait_for_selector("text=variant.source", timeout=120_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(docs / "mlflow_compare.png"), full_page=False)


def shoot_dvc_plots(docs: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dvc", "plots", "show", "-o", tmp], check=True, capture_output=True)
        with browser_page(1440, 900) as page:
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else route.abort())                                 # offline: nothing but the file
            page.goto((Path(tmp) / "index.html").as_uri())
            page.wait_for_selector(".vega-embed canvas, .vega-embed svg", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(docs / "dvc_plots.png"))


def shoot_report(docs: Path) -> None:
    with browser_page(1440, 1000) as page:
        page.goto(Path("data/evaluate/report.html").resolve().as_uri())
        page.wait_for_selector("#differences")
        page.screenshot(path=str(docs / "report.png"), full_page=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="Take the README's screenshots from the chain's results.")
    parser.add_argument("--docs", default="docs", help="where the PNG files go")
    parser.add_argument("--store", default="mlruns/mlflow.db", help="the MLflow store of the chain")
    args = parser.parse_args()
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(Path(args.store).resolve()) as url:
        shoot_mlflow(url, Path(args.store).resolve(), docs)
    shoot_dvc_plots(docs)
    shoot_report(docs)
    print(f"screenshots in {docs}/: mlflow_runs.png mlflow_curve.png mlflow_compare.png dvc_plots.png report.png")


if __name__ == "__main__":
    main()

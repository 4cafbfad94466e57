"""The README's screenshots, taken from the chain's own results in headless Chromium.

    python -m pipeline.screenshots            # after `make pipeline`; writes docs/*.png

Starts the MLflow UI (:mod:`pipeline.ui`) on a free port of 127.0.0.1 over the project's store (``mlruns/mlflow.db``), and
photographs: the runs table the experiment opens on (``mlflow_runs.png``), a training curve (sft's
``train/loss`` per step, ``mlflow_curve.png``), the compare view of evaluate's variant runs
(``mlflow_compare.png``), the offline ``dvc plots show`` page (``dvc_plots.png``) and the report's metrics with
their intervals and differences (``report.png``), and the labelling page on collect's samples (``label.png``). Each page is waited for until its content is drawn, so
a screenshot never shows a spinner; a page that never draws stops the script with its name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from pipeline.browser import browser_page
from pipeline.ui import mlflow_server, runs_url


def shoot_mlflow(url: str, store: Path, docs: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("posttrain")
    eid = experiment.experiment_id
    sft = json.loads(Path("data/sft/run.json").read_text())["run_id"]
    evaluate = json.loads(Path("data/evaluate/run.json").read_text())["run_id"]
    variants = [r.info.run_id for r in client.search_runs([eid], f"tags.mlflow.parentRunId = '{evaluate}'")]
    with browser_page(1440, 900) as page:
        page.goto(runs_url(url, eid))
        page.wait_for_selector("text=dvc-repro", timeout=120_000)  # the runs table
        close_assistant(page)
        page.locator(".ag-row button").first.click()                # unfold the newest repro run: its stage runs
        page.wait_for_selector("text=evaluate-", timeout=60_000)
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


def close_assistant(page) -> None:
    """Close MLflow's assistant side panel, when it is open, so the runs get the width."""
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


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


def shoot_label(docs: Path) -> None:
    """The labelling page on collect's samples, with its guidelines, after one label (its confirmation shown);
    the label goes to a throwaway file, not to data/labels/."""
    import threading

    from pipeline.label import serve

    with tempfile.TemporaryDirectory() as tmp:
        server = serve("data/collect/samples.jsonl", Path(tmp) / "labels.jsonl", port=0,
                       guidelines="conf/judge/guidelines.md")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with browser_page(1280, 900) as page:
                page.add_init_script("localStorage.setItem('posttrain.annotator', 'ana')")
                page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
                page.wait_for_selector("#progress:has-text('0 / ')")
                page.keyboard.press("1")
                page.wait_for_selector("#confirm:has-text('Recorded')")
                page.screenshot(path=str(docs / "label.png"))
        finally:
            server.shutdown()
            server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Take the README's screenshots from the chain's results.")
    parser.add_argument("--docs", default="docs", help="where the PNG files go")
    parser.add_argument("--store", default="mlruns/mlflow.db", help="the MLflow store of the chain")
    args = parser.parse_args()
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    with mlflow_server(f"sqlite:///{Path(args.store).resolve()}") as url:
        shoot_mlflow(url, Path(args.store).resolve(), docs)
    shoot_dvc_plots(docs)
    shoot_report(docs)
    shoot_label(docs)
    print(f"screenshots in {docs}/: mlflow_runs.png mlflow_curve.png mlflow_compare.png dvc_plots.png report.png "
          "label.png")


if __name__ == "__main__":
    main()

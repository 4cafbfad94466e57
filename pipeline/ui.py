"""The MLflow UI on the chain's runs, opened where a user of this project wants it: the runs table.

    python -m pipeline.ui [--port 5000]        # or: posttrain ui
    # MLflow UI: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning

MLflow 3.17's UI opens every experiment on its GenAI pages (an empty Traces overview): its "GenAI / Model
training" switch, kept in the browser's local storage and GenAI by default, decides, and the experiment's
``mlflow.experimentKind`` tag (:data:`pipeline.runs.EXPERIMENT_KIND`, which other MLflow versions follow)
does not. The URL this prints carries ``workflowType=machine_learning``, which sets the switch to
"Model training" and lands on the runs table with the stage runs nested under their ``repro`` run; the
browser remembers the switch afterwards.

The server is ``mlflow server`` over the chain's store (``logger.tracking_uri``; default
``sqlite:///mlruns/mlflow.db``), bound to 127.0.0.1 (``--host`` only if you know who else can reach it).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

DEFAULT_STORE = "sqlite:///mlruns/mlflow.db"
EXPERIMENT = "posttrain"


def runs_url(base: str, experiment_id: str) -> str:
    """The URL of an experiment's runs table in the Model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store: str = DEFAULT_STORE, port: int = 0, host: str = "127.0.0.1",
                  timeout: float = 120.0) -> Iterator[str]:
    """``mlflow server`` over ``store`` on ``host`` (port 0: a free one); yields its base URL once it answers
    ``/health``; stopped on exit. A server that exits or does not answer in ``timeout`` s raises RuntimeError."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", host,
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: stopped with its web workers
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {proc.stderr.read()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not answer on {url} in {timeout:.0f} s") from None
                time.sleep(0.2)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow's CLI and the uvicorn worker it starts), SIGKILL after 30 s."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def experiment_id(store: str, name: str = EXPERIMENT) -> str:
    """The id of the chain's experiment in ``store``; SystemExit with a hint when it has none."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(store).get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"error: no experiment '{name}' in {store}: run the chain first (make pipeline)")
    return experiment.experiment_id


def main(argv: list[str] | None = None) -> None:
    import pipeline  # noqa: F401  (telemetry off)

    parser = argparse.ArgumentParser(description="Serve the MLflow UI on the chain's runs, opened on the runs table.")
    parser.add_argument("--store", default=DEFAULT_STORE, help="the tracking store (logger.tracking_uri)")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="keep 127.0.0.1 unless you know who else can reach it")
    args = parser.parse_args(argv)
    eid = experiment_id(args.store)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too (the finally below)
    with mlflow_server(args.store, args.port, args.host) as url:
        print(f"MLflow UI: {runs_url(url, eid)}   (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

"""Hydra multirun on the entry point: every job is its own MLflow run under one sweep parent, writes into its
own job folder (never the DVC outputs), runs in parallel with the joblib launcher without losing or mixing
runs, and shows in `mlflow ui`; the Optuna sweeper optimizes a stage metric."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, sh, subprocess_env

pytestmark = pytest.mark.slow  # every test runs Hydra multiruns of the entry point in subprocesses


@pytest.fixture(autouse=True)
def project_root(tmp_path):
    """Each test runs in a project root of its own: the entry point composes conf/ from the working directory."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")


def store_runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    return client.search_runs([exp.experiment_id], max_results=1000)


def sweep_and_jobs(runs, stage: str):
    sweeps = [r for r in runs if r.data.tags.get("posttrain.kind") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("posttrain.stage") == stage and r.data.tags.get("posttrain.kind") == "stage"]
    return sweeps, jobs


def test_three_job_sweep_is_three_child_runs_under_one_parent_in_their_own_folders(tmp_path):
    sh(sys.executable, "-m", "pipeline.run", "-m", "stage=base", "experiment=smoke", "base.max_steps=5",
       "base.lr=0.001,0.002,0.003", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    sweeps, jobs = sweep_and_jobs(store_runs(tmp_path), "base")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert sorted(r.data.params["base.lr"] for r in jobs) == ["0.001", "0.002", "0.003"]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id for r in jobs)
    assert not (tmp_path / "data" / "base").exists()              # the DVC output was never touched
    for job in range(3):
        folder = tmp_path / "sweep" / str(job)
        assert (folder / "base" / "model.safetensors").exists() and (folder / "metrics" / "base.json").exists()
        assert json.loads((folder / "base" / "run.json").read_text())["run_id"] in {r.info.run_id for r in jobs}

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                           f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1"], cwd=tmp_path, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listed = ui_search(port, sweeps[0].info.experiment_id)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    children = [r for r in listed if tag(r, "mlflow.parentRunId") == sweeps[0].info.run_id]
    assert sorted(r["info"]["run_id"] for r in children) == sorted(r.info.run_id for r in jobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tag(run: dict, key: str):
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


def ui_search(port: int, experiment_id: str, timeout: float = 120) -> list[dict]:
    """The runs `mlflow ui` lists for an experiment, through the REST API its pages use."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())["runs"]
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_parallel_joblib_jobs_lose_and_mix_no_runs(tmp_path):
    sh(sys.executable, "-m", "pipeline.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "stage=base",
       "experiment=smoke", "base.max_steps=5", "trainer.num_threads=1", "base.lr=0.001,0.002,0.003,0.004",
       f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    sweeps, jobs = sweep_and_jobs(store_runs(tmp_path), "base")
    assert len(sweeps) == 1 and len(jobs) == 4
    assert sorted(r.data.params["base.lr"] for r in jobs) == ["0.001", "0.002", "0.003", "0.004"]
    for run in jobs:                                                 # each run holds its own job's numbers
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
        job_dir = Path(run.data.params["paths.out"])
        metrics = json.loads((job_dir / "metrics" / "base.json").read_text())
        assert run.data.metrics["val/perplexity"] == pytest.approx(metrics["val/perplexity"])
        assert json.loads((job_dir / "base" / "run.json").read_text())["run_id"] == run.info.run_id


def test_optuna_sweeper_optimizes_a_stage_metric(tmp_path):
    sh(sys.executable, "-m", "pipeline.run", "-m", "stage=base", "experiment=smoke", "base.max_steps=5",
       "hparams_search=base_optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    best = yaml_load(tmp_path / "sweep" / "optimization_results.yaml")
    _, jobs = sweep_and_jobs(store_runs(tmp_path), "base")
    assert len(jobs) == 3 and len({r.data.params["base.lr"] for r in jobs}) == 3     # three different trials
    winner = min(jobs, key=lambda r: r.data.metrics["val/perplexity"])
    assert best["best_value"] == pytest.approx(winner.data.metrics["val/perplexity"])
    assert float(best["best_params"]["base.lr"]) == pytest.approx(float(winner.data.params["base.lr"]))


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())

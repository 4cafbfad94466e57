"""Hydra multirun on the entry point: every job is its own MLflow run, all under one sweep parent run."""

from __future__ import annotations

import sys

from conftest import sh


def test_multirun_runs_each_job_as_its_own_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    sh(sys.executable, "-m", "pipeline.run", "-m", "stage=base", "experiment=smoke", "base.max_steps=5",
       "base.lr=0.001,0.003", cwd=tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "base"]
    assert sorted(r.data.params["base.lr"] for r in runs) == ["0.001", "0.003"]
    assert all(r.info.status == "FINISHED" for r in runs)
    sweeps = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("posttrain.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id for r in runs)

"""Lineage helpers on their own: the git dirty flag and the printed chain (the end to end view is in test_dvc)."""

from __future__ import annotations

from pathlib import Path

from conftest import sh
from pipeline.lineage import format_chain
from pipeline.runs import git_state


def test_dirty_means_source_changed_not_the_pipelines_own_products(tmp_path: Path):
    sh("git", "init", "-q", cwd=tmp_path)
    spec = ("stages:\n  sft:\n    cmd: python -m pipeline.run stage=sft\n    outs:\n      - data/sft\n"
            "    metrics:\n      - data/metrics/sft.json:\n          cache: false\n"
            "    plots:\n      - data/plots/sft/loss.json:\n          cache: false\n")
    for path, text in {"stages/sft.py": "x = 1\n", "params.yaml": "seed: 0\n", "dvc.lock": "schema: '2.0'\n",
                       "dvc.yaml": spec, "data/metrics/sft.json": "{}\n", "data/plots/sft/loss.json": "[]\n",
                       "data/.gitignore": "/sft\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    sh("git", "add", "-A", cwd=tmp_path)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=tmp_path)
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    # What DVC does around a stage: deletes its metrics and plots, then rewrites dvc.lock and data/.gitignore.
    (tmp_path / "data/metrics/sft.json").unlink()
    (tmp_path / "data/plots/sft/loss.json").write_text("[1]\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "data/.gitignore").write_text("/sft\n/dpo\n")
    (tmp_path / "new_untracked.txt").write_text("scratch\n")
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "params.yaml").write_text("seed: 1\n")           # a parameter edit is a source change
    assert git_state(tmp_path) == (commit, True)
    sh("git", "checkout", "params.yaml", cwd=tmp_path)
    (tmp_path / "stages/sft.py").write_text("x = 2\n")           # and so is a code edit
    assert git_state(tmp_path) == (commit, True)
    sh("git", "checkout", "stages/sft.py", cwd=tmp_path)
    (tmp_path / "dvc.yaml").write_text(spec.replace("sft", "sft2"))  # and so is an edit to the pipeline itself
    assert git_state(tmp_path) == (commit, True)


def test_git_state_outside_a_repository_is_unknown_and_dirty(tmp_path: Path):
    assert git_state(tmp_path) == ("unknown", True)


def test_a_run_reached_twice_is_printed_in_full_once():
    node = {"status": "FINISHED", "git_commit": "abc1234567890", "git_dirty": "False", "upstream": {},
            "inputs": {}, "config": {}}
    chain = [
        {**node, "depth": 0, "run_id": "r-sft", "stage": "sft", "inputs": {"base": "d" * 64, "prepare": "e" * 64},
         "upstream": {"base": "r-base", "prepare": "r-prep"}, "config": {"sft.lr": "0.001"}},
        {**node, "depth": 1, "run_id": "r-base", "stage": "base"},
        {**node, "depth": 1, "run_id": "r-prep", "stage": "prepare", "inputs": {"base": "d" * 64},
         "upstream": {"base": "r-base"}},
        {"depth": 2, "run_id": "r-base", "stage": "base", "repeat": True},
    ]
    lines = format_chain(chain).splitlines()
    assert lines[0] == "sft  run r-sft  FINISHED  git abc1234567"
    assert lines[1] == "   input base: sha256 dddddddddddddddd  from run r-base"
    assert lines[3] == "   config: sft.lr=0.001"
    assert lines[-1] == "    └─ base  run r-base  (above)"
    assert sum("run r-base" in line and "FINISHED" in line for line in lines) == 1


def test_every_stage_run_records_what_it_cost_and_costs_prints_the_table(sft_chain, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.costs import format_table, stage_costs

    monkeypatch.chdir(sft_chain)
    client = MlflowClient(tracking_uri=f"sqlite:///{sft_chain / 'mlruns' / 'mlflow.db'}")
    rows = {r["stage"]: r for r in stage_costs(client)}
    assert list(rows) == ["base", "prepare", "sft"]
    for row in rows.values():
        assert row["wall_seconds"] > 0 and 100 < row["peak_rss_mb"] < 24 * 1024
    assert rows["sft"]["throughput"].endswith("tokens/s trained")
    assert float(rows["sft"]["throughput"].split()[0].replace(",", "")) > 0
    table = format_table(list(rows.values()))
    assert table.count("\n") == 5 and "| sft |" in table and "**all**" in table


def test_runs_left_running_by_dead_processes_are_marked_killed_and_live_ones_are_not(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.parents import OWNER_TAG, mark_dead_runs, process_identity

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("posttrain", artifact_location=(tmp_path / "artifacts").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner_of_gone = process_identity(gone.pid)
    gone.kill()
    gone.wait()
    dead = client.create_run(experiment, tags={OWNER_TAG: owner_of_gone}).info.run_id
    alive = client.create_run(experiment, tags={OWNER_TAG: process_identity()}).info.run_id
    reused = client.create_run(experiment, tags={OWNER_TAG: process_identity().rsplit(":", 1)[0] + ":1"}).info.run_id
    unowned = client.create_run(experiment).info.run_id
    assert sorted(mark_dead_runs(client, experiment, by="a test")) == sorted([dead, reused])  # a reused pid is dead
    assert client.get_run(dead).info.status == "KILLED"
    assert "marked KILLED by a test" in client.get_run(dead).data.tags["posttrain.ended"]
    assert client.get_run(alive).info.status == client.get_run(unowned).info.status == "RUNNING"


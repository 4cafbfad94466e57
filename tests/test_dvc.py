"""The chain under real DVC in a temp repo: invalidation rules, experiments, lineage, kill and resume."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_project, sh, subprocess_env
from pipeline.training import KILL_ENV


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


def set_param(project: Path, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("dvc") / "repo", "experiment=smoke")


ALL = {"base", "prepare", "sft", "collect", "reward", "dpo", "ppo", "grpo", "quantize", "evaluate"}
AFTER_SFT = {"collect", "reward", "dpo", "ppo", "grpo", "quantize", "evaluate"}


def test_invalidation_rules(project):
    first_params = (project / "params.yaml").read_text()
    first = sh("dvc", "repro", cwd=project).stdout
    assert ran(first) == ALL
    again = sh("dvc", "repro", cwd=project).stdout
    assert ran(again) == set() and "Data and pipelines are up to date" in again

    set_param(project, "sft.lr", 0.002)  # an SFT hyperparameter: sft and everything that reads its model
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"sft"} | AFTER_SFT

    set_param(project, "evaluate.few_shot", 2)  # an evaluate parameter: evaluate only
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"evaluate"}

    # A judge parameter, new human labels and a collect parameter each make collect stale; one repro then
    # reruns collect, the stages reading its pairs, and theirs (its output holds a new run.json: lineage).
    set_param(project, "judge.batch_size", 32)
    assert changed_stages(project) == {"collect"}
    (project / "data/labels/new.jsonl").write_text("")
    assert changed_stages(project) == {"collect"}
    set_param(project, "collect.k", 3)
    assert ran(sh("dvc", "repro", cwd=project).stdout) == AFTER_SFT

    set_param(project, "reward.lr", 0.002)  # a reward parameter: reward and the stages that read its model
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"reward", "ppo", "grpo", "evaluate"}
    set_param(project, "ppo.kl_coef", 0.1)  # another alignment method's parameter: that method and evaluate only
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"ppo", "evaluate"}
    set_param(project, "grpo.group_size", 6)
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"grpo", "evaluate"}
    set_param(project, "dpo.beta", 0.2)  # a dpo parameter: dpo, the quantized dpo model, and evaluate
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"dpo", "quantize", "evaluate"}
    with open(project / "stages" / "dpo.py", "a") as fh:  # dpo's code
        fh.write("\n# a change to dpo's code\n")
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"dpo", "quantize", "evaluate"}
    set_param(project, "quantize.calibration_rows", 16)  # a quantize parameter: quantize and evaluate
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"quantize", "evaluate"}

    set_param(project, "logger.experiment", "elsewhere")  # read by no stage as a parameter
    set_param(project, "trainer.progress_bar", False)
    assert ran(sh("dvc", "repro", cwd=project).stdout) == set()
    set_param(project, "logger.experiment", "posttrain")

    set_param(project, "data.verbose_share", 0.5)  # a prepare parameter: prepare and everything after it
    assert ran(sh("dvc", "repro", cwd=project).stdout) == ALL - {"base"}

    # A base parameter makes base stale (and, through its model, everything after it, as the prepare change
    # above shows); set back, nothing is stale: DVC compares parameter values, not edit times.
    set_param(project, "base.lr", 0.002)
    assert changed_stages(project) == {"base"}
    set_param(project, "base.lr", yaml.safe_load(first_params)["base"]["lr"])
    assert changed_stages(project) == set()


# Each stage's own code file and one of its own parameters, and the stages that must see the change directly
# (the rest follow through their inputs, which test_invalidation_rules checks by running them). Each value differs
# from the default and from what test_invalidation_rules leaves in the shared project's params.yaml.
OWN = {
    "base": ("stages/base.py", "base.lr", 0.0015, {"base"}),
    "prepare": ("stages/prepare.py", "prepare.histogram_bins", 7, {"prepare"}),
    "sft": ("stages/sft.py", "sft.lr", 0.0015, {"sft"}),
    "collect": ("stages/collect.py", "collect.k", 4, {"collect"}),
    "reward": ("stages/reward.py", "reward.lr", 0.0015, {"reward"}),
    "dpo": ("stages/dpo.py", "dpo.beta", 0.3, {"dpo"}),
    "ppo": ("stages/ppo.py", "ppo.kl_coef", 0.3, {"ppo"}),
    "grpo": ("stages/grpo.py", "grpo.kl_coef", 0.3, {"grpo"}),
    "quantize": ("stages/quantize.py", "quantize.latency_repeats", 3, {"quantize"}),
    "evaluate": ("stages/evaluate.py", "evaluate.few_shot", 1, {"evaluate"}),
}
CODE_READERS = {"stages/evaluate.py": {"quantize", "evaluate"}}  # quantize measures through evaluate's test loop


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout or "{}"))


def test_every_stage_sees_its_own_code_and_parameters_and_nothing_else(project):
    sh("dvc", "repro", cwd=project)
    assert changed_stages(project) == set()
    for stage, (code, key, value, readers) in OWN.items():
        original_code, original_params = (project / code).read_text(), (project / "params.yaml").read_text()
        (project / code).write_text(original_code + "\n# changed\n")
        assert changed_stages(project) == CODE_READERS.get(code, {stage}), code
        (project / code).write_text(original_code)
        set_param(project, key, value)
        assert changed_stages(project) == readers, key
        (project / "params.yaml").write_text(original_params)
        assert changed_stages(project) == set()


def test_lineage_parent_run_per_dvc_execution(project):
    from mlflow.tracking import MlflowClient

    out = sh(sys.executable, "-m", "pipeline.repro", "--force", cwd=project).stdout   # what `make pipeline` runs
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("posttrain.kind") == "pipeline"]
    newest = parents[0]
    assert newest.info.run_id in out and newest.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(ALL)
    lock = client.download_artifacts(newest.info.run_id, "dvc.lock", str(project / ".cache"))
    assert Path(lock).read_text() == (project / "dvc.lock").read_text()      # the parent carries the final lock
    evaluate_run = next(r for r in children if r.info.run_name == "evaluate")
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate_run.info.run_id]
    assert sorted(r.info.run_name for r in variants) == ["base_cot", "base_few_shot", "base_zero_shot", "dpo", "grpo",
                                                         "ppo", "quantize", "sft"]
    assert all("test/accuracy" in r.data.metrics for r in variants)
    base_run = json.loads((project / "data" / "base" / "run.json").read_text())
    prepare_child = next(r for r in children if r.info.run_name == "prepare")
    assert prepare_child.data.tags["upstream.base.run_id"] == base_run["run_id"]
    assert base_run["parent_run_id"] == newest.info.run_id
    assert base_run["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()

    view = sh(sys.executable, "-m", "pipeline.lineage", "quantize", cwd=project).stdout   # the lineage view
    for stage in ("quantize", "dpo", "collect", "sft", "prepare", "base"):
        run_id = json.loads((project / "data" / stage / "run.json").read_text())["run_id"]
        assert f"{stage}  run {run_id}" in view
    assert "input prepare: sha256" in view and "config: " in view and "dpo.beta=" in view


def test_exp_run_with_set_param_reruns_only_what_it_changes(project):
    sh("dvc", "repro", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "baseline", cwd=project)
    out = sh("dvc", "exp", "run", "-S", "experiment=smoke", "-S", "data.verbose_share=0.1", cwd=project).stdout
    assert ran(out) == ALL - {"base"}
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["verbose_share"] == 0.1 and params["base"]["max_steps"] == 30
    shown = sh("dvc", "exp", "show", "--json", cwd=project).stdout
    assert "verbose_share" in shown
    diff = sh("dvc", "metrics", "diff", "--json", cwd=project).stdout
    assert "data/metrics/prepare.json" in diff


def test_queued_sweep_runs_each_experiment_and_plots_diff_works(project):
    sh("dvc", "repro", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "baseline for the queue", cwd=project)
    sh("dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "dpo.beta=0.05,0.2", cwd=project)
    queued = sh("dvc", "queue", "status", cwd=project).stdout
    assert queued.count("Queued") == 2
    out = sh("dvc", "exp", "run", "--run-all", cwd=project)
    assert out.returncode == 0
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    betas = set()
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                params = rev.get("data", {}).get("params", {}).get("params.yaml", {}).get("data", {})
                if params:
                    betas.add(params["dpo"]["beta"])
    assert {0.05, 0.2} <= betas
    diff = sh("dvc", "plots", "diff", "--json", cwd=project).stdout
    assert "data/plots/dpo/loss.json" in diff or "dpo" in diff


UPSTREAM = {"sft": "prepare", "reward": "collect", "dpo": "collect", "ppo": "reward", "grpo": "reward"}


@pytest.mark.parametrize(("stage", "overrides", "kill_at"), [
    ("base", ("base.max_steps=60", "base.checkpoint_every_n_steps=10"), 25),
    ("sft", ("sft.max_steps=30", "sft.checkpoint_every_n_steps=10"), 15),
    ("reward", ("judge=function", "reward.max_steps=30", "reward.checkpoint_every_n_steps=10"), 15),
    ("dpo", ("judge=function", "dpo.max_steps=30", "dpo.checkpoint_every_n_steps=10", "dpo.lr=1e-3"), 15),
    # Online stages count optimizer steps (2 per iteration in the smoke config): killed after iteration 4,
    # resumed from the checkpoint of iteration 2 (the kill comes before that step's checkpoint).
    ("ppo", ("ppo.iterations=6", "ppo.checkpoint_every_n_iterations=2", "ppo.lr=1e-3"), 8),
    ("grpo", ("grpo.iterations=6", "grpo.checkpoint_every_n_iterations=2", "grpo.lr=1e-3"), 4),
])
def test_kill_mid_training_then_rerun_resumes_and_matches(tmp_path, stage, overrides, kill_at):
    project = make_project(tmp_path / "repo", "experiment=smoke", *overrides)
    if stage in UPSTREAM:
        sh("dvc", "repro", UPSTREAM[stage], cwd=project)
    env = subprocess_env()
    env[KILL_ENV] = str(kill_at)
    killed = sh("dvc", "repro", stage, cwd=project, check=False, env=env)
    assert killed.returncode != 0 and not (project / "data" / stage).exists()
    assert list((project / ".cache" / "checkpoints" / stage).glob("*/last.ckpt"))
    resumed = sh("dvc", "repro", stage, cwd=project)
    assert f"{stage}: resuming from" in resumed.stderr + resumed.stdout
    assert not (project / ".cache" / "checkpoints" / stage).exists()  # cleared after success

    # The uninterrupted reference: the same stage, same inputs, same config, run in one go.
    reference = tmp_path / "reference"
    skip = {project / "data" / stage, project / "mlruns", project / ".cache"}
    shutil.copytree(project, reference, ignore=lambda folder, names: [n for n in names if Path(folder) / n in skip])
    sh("dvc", "repro", "--single-item", "--force", stage, cwd=reference)
    from safetensors.torch import load_file

    a = load_file(str(project / "data" / stage / "model.safetensors"))
    b = load_file(str(reference / "data" / stage / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ours = json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())
    theirs = json.loads((reference / "data" / "metrics" / f"{stage}.json").read_text())
    key = "val/loss" if "val/loss" in ours else "val/reward"
    assert ours[key] == pytest.approx(theirs[key], abs=1e-5)

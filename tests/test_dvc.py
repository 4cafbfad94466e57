"""The chain under real DVC in a temp repo: invalidation rules, experiments, lineage, kill and resume.

The smoke chain is built once per session (``built``: ``python -m pipeline.repro``, what ``make pipeline`` runs,
in a fresh git + DVC repo); a test that changes anything works on its own copy (``project``), so no test
depends on what another did or in which order they ran.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import make_project, sh, subprocess_env
from pipeline.training import KILL_ENV

pytestmark = pytest.mark.slow

ALL = {"base", "prepare", "sft", "collect", "reward", "dpo", "ppo", "grpo", "quantize", "distill", "classify", "evaluate",
       "register"}
# Which stages read each stage's output folder directly (dvc.yaml's deps); the rest follow through them.
READERS = {
    "base": {"prepare", "sft", "classify", "evaluate"},  # classify: its backbone with classify.backbone=base
    "prepare": {"sft", "collect", "quantize", "distill", "classify", "evaluate"},  # ppo and grpo read only prepare's prompts.jsonl
    "sft": {"collect", "reward", "dpo", "ppo", "grpo", "classify", "evaluate"},
    "collect": set(),  # reward and dpo read only its pairs.jsonl (below), not the folder
    "reward": {"ppo", "evaluate"},  # grpo too with grpo.reward=model (test_an_input_a_choice_does_not_read...)
    "dpo": {"quantize", "distill", "evaluate"},  # distill: its default teacher
    "ppo": {"evaluate"},
    "grpo": {"evaluate"},
    "quantize": {"evaluate", "register"},  # register: its default source
    "distill": {"evaluate"},
    "classify": {"evaluate", "register"},  # the guard (served in front of the registered model)
    "evaluate": {"register"},  # register: the lineage (and the gate reads data/metrics/evaluate.json)
    "register": set(),
}


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


def get_param(project: Path, key: str):
    node = yaml.safe_load((project / "params.yaml").read_text())
    for part in key.split("."):
        node = node[part]
    return node


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout or "{}"))


def run_json(project: Path, stage: str) -> dict:
    return json.loads((project / "data" / stage / "run.json").read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict:
    """The smoke chain built once by ``python -m pipeline.repro`` in a fresh repo; read-only (copy it to change it)."""
    project = make_project(tmp_path_factory.mktemp("dvc") / "repo", "experiment=smoke")
    commit = sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    proc = sh(sys.executable, "-m", "pipeline.repro", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "the built smoke chain", cwd=project)
    return {"project": project, "output": proc.stdout, "log": proc.stderr, "commit": commit}


@pytest.fixture()
def project(built, tmp_path) -> Path:
    """A private copy of the built project (git, DVC cache, run cache, MLflow store and all)."""
    return Path(shutil.copytree(built["project"], tmp_path / "repo", symlinks=True))


def test_the_chain_runs_every_stage_once_then_nothing(built, project):
    assert ran(built["output"]) == ALL
    for stage in ALL:  # the console: a header, then a summary naming the outputs and the run
        assert re.search(rf"== {stage}: \w.*\(model=embedded, seed=\d+\)", built["log"]), stage
        assert re.search(rf"== {stage} done: .*\n(.*\n)*?   outputs: data/{stage}   MLflow run: [0-9a-f]{{32}}",
                         built["output"]), stage
    for noise in ("GPU available", "TPU available", "Tip:", "Creating initial MLflow database tables",
                  "Writing model shards", "is deprecated"):  # dependency noise, filtered
        assert noise not in built["output"] + built["log"], noise
    again = sh("dvc", "repro", cwd=project).stdout
    assert ran(again) == set() and "Data and pipelines are up to date" in again
    assert changed_stages(project) == set()


# Each stage's own code file and one of its own parameters (each value differs from the smoke default).
OWN = {
    "base": ("stages/base.py", "base.lr", 0.0015),
    "prepare": ("stages/prepare.py", "prepare.histogram_bins", 7),
    "sft": ("stages/sft.py", "sft.lr", 0.0015),
    "collect": ("stages/collect.py", "collect.k", 4),
    "reward": ("stages/reward.py", "reward.lr", 0.0015),
    "dpo": ("stages/dpo.py", "dpo.beta", 0.3),
    "ppo": ("stages/ppo.py", "ppo.kl_coef", 0.3),
    "grpo": ("stages/grpo.py", "grpo.kl_coef", 0.3),
    "quantize": ("stages/quantize.py", "quantize.latency_repeats", 3),
    "distill": ("stages/distill.py", "distill.temperature", 3.0),
    "classify": ("stages/classify.py", "classify.task_share", 0.25),
    "evaluate": ("stages/evaluate.py", "evaluate.few_shot", 1),
    "register": ("stages/register.py", "register.min_delta", 0.02),
}


def test_every_stage_sees_its_own_code_and_parameters_and_nothing_else(project):
    for stage, (code, key, value) in OWN.items():
        original_code, original_params = (project / code).read_text(), (project / "params.yaml").read_text()
        assert get_param(project, key) != value, key
        (project / code).write_text(original_code + "\n# changed\n")
        assert changed_stages(project) == {stage}, code  # no stage imports another (tests/test_contract.py)
        (project / code).write_text(original_code)
        set_param(project, key, value)
        assert changed_stages(project) == {stage}, key
        (project / "params.yaml").write_text(original_params)
        assert changed_stages(project) == set()


def test_a_new_output_makes_exactly_its_readers_stale(project):
    """The edges of the DAG, one stage at a time: a changed output folder marks that stage (its output differs
    from dvc.lock) and every stage reading it, nothing else."""
    for stage, readers in READERS.items():
        extra = project / "data" / stage / "extra.txt"  # not run.json: DVC does not hash it (.dvcignore)
        extra.write_text("a changed output\n")
        assert changed_stages(project) == {stage} | readers, stage
        extra.unlink()
        assert changed_stages(project) == set(), stage
    for stage, file, readers in (("prepare", "prompts.jsonl", READERS["prepare"] | {"ppo", "grpo"}),  # one split
                                 ("collect", "pairs.jsonl", {"reward", "dpo"})):                     # one file
        path = project / "data" / stage / file
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert changed_stages(project) == {stage} | readers, file
        path.write_bytes(original)


def test_shared_parameters_judges_and_labels_invalidate_what_reads_them(project):
    def stale_after(key, value) -> set[str]:
        original = (project / "params.yaml").read_text()
        set_param(project, key, value)
        stale = changed_stages(project)
        (project / "params.yaml").write_text(original)
        return stale

    assert stale_after("seed", 7) == ALL
    assert stale_after("trainer.num_threads", 1) == ALL  # the runner sets every stage's threads (pipeline.stage)
    assert stale_after("peft.options.r", 4) == {"sft", "reward", "dpo", "ppo", "grpo", "classify"}
    assert stale_after("data.verbose_share", 0.5) == {"prepare"}
    assert stale_after("model.arch.hidden_size", 32) == {"base"}
    assert stale_after("judge.batch_size", 32) == {"collect"}      # who judges is collect's business only
    assert stale_after("logger.experiment", "elsewhere") == set()  # read by no stage as a parameter
    assert stale_after("trainer.progress_bar", False) == set()


def test_an_input_a_choice_does_not_read_is_no_dependency_of_that_choice(project):
    """Labels matter to collect only under judge=human, the reward model to grpo only with grpo.reward=model:
    otherwise their DVC dep is the stand-in data/UNREAD.md, and changing them leaves the stage up to date."""
    labels = project / "data" / "labels" / "human.jsonl"
    reward_extra = project / "data" / "reward" / "extra.txt"
    labels.write_text('{"prompt_id": "p", "response_a": "1", "response_b": "2", "choice": "a", "annotator": "x"}\n')
    reward_extra.write_text("a retrained reward model\n")
    assert changed_stages(project) == {"reward", "ppo", "evaluate"}  # judge=function, grpo.reward=verifier
    reward_extra.unlink()
    params = (project / "params.yaml").read_text()
    set_param(project, "judge", {"name": "human", "labels_file": "data/labels/human.jsonl", "conflict": "majority",
                                 "reads": "data/labels/human.jsonl"})
    set_param(project, "grpo.reward", "model")
    set_param(project, "grpo.reward_input", "reward")
    sh("git", "commit", "-qam", "judge=human, grpo.reward=model", cwd=project)
    sh("dvc", "commit", "-f", "collect", "grpo", cwd=project)       # as if they had run with these choices
    assert changed_stages(project) == set()
    labels.write_text(labels.read_text() + labels.read_text())       # one more label
    assert changed_stages(project) == {"collect"}
    reward_extra.write_text("a retrained reward model\n")
    assert changed_stages(project) == {"collect", "reward", "ppo", "grpo", "evaluate"}
    set_param(project, "grpo.reward_input", "UNREAD.md")              # a hand edit that breaks the derivation
    proc = sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=grpo", cwd=project, check=False)
    assert proc.returncode == 2 and "config key 'grpo.reward_input' = 'UNREAD.md' must be 'reward'" in proc.stderr
    (project / "params.yaml").write_text(params)


def test_the_distilled_students_are_evaluated_beside_their_teacher(built):
    """The default chain's distill stage feeds evaluate: both students are variants with their KL to the teacher
    (dpo) and their size, and the report puts teacher and students side by side."""
    project = built["project"]  # read only
    results = json.loads((project / "data" / "metrics" / "evaluate.json").read_text())
    for student in ("distill", "distill_sft"):
        assert results[student]["test/kl_to_teacher"] >= 0 and "test/kl_to_sft" in results[student]
        assert results[student]["size/parameters"] <= results["dpo"]["size/parameters"] / 2
    assert "test/kl_to_teacher" not in results["dpo"]
    page = (project / "data" / "evaluate" / "report.html").read_text()
    assert "Distillation (distill stage)" in page and "teacher (dpo)" in page and "student, SFT only" in page


def test_one_parameter_reruns_its_stage_and_what_follows_never_what_precedes(project):
    set_param(project, "dpo.beta", 0.2)  # a dpo parameter: dpo, the quantized and distilled dpo models, evaluate, register
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"dpo", "quantize", "distill", "evaluate", "register"}
    set_param(project, "evaluate.few_shot", 2)  # an evaluate parameter: evaluate and what reads it
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"evaluate", "register"}
    # A base parameter makes base stale; set back, nothing is: DVC compares parameter values, not edit times.
    original = get_param(project, "base.lr")
    set_param(project, "base.lr", 0.002)
    assert changed_stages(project) == {"base"}
    set_param(project, "base.lr", original)
    assert changed_stages(project) == set()


def test_lineage_parent_run_per_dvc_execution(built, tmp_path):
    from mlflow.tracking import MlflowClient

    project = built["project"]  # read only: the run the session's `python -m pipeline.repro` made
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("posttrain.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id in built["output"] and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["posttrain.stage"] for r in children) == sorted(ALL)
    assert all(re.fullmatch(rf"{r.data.tags['posttrain.stage']}-[0-9a-f]{{6}}", r.info.run_name) for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    lock = client.download_artifacts(parent.info.run_id, "dvc.lock", str(tmp_path))
    assert Path(lock).read_text() == (project / "dvc.lock").read_text()      # the parent carries the final lock
    evaluate_run = next(r for r in children if r.data.tags["posttrain.stage"] == "evaluate")
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate_run.info.run_id]
    assert sorted(r.info.run_name for r in variants) == ["base_chat", "base_cot", "base_few_shot", "base_zero_shot",
                                                         "distill", "distill_sft", "dpo", "grpo", "ppo", "quantize", "sft"]
    assert all("test/accuracy" in r.data.metrics for r in variants)
    base_run = run_json(project, "base")
    prepare_child = next(r for r in children if r.data.tags["posttrain.stage"] == "prepare")
    assert prepare_child.data.tags["upstream.base.run_id"] == base_run["run_id"]
    assert base_run["parent_run_id"] == parent.info.run_id
    assert base_run["git_commit"] == built["commit"]

    view = sh(sys.executable, "-m", "pipeline.lineage", "quantize", cwd=project).stdout   # the lineage view
    for stage in ("quantize", "dpo", "collect", "sft", "prepare", "base"):
        assert f"{stage}  run {run_json(project, stage)['run_id']}" in view
    assert "input prepare: sha256" in view and "config: " in view and "dpo.beta=" in view


def test_lineage_survives_a_dvc_cache_hit(built, project):
    """A stage restored from DVC's run cache (no --force, nothing run) still leads back to the runs that made
    its output. DVC does not cache run.json (.dvcignore: run ids must not change an output's hash), so the
    restored folder comes without it; the run is found by the output's digest and its record written back."""
    from mlflow.tracking import MlflowClient

    first = run_json(project, "evaluate")["run_id"]
    original = get_param(project, "evaluate.few_shot")
    set_param(project, "evaluate.few_shot", original + 1)
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"evaluate", "register"}  # register reads evaluate's output
    second = run_json(project, "evaluate")["run_id"]
    assert second != first
    set_param(project, "evaluate.few_shot", original)
    restored = sh("dvc", "repro", cwd=project).stdout
    assert ran(restored) == set() and "Stage 'evaluate' is cached" in restored    # a run-cache hit: nothing ran
    assert not (project / "data/evaluate/run.json").exists()
    assert (project / "data/metrics/evaluate.json").read_text() == (built["project"] / "data/metrics/evaluate.json").read_text()
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    evaluate_runs = [r.info.run_id for r in client.search_runs([exp.experiment_id])
                     if r.data.tags.get("posttrain.stage") == "evaluate" and r.data.tags.get("posttrain.kind") == "stage"]
    assert sorted(evaluate_runs) == sorted([first, second])                    # the hit made no new run
    view = sh(sys.executable, "-m", "pipeline.lineage", "evaluate", cwd=project).stdout
    assert f"evaluate  run {first}" in view
    assert run_json(project, "evaluate")["run_id"] == first  # the record is back beside the output
    assert changed_stages(project) == set()                   # and DVC does not see it
    for stage in ("quantize", "dpo", "sft", "base"):
        assert f"{stage}  run {run_json(project, stage)['run_id']}" in view


def test_runs_outside_dvc_leave_the_chain_up_to_date(project):
    """An ad-hoc run with the config of params.yaml rewrites its output with the same bytes and a new run.json,
    which DVC does not hash: nothing downstream turns stale. One with another config writes into a folder of
    its own and leaves the DVC output as dvc.lock describes it."""
    from pipeline.outputs import digest

    before = run_json(project, "prepare")["run_id"]
    sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=prepare", cwd=project)
    assert run_json(project, "prepare")["run_id"] != before   # it did run, into the DVC output
    assert changed_stages(project) == set()

    reward = digest(project / "data" / "reward")
    trial = sh(sys.executable, "-m", "pipeline.run", "--params", "params.yaml", "stage=reward", "reward.max_steps=3",
               cwd=project)
    assert "config differs from params.yaml at reward.max_steps" in trial.stderr
    (elsewhere,) = (project / ".cache" / "runs").glob("reward-*")
    assert (elsewhere / "reward" / "config.json").exists() and (elsewhere / "metrics" / "reward.json").exists()
    assert digest(project / "data" / "reward") == reward and changed_stages(project) == set()


def test_exp_run_with_set_param_reruns_only_what_it_changes(project):
    out = sh("dvc", "exp", "run", "-S", "experiment=smoke", "-S", "evaluate.few_shot=1", cwd=project).stdout
    assert ran(out) == {"evaluate", "register"}  # register reads evaluate's output
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["evaluate"]["few_shot"] == 1 and params["base"]["max_steps"] == 30   # composed with the smoke overlay
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    few_shots = {rev["data"]["params"]["params.yaml"]["data"]["evaluate"]["few_shot"]
                 for commit in shown for exp in (commit.get("experiments") or []) for rev in exp.get("revs", [])
                 if rev.get("data", {}).get("params")}
    assert 1 in few_shots
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=project).stdout)
    assert set(diff) == {"data/metrics/evaluate.json", "data/metrics/register.json"}  # the stages that ran, only
    assert any(v["old"] != v["new"] for v in diff["data/metrics/evaluate.json"].values())
    # the registered variant (quantize) scored the same, so the new version is a challenger
    assert diff["data/metrics/register.json"]["version"] == {"old": 1, "new": 2, "diff": 1}
    assert diff["data/metrics/register.json"]["gate/promoted"] == {"old": 1, "new": 0, "diff": -1}


def test_queued_sweep_runs_each_experiment_and_plots_diff_works(project):
    sh("dvc", "exp", "run", "--queue", "-S", "experiment=smoke", "-S", "evaluate.few_shot=1,2", cwd=project)
    assert sh("dvc", "queue", "status", cwd=project).stdout.count("Queued") == 2
    sh("dvc", "exp", "run", "--run-all", cwd=project)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    done = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data", {})
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("data/metrics/evaluate.json", {}).get("data", {})
                if params and metrics:
                    done[params["evaluate"]["few_shot"]] = rev["rev"]
    assert {1, 2} <= set(done)
    diff = json.loads(sh("dvc", "plots", "diff", done[1], done[2], "--json", cwd=project).stdout)["data"]
    accuracy = diff["accuracy per variant and slice"]               # the dvc.yaml plot over evaluate's accuracy.csv
    rows = [row for entry in accuracy for row in entry["content"]["data"]["values"]]
    assert {row["rev"] for row in rows} == {done[1], done[2]}      # both experiments' bars, side by side
    assert {(row["variant"], row["slice"]) for row in rows if row["rev"] == done[1]} == \
        {(row["variant"], row["slice"]) for row in rows if row["rev"] == done[2]}



# Every training stage, made long enough to be killed mid-way, with checkpoints every third or so of the run.
TRAINING = {
    "base": {"base.max_steps": 60, "base.checkpoint_every_n_steps": 10},
    "sft": {"sft.max_steps": 30, "sft.checkpoint_every_n_steps": 10},
    "reward": {"reward.max_steps": 30, "reward.checkpoint_every_n_steps": 10},
    "dpo": {"dpo.max_steps": 30, "dpo.checkpoint_every_n_steps": 10, "dpo.lr": 1e-3},
    # online stages: 4 iterations (each several updates), a checkpoint after the second; 6 cost the suite ~1 min
    "ppo": {"ppo.iterations": 4, "ppo.checkpoint_every_n_iterations": 2, "ppo.lr": 1e-3},
    "grpo": {"grpo.iterations": 4, "grpo.checkpoint_every_n_iterations": 2, "grpo.lr": 1e-3},
    "distill": {"distill.max_steps": 30, "distill.checkpoint_every_n_steps": 10},  # killed in the student's fit
}
# The kill step of each stage is drawn at random; the seed is printed with the failure so that
# POSTTRAIN_FAULT_SEED=<seed> repeats the same kills.
FAULT_SEED = int(os.environ.get("POSTTRAIN_FAULT_SEED") or random.SystemRandom().randrange(10**6))
# The window between the two renames belongs to the output writer (pipeline/outputs.py), the same code for every
# stage: one stage of each kind (an offline and an online one) is also killed there; the others are killed once.
KILLED_BETWEEN_RENAMES = ("dpo", "grpo")


def optimizer_steps(project: Path, stage: str) -> tuple[int, int, int]:
    """(optimizer steps of the whole run, steps between checkpoints, steps per training batch) of ``stage`` under
    the project's params. An online stage's batch is one iteration: several updates on one sampled batch."""
    c = get_param(project, stage)
    if stage not in ("ppo", "grpo"):
        return c["max_steps"], c["checkpoint_every_n_steps"], 1
    sequences = c["prompts_per_iteration"] * (c["group_size"] if stage == "grpo" else 1)
    updates = c["epochs"] * -(-sequences // c["minibatch_size"])
    return c["iterations"] * updates, c["checkpoint_every_n_iterations"] * updates, updates


@pytest.mark.parametrize("stage", list(TRAINING))
def test_killed_at_a_random_step_then_between_the_renames_the_stage_ends_as_an_uninterrupted_run(
        project, tmp_path, stage):
    """SIGKILL at a random optimizer step; the rerun resumes from the last checkpoint (or starts over when there
    was none) and finishes. For the stages of :data:`KILLED_BETWEEN_RENAMES` that rerun trains to the end and is
    killed at the worst moment for its output folder, between the two renames, and a third run resumes again and
    finishes. Then ``dvc status`` is clean, no temp folder or checkpoint remains, the MLflow store holds no RUNNING
    run (the dead ones are KILLED, each resumed run names the run it resumed), and the weights (the PPO critic
    and value head included) and metrics equal an uninterrupted run's.
    Inputs: ``project``, built through every stage; only ``stage`` is stale after its parameters change."""
    from safetensors.torch import load_file

    for key, value in TRAINING[stage].items():
        set_param(project, key, value)
    assert changed_stages(project) == {stage}
    total, every, per_batch = optimizer_steps(project, stage)
    kill_at = random.Random(f"{FAULT_SEED}-{stage}").randint(1, total)
    print(f"{stage}: killed at optimizer step {kill_at} of {total}; POSTTRAIN_FAULT_SEED={FAULT_SEED} repeats it")
    checkpoints = project / ".cache" / "checkpoints" / stage
    env = subprocess_env()

    env[KILL_ENV] = str(kill_at)
    killed = sh("dvc", "repro", stage, cwd=project, check=False, env=env)
    assert killed.returncode != 0 and not (project / "data" / stage).exists()
    dies_at = -(-kill_at // per_batch) * per_batch  # the kill fires at the end of a training batch ...
    checkpointed = dies_at > every                  # ... before that step's checkpoint is written
    assert bool(list(checkpoints.glob("*/last.ckpt"))) == checkpointed, kill_at
    (killed_run,) = stage_runs(project, stage, after=run_json(project, "evaluate")["run_id"])
    assert killed_run.info.status == "RUNNING"  # not FINISHED: it wrote nothing (and could not say so itself)

    dead_runs, resumes = [killed_run], checkpointed
    if stage in KILLED_BETWEEN_RENAMES:
        env[KILL_ENV] = "rename"
        renamed = sh("dvc", "repro", stage, cwd=project, check=False, env=env)
        assert renamed.returncode != 0 and not (project / "data" / stage).exists()
        assert (f"{stage}: resuming from" in renamed.stderr + renamed.stdout) == checkpointed  # else: from the start
        leftovers = sorted(p.name.split("-")[0] for p in (project / "data").glob(f".{stage}.*-*"))
        assert leftovers == [f".{stage}.tmp"]  # DVC removed the old output before the stage ran: nothing renamed away
        assert list(checkpoints.glob("*/last.ckpt"))  # kept until the output is in place
        (renamed_run,) = stage_runs(project, stage, after=killed_run.info.run_id)
        dead_runs.append(renamed_run)
        resumes = True                                # it trained to the end: its last checkpoint is the whole run

    resumed = sh("dvc", "repro", stage, cwd=project)
    assert ran(resumed.stdout) == {stage}
    assert (f"{stage}: resuming from" in resumed.stderr + resumed.stdout) == resumes
    assert not checkpoints.exists()                                   # cleared after success
    assert not list((project / "data").glob(f".{stage}.*-*"))         # the dead run's temp folder removed
    assert stage not in changed_stages(project)
    store = mlflow_client(project)
    for dead in dead_runs:
        dead = store.get_run(dead.info.run_id)
        assert dead.info.status == "KILLED" and "died" in dead.data.tags["posttrain.ended"]
    if len(dead_runs) == 2:
        renamed_run = store.get_run(dead_runs[1].info.run_id)
        assert (renamed_run.data.tags.get("posttrain.resumed_run") == killed_run.info.run_id) == checkpointed
    resumed_run = store.get_run(run_json(project, stage)["run_id"])
    assert resumed_run.info.status == "FINISHED"
    # one training across the processes: each resumed run names the run it resumed
    assert resumed_run.data.tags.get("posttrain.resumed_run") == (dead_runs[-1].info.run_id if resumes else None)
    assert not store.search_runs([resumed_run.info.experiment_id], "attributes.status = 'RUNNING'")

    # The uninterrupted reference: the same stage, same inputs, same config, run in one go.
    reference = tmp_path / "reference"
    skip = {project / "data" / stage, project / "mlruns", project / ".cache"}
    shutil.copytree(project, reference, ignore=lambda folder, names: [n for n in names if Path(folder) / n in skip])
    sh("dvc", "repro", "--single-item", "--force", stage, cwd=reference)
    weights = ["model.safetensors"]
    if stage == "ppo":
        weights += ["adapter/critic/adapter_model.safetensors", "adapter/critic/value_head.safetensors"]
    if stage == "distill":
        weights += ["distill_sft/model.safetensors"]  # the baseline student, trained after the resumed one
    for name in weights:
        a = load_file(str(project / "data" / stage / name))
        b = load_file(str(reference / "data" / stage / name))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    ours = json.loads((project / "data" / "metrics" / f"{stage}.json").read_text())
    theirs = json.loads((reference / "data" / "metrics" / f"{stage}.json").read_text())
    key = "val/loss" if "val/loss" in ours else "val/reward"
    assert ours[key] == pytest.approx(theirs[key], abs=1e-5)
    assert set(ours) == set(theirs)  # a resumed stage reports what an uninterrupted one does, *_before included
    before = [k for k in ours if k.endswith("_before")]
    assert before and all(ours[k] == pytest.approx(theirs[k], abs=1e-6) for k in before)
    plots = sorted((project / "data" / "plots" / stage).glob("*.json"))
    assert plots
    for plot in plots:  # the curves across the three processes: no gap, no repeated step
        rows = json.loads(plot.read_text())
        expected = json.loads((reference / "data" / "plots" / stage / plot.name).read_text())
        assert [sorted(r) for r in rows] == [sorted(r) for r in expected], plot.name
        assert rows == [{k: pytest.approx(v, abs=1e-4) if isinstance(v, float) else v for k, v in r.items()}
                        for r in expected], plot.name


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def stage_runs(project: Path, stage: str, after: str) -> list:
    """The runs of ``stage`` that started after run ``after``."""
    client = mlflow_client(project)
    start = client.get_run(after).info.start_time
    experiment = client.get_experiment_by_name("posttrain").experiment_id
    return [r for r in client.search_runs([experiment], f"tags.`posttrain.stage` = '{stage}'")
            if r.info.start_time > start and r.data.tags.get("posttrain.kind") == "stage"]


def test_killing_the_repro_wrapper_stops_dvc_and_its_stage_and_the_next_run_marks_it_killed(project):
    """SIGKILL of ``python -m pipeline.repro`` mid-chain: dvc and the running stage stop with it (no orphan goes
    on writing), and the next execution marks the runs the dead processes left RUNNING as KILLED."""
    import os
    import signal
    import subprocess
    import time

    set_param(project, "sft.max_steps", 400)  # long enough to be caught mid-training
    wrapper = subprocess.Popen([sys.executable, "-m", "pipeline.repro", "sft"], cwd=project, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def descendants(pid: int) -> set[int]:
        found, todo = set(), [pid]
        while todo:
            parent = todo.pop()
            for child in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = child.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == parent and int(child.parent.name) not in found:
                    found.add(int(child.parent.name))
                    todo.append(int(child.parent.name))
        return found

    def running_stage() -> bool:
        return any(b"pipeline.run" in Path(f"/proc/{p}/cmdline").read_bytes() for p in descendants(wrapper.pid)
                   if Path(f"/proc/{p}/cmdline").exists())

    deadline = time.time() + 120
    while not running_stage():
        assert wrapper.poll() is None and time.time() < deadline, wrapper.stdout.read() if wrapper.poll() else "timeout"
        time.sleep(0.5)
    time.sleep(3)  # the stage is training
    orphans = descendants(wrapper.pid)
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]
              for p in orphans):
        assert time.time() < deadline, f"still running after the wrapper died: {orphans}"
        time.sleep(0.5)
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("posttrain").experiment_id
    # The interrupted stage ends its own run FAILED (Lightning exits on the interrupt); what a dead process left
    # RUNNING (the wrapper's run, when it had one open) is for the next execution to mark.
    left = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    sh("dvc", "status", cwd=project)  # dvc released its lock on the way out: the repo is usable
    sh(sys.executable, "-m", "pipeline.repro", "prepare", cwd=project)  # any next execution cleans up
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")  # nothing claims to run
    for run in left:
        again = client.get_run(run.info.run_id)
        assert again.info.status == "KILLED" and "died" in again.data.tags["posttrain.ended"]


def store_of(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def test_the_chain_registers_its_product_as_champion_with_every_stage_in_its_lineage(built):
    project = built["project"]
    client = store_of(project)
    (model,) = client.search_registered_models()
    assert model.name == "posttrain" and model.aliases == {"champion": 1}
    version = client.get_model_version("posttrain", "1")
    tags = version.tags
    runs = {stage: run_json(project, stage)["run_id"] for stage in ALL}
    assert {stage: tags.get(f"run.{stage}") for stage in ALL} == runs  # the lineage leads back to every stage's run
    assert version.run_id == runs["register"] and tags["posttrain.source"] == "quantize"
    assert tags["git.commit"] == built["commit"] and tags["gate.alias"] == "champion"
    evaluation = json.loads((project / "data" / "metrics" / "evaluate.json").read_text())["quantize"]
    assert float(tags["metric.test/guarded_accuracy"]) == evaluation["test/guarded_accuracy"]
    assert re.fullmatch(r"[0-9a-f]{64}", tags["dvc.lock.sha256"])  # the lock as register started (all but itself)
    listed = sh(sys.executable, "-m", "pipeline.registry", cwd=project, env={**subprocess_env(),
                "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"}).stdout
    assert re.search(r"posttrain  v1  champion  quantize  test/guarded_accuracy [0-9.]+  no champion yet", listed), listed


def test_a_stricter_gate_registers_a_challenger_once_with_its_reason(project):
    set_param(project, "register.min_delta", 0.02)
    assert ran(sh("dvc", "repro", cwd=project).stdout) == {"register"}  # the gate alone re-decides
    metrics = json.loads((project / "data" / "metrics" / "register.json").read_text())
    assert metrics["version"] == 2 and metrics["gate/alias"] == "challenger" and metrics["gate/delta"] == 0
    assert "paired difference +0 [+0, +0] on 60 prompts: needs 0.02 above" in metrics["gate/reason"]  # the same answers
    assert ran(sh("dvc", "repro", cwd=project).stdout) == set()  # nothing changed: nothing new registered
    client = store_of(project)
    assert len(client.search_model_versions("name='posttrain'")) == 2
    assert client.get_registered_model("posttrain").aliases == {"champion": 1, "challenger": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_mlflow_serves_the_champion_answering_as_the_model_does_in_process(built):
    """``mlflow models serve -m models:/posttrain@champion`` on a loopback port: the answers are the quantized
    model's own greedy answers behind the guard, computed here without MLflow; bad requests get a 400 with the
    reason, and the server keeps serving."""
    from pipeline import suite
    from pipeline.adapters import load_trained
    from pipeline.classification import Guard
    from pipeline.generation import generate
    from pipeline.models import load_tokenizer
    from pipeline.serving import chat_prompt

    project = built["project"]
    rows = [json.loads(line) for line in (project / "data" / "prepare" / "test.jsonl").read_text().splitlines()]
    harmful = next(r for r in rows if r["meta"].get("harmful"))
    prompts = [rows[0]["messages"][-2]["content"], rows[1]["messages"][-2]["content"], harmful["messages"][-2]["content"]]
    folder = project / "data" / "quantize"
    tokenizer, model = load_tokenizer(folder), load_trained(folder)
    flagged = Guard(project / "data" / "classify").flags(prompts)
    outs, _ = generate(model, tokenizer, [chat_prompt(tokenizer, p) for p in prompts], 80, batch_size=8)
    expected = [suite.REFUSAL if flag else out.text for flag, out in zip(flagged, outs, strict=True)]

    port = free_port()
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/posttrain@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, server.communicate(timeout=10)[0][-3000:]
            time.sleep(1)
        status, body = post(port, json.dumps({"inputs": {"prompt": prompts}}).encode())
        assert status == 200 and body["predictions"] == expected, body
        status, body = post(port, json.dumps({"dataframe_records": [{"prompt": prompts[0]}],
                                              "params": {"max_new_tokens": 3}}).encode())
        assert status == 200 and len(tokenizer(body["predictions"][0], add_special_tokens=False)["input_ids"]) <= 3
        for bad, reason in ((b'{"inputs": {"text": ["hi"]}}', "prompt"), (b"not json", "json"),
                            (b'{"inputs": {"prompt": [" "]}}', "prompt 0 is empty"),
                            (json.dumps({"inputs": {"prompt": ["x" * 5000]}}).encode(), "exceeds the model's context")):
            status, body = post(port, bad)
            assert status == 400 and reason in body.get("message", "").lower() + body.get("message", ""), (bad, body)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
            assert response.status == 200  # still serving
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

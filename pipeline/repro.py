"""``dvc repro`` inside one MLflow parent run that ends up carrying ``dvc.lock``.

    python -m pipeline.repro [dvc repro arguments]     # what `make pipeline` runs

Every stage of a plain ``dvc repro`` already becomes a child of one parent run (found through the
launching ``dvc`` process, see :mod:`pipeline.parents`); each stage attaches the ``dvc.lock`` it started
from. Only a wrapper sees the lock DVC writes after the last stage, so this one opens the parent run,
passes it to the stages (``POSTTRAIN_PARENT_RUN_ID``), runs ``dvc repro`` with the given arguments,
then attaches the final ``dvc.lock`` and ``dvc metrics show --json`` and closes the parent FINISHED or
FAILED with DVC's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pipeline  # noqa: F401  (telemetry off)
from pipeline.parents import OWNER_TAG, PARENT_ENV, mark_dead_runs, process_identity
from pipeline.runs import git_state, log_dvc_lock, tracking_uri

# A watchdog for the child's process group: when the wrapper is gone (even killed by SIGKILL, which runs no code
# of ours), it interrupts the group as Ctrl-C would, then terminates and kills what is left.
WATCHDOG = """
import os, signal, sys, time
group, parent = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    for _ in range(grace * 2):
        time.sleep(0.5)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            sys.exit(0)
"""


def run_stopping_with_me(cmd: list[str], env: dict) -> int:
    """Run ``cmd`` in its own process group and wait for it; if this process dies first, the group (dvc and the
    stage it runs) gets SIGINT, as from Ctrl-C, so dvc releases its repo lock (SIGTERM would leave every later
    dvc command "busy") and the stage stops, instead of both running on as orphans. Ctrl-C here is forwarded."""
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(child.pid), str(os.getpid())],
                                start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches only our session's group: pass it on, then wait
                os.killpg(child.pid, signal.SIGINT)
    finally:
        watchdog.kill()
        watchdog.wait()


def restore_records(client, data_dir: str = "data") -> None:
    """Put back the ``run.json`` of every stage output that DVC checked out from its cache (it does not hash or
    cache them), so each output folder says which run made it."""
    import yaml

    from pipeline.lineage import output_run
    from pipeline.outputs import RUN_JSON

    stages = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {}) if Path("dvc.yaml").exists() else {}
    for name in stages:
        if (Path(data_dir) / name).is_dir() and not (Path(data_dir) / name / RUN_JSON).exists():
            output_run(client, name, data_dir)


def main() -> None:
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("params.yaml") if os.path.exists("params.yaml") else OmegaConf.create(
        {"logger": {"tracking_uri": None, "experiment": "posttrain", "artifact_root": "mlruns/artifacts"}})
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    from pipeline.runs import find_experiment

    commit, dirty = git_state()
    experiment = find_experiment(client, cfg)
    mark_dead_runs(client, experiment, by="python -m pipeline.repro starting")
    parent = client.create_run(experiment, run_name="dvc-repro", tags={
        "posttrain.kind": "pipeline", "mlflow.source.git.commit": commit, "git.dirty": str(dirty),
        OWNER_TAG: process_identity(), "posttrain.command": " ".join(["dvc", "repro", *sys.argv[1:]])}).info.run_id
    env = {**os.environ, PARENT_ENV: parent}
    code = run_stopping_with_me(["dvc", "repro", *sys.argv[1:]], env)
    restore_records(client)
    log_dvc_lock(client, parent)
    metrics = subprocess.run(["dvc", "metrics", "show", "--json"], capture_output=True, text=True)
    if metrics.returncode == 0 and metrics.stdout.strip():
        client.log_text(parent, metrics.stdout, "dvc_metrics.json")
    client.set_terminated(parent, status="FINISHED" if code == 0 else "FAILED")
    print(f"MLflow parent run {parent} ({'FINISHED' if code == 0 else 'FAILED'}): "
          f"python -m pipeline.lineage evaluate  |  posttrain ui (the runs table of {tracking_uri(cfg)})")
    sys.exit(code)


if __name__ == "__main__":
    main()

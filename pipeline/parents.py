"""Parent runs: every stage of one pipeline execution or sweep goes under one MLflow parent run.

Stages run as separate processes, so the parent is found by an *execution key*:

1. ``POSTTRAIN_PARENT_RUN_ID`` in the environment: that run (set by the sweep callback,
   :mod:`pipeline.sweep`, or a wrapper, :mod:`pipeline.repro`, which also closes it);
2. ``POSTTRAIN_EXECUTION``: any string a wrapper sets for all stages of one execution;
3. otherwise the ``dvc`` process that launched this stage (pid and start time), so every stage of one
   ``dvc repro`` shares one parent;
4. none of these (a stage run by hand): the stage's run is top level.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PARENT_ENV = "POSTTRAIN_PARENT_RUN_ID"
EXECUTION_ENV = "POSTTRAIN_EXECUTION"
EXECUTION_TAG = "posttrain.execution"


def dvc_execution_key() -> str | None:
    """Identify the ``dvc`` process above this one (Linux /proc), or None."""
    pid = os.getppid()
    for _ in range(8):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        argv = [Path(a.decode(errors="replace")).name for a in cmdline[:2]]
        fields = stat[stat.rindex(")") + 2:].split()
        if "dvc" in argv:
            return f"dvc:{socket.gethostname()}:{pid}:{fields[19]}"
        pid = int(fields[1])
        if pid <= 1:
            return None
    return None


def parent_run(client, experiment_id: str) -> str | None:
    """Find or create the parent run of this execution (see the module docstring)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = os.environ.get(EXECUTION_ENV) or dvc_execution_key()
    if key is None:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    from pipeline.runs import git_state

    commit, dirty = git_state()
    name = "dvc-repro" if key.startswith("dvc:") else "pipeline"
    run = client.create_run(experiment_id, run_name=name, tags={
        EXECUTION_TAG: key, "mlflow.source.git.commit": commit, "git.dirty": str(dirty), "posttrain.kind": "pipeline",
    })
    return run.info.run_id

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

OWNER_TAG = "posttrain.owner"  # host:pid:start time of the process whose death means the run is dead
PARENT_ENV = "POSTTRAIN_PARENT_RUN_ID"
EXECUTION_ENV = "POSTTRAIN_EXECUTION"
EXECUTION_TAG = "posttrain.execution"


def process_identity(pid: int | None = None) -> str | None:
    """``host:pid:start`` of a live process (its start time from /proc tells a reused pid apart), or None
    when there is no such process (Linux)."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return f"{socket.gethostname()}:{pid}:{fields[19]}"


def owner_alive(owner: str) -> bool:
    """Whether the process an ``OWNER_TAG`` names still runs (a process of another host counts as alive:
    this host cannot tell)."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return process_identity(int(pid)) == owner


def mark_dead_runs(client, experiment_id: str, by: str) -> list[str]:
    """Runs left RUNNING by processes that died (SIGKILL, OOM, a pulled plug): marked KILLED, with a tag saying
    who found them. Returns their ids."""
    found = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    dead = []
    for run in found:
        owner = run.data.tags.get(OWNER_TAG)
        if owner and not owner_alive(owner):
            client.set_tag(run.info.run_id, "posttrain.ended", f"its process ({owner}) died; marked KILLED by {by}")
            client.set_terminated(run.info.run_id, status="KILLED")
            dead.append(run.info.run_id)
    return dead


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
    owner = {}
    if key.startswith("dvc:"):  # the dvc process owns the parent: when it dies, so has the execution
        owner = {OWNER_TAG: key.removeprefix("dvc:")}
    run = client.create_run(experiment_id, run_name=name, tags={
        **owner, EXECUTION_TAG: key, "mlflow.source.git.commit": commit, "git.dirty": str(dirty), "posttrain.kind": "pipeline",
    })
    return run.info.run_id

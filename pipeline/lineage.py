"""The lineage view: ``python -m pipeline.lineage <run id | stage>`` prints the chain of upstream runs of a
stage's current output (or any run), with their data digests, git commits and configs, read back from the
MLflow store that :mod:`pipeline.runs` writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.outputs import digest
from pipeline.runs import producer_record, tracking_uri


def output_run(client, stage: str, data_dir: str | Path = "data") -> dict | None:
    """The record of the run that wrote ``<data_dir>/<stage>`` as it is now (:func:`pipeline.runs.producer_record`,
    which also puts a missing ``run.json`` back), or None when the folder is absent or no run is known for it."""
    folder = Path(data_dir) / stage
    return producer_record(folder, digest(folder), client) if folder.is_dir() else None


def resolve_run_id(client, what: str, data_dir: str | Path = "data", experiment: str = "posttrain") -> str:
    """A run id from a run id or a stage name: the run that produced the stage's current output, else that
    stage's latest run in the store."""
    record = output_run(client, what, data_dir) if "/" not in what else None
    if record:
        return record["run_id"]
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        stage_runs = f"tags.`posttrain.stage` = '{what}' and tags.`posttrain.kind` = 'stage'"
        found = client.search_runs([exp.experiment_id], filter_string=stage_runs,
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    try:
        return client.get_run(what).info.run_id
    except Exception:
        raise ValueError(f"{what!r} is neither a run id in the store nor a stage with a run") from None


def upstream_chain(client, run_id: str, depth: int = 0, seen: set[str] | None = None) -> list[dict]:
    """The run and, depth first, every run upstream of it: one dict per run with its stage, status, git
    commit, input digests, upstream run ids and its own stage's config."""
    seen = set() if seen is None else seen
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    stage = tags.get("posttrain.stage", "?")
    node = {
        "depth": depth, "run_id": run_id, "stage": stage, "status": run.info.status,
        "git_commit": tags.get("mlflow.source.git.commit", "?"), "git_dirty": tags.get("git.dirty", "?"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "inputs": {k[len("input."):-len(".digest")]: v for k, v in tags.items() if k.startswith("input.") and k.endswith(".digest")},
        "upstream": {k[len("upstream."):-len(".run_id")]: v for k, v in tags.items() if k.startswith("upstream.")},
        "config": {k: v for k, v in sorted(params.items()) if k.split(".")[0] in (stage, "seed")},
    }
    out = [node]
    if run_id in seen:  # a DAG, not a tree: a run reached twice is shown in full once
        node["repeat"] = True
        return out
    seen.add(run_id)
    for name, upstream_id in sorted(node["upstream"].items()):
        try:
            out += upstream_chain(client, upstream_id, depth + 1, seen)
        except Exception:  # an upstream run from another store: show the id only
            out.append({"depth": depth + 1, "run_id": upstream_id, "stage": name, "missing": True})
    return out


def format_chain(chain: list[dict], show_config: bool = True) -> str:
    lines = []
    for node in chain:
        pad = "  " * node["depth"] + ("└─ " if node["depth"] else "")
        if node.get("missing"):
            lines.append(f"{pad}{node['stage']}  run {node['run_id']}  (not in this store)")
            continue
        if node.get("repeat"):
            lines.append(f"{pad}{node['stage']}  run {node['run_id']}  (above)")
            continue
        dirty = " (dirty)" if node["git_dirty"] == "True" else ""
        lines.append(f"{pad}{node['stage']}  run {node['run_id']}  {node['status']}  git {node['git_commit'][:10]}{dirty}")
        inner = "  " * node["depth"] + ("   " if node["depth"] else "") + "   "
        for name, value in node["inputs"].items():
            lines.append(f"{inner}input {name}: sha256 {value[:16]}  from run {node['upstream'].get(name, '-')}")
        if show_config and node["config"]:
            lines.append(f"{inner}config: " + ", ".join(f"{k}={v}" for k, v in node["config"].items()))
    return "\n".join(lines)


def main() -> None:
    """``python -m pipeline.lineage <run id | stage> [--store URI] [--no-config]``: print the chain of
    upstream runs with their data digests, git commits and configs."""
    import argparse

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("run", help="an MLflow run id, or a stage name (the run behind data/<stage>/run.json)")
    parser.add_argument("--store", help="tracking URI (default: as the stages resolve it)")
    parser.add_argument("--data", default="data", help="the stages' output root")
    parser.add_argument("--no-config", action="store_true", help="omit each run's stage config")
    args = parser.parse_args()
    uri = args.store or tracking_uri(OmegaConf.create({"logger": {"tracking_uri": None}}))
    client = MlflowClient(tracking_uri=uri)
    try:
        run_id = resolve_run_id(client, args.run, args.data)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(format_chain(upstream_chain(client, run_id), show_config=not args.no_config))


if __name__ == "__main__":
    main()

"""The MLflow model registry side of the chain: package a model folder as a servable pyfunc, register it as a new
version, and the promotion gate that decides whether the version becomes the ``champion``.

The gate (:func:`gate`) is a pure function of the candidate's evaluation metrics and the current champion's (read
back from the champion version's ``metric.*`` tags, so a champion from any earlier run, experiment or machine
sharing the store is compared on the same names). :func:`register_version` does the MLflow calls: the packaged
folder becomes an artifact of the stage's run, the version's source, with its lineage and metrics as tags;
:func:`set_alias` moves ``champion`` or ``challenger`` to it.

    python -m pipeline.registry [name]   # every version of the registered model: aliases, source, metric, verdict
"""

from __future__ import annotations

import operator
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
# A hard check of register.require: "<op> <number>".
REQUIREMENT = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?\d+(\.\d*)?([eE]-?\d+)?)\s*$")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
METRIC_TAG = "metric."  # version tags holding the evaluation metrics the gate compares


class RequirementError(ValueError):
    """A ``register.require`` entry that is not ``"<op> <number>"``."""


def parse_requirement(key: str, text) -> tuple[str, float]:
    """(operator, threshold) of one ``register.require`` entry, e.g. ``">= 0.9"``."""
    found = REQUIREMENT.match(str(text))
    if not found:
        raise RequirementError(f"config key 'register.require.{key}' = {text!r} must be '<op> <number>' with op one of "
                               f"{', '.join(OPS)} (e.g. '>= 0.9')")
    return found.group(1), float(found.group(2))


@dataclass
class Decision:
    """The gate's verdict on a candidate: its alias, and why."""

    promoted: bool
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    failed: list[str] = field(default_factory=list)  # the hard checks it did not pass
    reason: str = ""

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER

    @property
    def delta(self) -> float | None:
        return None if self.champion_value is None else round(self.value - self.champion_value, 6)


def gate(candidate: dict, champion: tuple[str, dict] | None, metric: str, min_delta: float, higher_is_better: bool,
         require: dict) -> Decision:
    """Whether ``candidate`` (metric name -> value) becomes the champion: every hard check of ``require`` (metric ->
    ``"<op> <number>"``) passes, and there is no champion yet or ``metric`` improves on the champion's
    (``champion``: (version, its metrics)) by at least ``min_delta`` in the better direction."""
    if metric not in candidate:
        raise KeyError(metric)
    value = float(candidate[metric])
    failed = []
    for key, text in require.items():
        op, threshold = parse_requirement(key, text)
        if key not in candidate:
            failed.append(f"{key} missing")
        elif not OPS[op](float(candidate[key]), threshold):
            failed.append(f"{key} = {candidate[key]:g}, needs {op} {threshold:g}")
    decision = Decision(promoted=False, metric=metric, value=value, failed=failed)
    if champion is not None:
        decision.champion_version = champion[0]
        if metric in champion[1]:
            decision.champion_value = float(champion[1][metric])
    if failed:
        decision.reason = "failed hard checks: " + "; ".join(failed)
        return decision
    if decision.champion_value is None:
        decision.promoted = True
        decision.reason = ("no champion yet" if champion is None else
                           f"champion v{champion[0]} has no {metric}") + f"; {metric} = {value:g}"
        return decision
    gain = decision.delta if higher_is_better else -decision.delta
    direction = "above" if higher_is_better else "below"
    if gain >= min_delta:
        decision.promoted = True
        decision.reason = (f"{metric} = {value:g} is {abs(decision.delta):g} {direction} champion "
                           f"v{champion[0]}'s {decision.champion_value:g} (min_delta {min_delta:g})")
    else:
        decision.reason = (f"{metric} = {value:g} against champion v{champion[0]}'s {decision.champion_value:g}: "
                           f"needs {min_delta:g} {direction}, got {gain:+g}")
    return decision


def package(dest: Path, model_dir: Path, guard_dir: Path | None, max_new_tokens: int, requirements: list[str]) -> Path:
    """``dest``: an MLflow pyfunc model folder (models from code, :mod:`pipeline.serving`) holding ``model_dir``
    and, when given, the guard's folder, with the ``pipeline`` package as its code (so the served model runs the
    code it was registered with), an input/output signature and ``requirements`` pinned (not inferred: inference
    loads the model in a subprocess)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipeline import serving

    artifacts = {serving.MODEL: str(model_dir)}
    if guard_dir is not None:
        artifacts[serving.GUARD] = str(guard_dir)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]))
    with warnings.catch_warnings():  # advice for other designs: type-hinted predict, an input example to run at save
        warnings.filterwarnings("ignore", message=".*(type hints|input example).*")
        mlflow.pyfunc.save_model(str(dest), python_model=serving.__file__, artifacts=artifacts, signature=signature,
                                 code_paths=[str(Path(serving.__file__).parent)], pip_requirements=requirements,
                                 model_config={"max_new_tokens": max_new_tokens})
    return dest


def champion_of(client, name: str) -> tuple[str, dict] | None:
    """(version, its ``metric.*`` tags as numbers) of ``name``'s champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model or no such alias
        return None
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith(METRIC_TAG):
            try:
                metrics[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                continue
    return str(version.version), metrics


def register_version(client, name: str, run_id: str, folder: Path, tags: dict, description: str):
    """Log the packaged ``folder`` as the run's ``model`` artifact and register it as a new version of ``name``
    (created on first use) with ``tags``; return the version."""
    from mlflow.exceptions import MlflowException

    client.log_artifacts(run_id, str(folder), "model")
    try:
        client.create_registered_model(name, description="posttrain's chain product: the model `register` logs "
                                                         "after evaluate, served by `mlflow models serve`")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    return client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                       description=description)


def set_alias(client, name: str, version: str, decision: Decision) -> None:
    """Point ``decision.alias`` at ``version`` and record the verdict on it."""
    client.set_registered_model_alias(name, decision.alias, version)
    client.set_model_version_tag(name, version, "gate.alias", decision.alias)
    client.set_model_version_tag(name, version, "gate.metric", decision.metric)
    client.set_model_version_tag(name, version, "gate.reason", decision.reason)


def describe(client, name: str) -> str:
    """One line per version of ``name``, newest first: version, aliases, source, the gated metric, the verdict and
    the run that registered it."""
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
    if not versions:
        return f"{name}: no versions"
    by_version: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():  # search results leave aliases out
        by_version.setdefault(str(number), []).append(alias)
    lines = []
    for v in versions:
        tags = v.tags
        aliases = ",".join(sorted(by_version.get(str(v.version), []))) or "-"
        metric = tags.get("gate.metric", "")
        value = tags.get(f"{METRIC_TAG}{metric}", "?") if metric else "?"
        lines.append(f"{name}  v{v.version}  {aliases}  {tags.get('posttrain.source', '?')}  {metric} {value}  "
                     f"{tags.get('gate.reason', '')}  (run {v.run_id})")
    return "\n".join(lines)


def main() -> None:
    """``python -m pipeline.registry [name]``: the versions of ``name`` (default ``posttrain``) in the store the
    stages log to (``$MLFLOW_TRACKING_URI``, else ``mlruns/mlflow.db`` here)."""
    import os

    from mlflow import MlflowClient

    import pipeline  # noqa: F401  (telemetry off)

    name = sys.argv[1] if len(sys.argv) > 1 else "posttrain"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns/mlflow.db').resolve()}"
    print(describe(MlflowClient(tracking_uri=uri), name))


if __name__ == "__main__":
    main()

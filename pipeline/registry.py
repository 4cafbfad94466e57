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
from dataclasses import dataclass, field
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
# A hard check of register.require: "<op> <number>".
REQUIREMENT = re.compile(r"^\s*(>=|<=|>|<|==)\s*(-?\d+(\.\d*)?([eE]-?\d+)?)\s*$")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
METRIC_TAG = "metric."  # version tags holding the evaluation metrics the gate compares
OUTCOMES = "gate/outcomes.json"  # run artifact: prompt id -> the version's outcome on the gated metric


class RequirementError(ValueError):
    """A ``register.require`` entry that is not ``"<op> <number>"``."""


def parse_requirement(key: str, text) -> tuple[str, float]:
    """(operator, threshold) of one ``register.require`` entry, e.g. ``">= 0.9"``."""
    found = REQUIREMENT.match(str(text))
    if not found:
        raise RequirementError(f"config key 'register.require.{key}' = {text!r} must be '<op> <number>' with op one of "
                               f"{', '.join(OPS)} (e.g. '>= 0.9')")
    return found.group(1), float(found.group(2))


@dataclass(frozen=True)
class Champion:
    """The version holding the ``champion`` alias: its number, the run that registered it, its evaluation metrics
    (its ``metric.*`` tags) and its per-prompt outcomes (its run's :data:`OUTCOMES` artifact; None without one)."""

    version: str
    run_id: str
    metrics: dict
    outcomes: dict | None = None


@dataclass
class Decision:
    """The gate's verdict on a candidate: its alias, and why."""

    promoted: bool
    metric: str
    value: float
    champion_version: str | None = None
    champion_value: float | None = None
    failed: list[str] = field(default_factory=list)  # the hard checks it did not pass
    paired: tuple[float, float, float, int] | None = None  # (difference, 95% low, high, prompts) against the champion
    reason: str = ""

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER

    @property
    def delta(self) -> float | None:
        return None if self.champion_value is None else round(self.value - self.champion_value, 6)


def _guarded_outcome(record: dict) -> float:
    """A record's outcome behind the guard, by the rule evaluate's guarded metrics use."""
    from pipeline.classification import guarded_correct  # torch and lightning: loaded only when a gate pairs outcomes

    return guarded_correct(record["correct"], record["harmful"], record.get("guard_flagged", False))


# Metrics whose per-prompt outcome evaluate's generations.jsonl holds, so two versions compare prompt by prompt:
# metric -> the outcome of one record.
PER_PROMPT = {
    "test/accuracy": lambda r: float(r["correct"]),
    "test/guarded_accuracy": _guarded_outcome,
}


def outcomes(generations: list[dict], variant: str, metric: str) -> dict[str, float] | None:
    """Prompt id -> ``variant``'s outcome on ``metric`` from evaluate's records, or None for a metric that has no
    per-prompt outcome (:data:`PER_PROMPT`) or a variant without records."""
    score = PER_PROMPT.get(metric)
    rows = [r for r in generations if r.get("variant") == variant]
    if score is None or not rows or (metric.startswith("test/guarded_") and "guard_flagged" not in rows[0]):
        return None
    return {str(r["id"]): score(r) for r in rows}


def gate(candidate: dict, champion: Champion | None, metric: str, min_delta: float, higher_is_better: bool,
         require: dict, mine: dict[str, float] | None = None, paired: bool = True) -> Decision:
    """Whether ``candidate`` (metric name -> value) becomes the champion: every hard check of ``require`` (metric ->
    ``"<op> <number>"``) passes, and there is no champion yet or ``metric`` improves on the champion's by at least
    ``min_delta`` in the better direction. With ``paired`` and per-prompt outcomes on both sides (``mine`` and
    ``champion.outcomes``), the improvement is the mean paired difference over the prompts both answered, and its
    95% bootstrap interval must also exclude zero: a gain the test set cannot tell from noise keeps the champion."""
    from pipeline.stats import paired_difference

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
        decision.champion_version = champion.version
        if metric in champion.metrics:
            decision.champion_value = float(champion.metrics[metric])
    if failed:
        decision.reason = "failed hard checks: " + "; ".join(failed)
        return decision
    if decision.champion_value is None:
        decision.promoted = True
        decision.reason = ("no champion yet" if champion is None else
                           f"champion v{champion.version} has no {metric}") + f"; {metric} = {value:g}"
        return decision
    sign = 1.0 if higher_is_better else -1.0
    direction = "above" if higher_is_better else "below"
    against = f"champion v{champion.version}'s {decision.champion_value:g}"
    shared = sorted(set(mine or {}) & set(champion.outcomes or {}))
    if paired and shared:
        diff, low, high = paired_difference([mine[i] for i in shared], [champion.outcomes[i] for i in shared])
        decision.paired = (round(diff, 6), round(low, 6), round(high, 6), len(shared))
        gain, surely = sign * diff, (low > 0 if higher_is_better else high < 0)
        measured = (f"{metric} = {value:g} against {against}: paired difference {diff:+.4g} [{low:+.4g}, {high:+.4g}] "
                    f"on {len(shared)} prompts")
        decision.promoted = gain >= min_delta and surely
        decision.reason = measured + (f", {direction} by at least {min_delta:g} with its 95% interval excluding 0"
                                      if decision.promoted else
                                      f": needs {min_delta:g} {direction}" if gain < min_delta else
                                      ": its 95% interval includes 0 (not a measurable improvement)")
        return decision
    by_value = "" if not paired else f" (by value: no per-prompt outcomes of {metric} on both sides)"
    gain = sign * decision.delta
    if gain >= min_delta:
        decision.promoted = True
        decision.reason = (f"{metric} = {value:g} is {abs(decision.delta):g} {direction} {against} "
                           f"(min_delta {min_delta:g}){by_value}")
    else:
        decision.reason = f"{metric} = {value:g} against {against}: needs {min_delta:g} {direction}, got {gain:+g}{by_value}"
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
    mlflow.pyfunc.save_model(str(dest), python_model=serving.__file__, artifacts=artifacts, signature=signature,
                             code_paths=[str(Path(serving.__file__).parent)], pip_requirements=requirements,
                             model_config={"max_new_tokens": max_new_tokens})
    return dest


def champion_of(client, name: str) -> Champion | None:
    """``name``'s champion: its version, run, ``metric.*`` tags as numbers and per-prompt outcomes; None without one."""
    import json
    import tempfile

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
    found = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            found = json.loads(Path(client.download_artifacts(version.run_id, OUTCOMES, tmp)).read_text())
        except (MlflowException, OSError, ValueError):  # a champion registered without them
            found = None
    return Champion(str(version.version), version.run_id, metrics, found)


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
    """``python -m pipeline.registry [name] [--store URI]``: the versions of ``name`` (default ``posttrain``) in the
    store the stages log to."""
    import argparse

    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401  (telemetry off)
    from pipeline.runs import tracking_uri

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="posttrain", help="the registered model (register.name)")
    parser.add_argument("--store", help="tracking URI (default: as the stages resolve it)")
    args = parser.parse_args()
    uri = args.store or tracking_uri(OmegaConf.create({"logger": {"tracking_uri": None}}))
    print(describe(MlflowClient(tracking_uri=uri), args.name))


if __name__ == "__main__":
    main()

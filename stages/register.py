"""register: the chain's product in MLflow's model registry, promoted to ``champion`` only through a gate.

Its own DVC stage after ``evaluate`` (not the end of evaluate): it depends on the evaluation's metrics and the
chosen model folder only, so changing the gate (``register.*``) re-decides without re-evaluating, and ``dvc repro``
with nothing changed skips it and registers nothing new.

1. ``register.source``'s model folder (``quantize`` by default; any stage ``evaluate`` measured as a chat variant),
   with ``classify``'s guard in front when ``register.guard`` (what ``evaluate`` measured as ``test/guarded_*``),
   is packaged as an MLflow pyfunc (:mod:`pipeline.serving`: chat template, greedy, stops at the end of turn; the
   guard's flagged requests get the refusal) and logged as the ``model`` artifact of this stage's run;
2. it is registered as a new version of ``register.name`` in the run's store (the same SQLite file by default;
   ``logger.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` for a server), tagged with its lineage: every upstream
   stage's run id (``run.<stage>``, walked back through the runs' upstream tags), the git commit, the digest of
   ``dvc.lock``, the source, and the source variant's evaluation metrics (``metric.<name>``);
3. the gate (:func:`pipeline.registry.gate`): the version becomes ``champion`` when every ``register.require``
   check holds and ``register.metric`` beats the current champion's by ``register.min_delta`` (or there is no
   champion); with ``register.paired`` the gain is measured prompt by prompt against the champion's own answers
   (evaluate's ``generations.jsonl``; the outcomes are an artifact of each register run) and its 95% interval must
   exclude zero; otherwise ``challenger``. The verdict and its reason are tags of the version and the run, and the
   stage's metrics.

Inputs: ``data/<register.source>``, ``data/evaluate`` (lineage, per-prompt outcomes), ``data/metrics/evaluate.json``,
``data/classify`` (with ``register.guard``); ``register.*``, ``seed``.
Outputs: ``data/register/registration.json`` (name, version, alias, reason, model URI, run id),
``data/metrics/register.json`` (``gate/*``).
Serve: ``mlflow models serve -m models:/posttrain@champion --env-manager local -h 127.0.0.1 -p 5001`` (README).
Run: ``python -m pipeline.run stage=register [register.min_delta=0.01]``
"""

from __future__ import annotations

import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from pipeline import registry
from pipeline.chat import json_objects
from pipeline.outputs import file_digest, read_json, write_json
from pipeline.schema import ConfigError
from pipeline.stage import Context, Input, Stage

log = logging.getLogger(__name__)

# The contract: inputs, the config keys read beyond this stage's group (pipeline.stage).
STAGE = Stage(
    name="register",
    inputs=(Input("source", "${register.source}", note="the model registered"),
            Input("evaluate", "evaluate", note="lineage (every upstream run) and the per-prompt outcomes the gate pairs"),
            Input("evaluation", "${paths.metrics}/evaluate.json", in_data=False,
                  note="the source variant's metrics, which the gate reads"),
            Input("classify", "classify", conditional=True, note="the guard served in front (register.guard)")),
)

# Packages the served model needs, pinned to this environment's versions (MLflow would otherwise infer them by
# loading the model in a subprocess).
SERVED_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "peft", "torchao", "lightning", "omegaconf",
                   "mlflow")


def check(cfg: DictConfig) -> None:
    """Refuse malformed hard checks and a gate that reads guarded metrics without the guard."""
    c = cfg.register
    for key, text in c.require.items():
        try:
            registry.parse_requirement(key, text)
        except registry.RequirementError as err:
            raise ConfigError(str(err)) from None
    if not c.guard:
        guarded = [k for k in (c.metric, *c.require) if "guarded_" in k]
        if guarded:
            raise ConfigError(f"config key 'register.guard' is false, but the gate reads {guarded[0]!r}, a metric of "
                              "the variant behind the guard: set register.guard=true or gate on unguarded metrics")


def requirements() -> list[str]:
    pins = []
    for name in SERVED_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def lineage(client, run_id: str) -> dict[str, str]:
    """``run.<stage>`` -> run id of every run upstream of ``run_id`` (:func:`pipeline.lineage.upstream_chain`)."""
    from pipeline.lineage import upstream_chain

    return {f"run.{node['stage']}": node["run_id"] for node in upstream_chain(client, run_id)[1:]
            if not node.get("missing")}


def run(ctx: Context) -> dict:
    """Package, register, gate (see the module docstring)."""
    c, mlrun = ctx.config, ctx.run
    evaluation = read_json(ctx.input("evaluation"))
    if c.source not in evaluation:
        raise ConfigError(f"config key 'register.source' = {c.source!r} has no metrics in {ctx.input('evaluation')}: "
                          f"add it to evaluate.variants (measured: {', '.join(sorted(evaluation))})")
    measured = {k: v for k, v in evaluation[c.source].items() if isinstance(v, (int, float))}
    if c.metric not in measured:
        raise ConfigError(f"config key 'register.metric' = {c.metric!r} is not a metric of variant {c.source!r} in "
                          f"{ctx.input('evaluation')}")
    guard_dir = None
    if c.guard:
        guard_dir = ctx.input("classify")
        if not (guard_dir / "guard.json").exists():
            raise ConfigError(f"config key 'register.guard' is true, but {guard_dir} holds no guard: run the classify "
                              "stage, or set register.guard=false")
        ctx.digests["classify"] = mlrun.add_input("classify", guard_dir)["digest"]
    client = mlrun.client
    generations = ctx.input("evaluate") / "generations.jsonl"
    records = [row for _, row in json_objects(generations, "evaluate's records")] if generations.exists() else []
    mine = registry.outcomes(records, c.source, c.metric)
    champion = registry.champion_of(client, c.name)
    decision = registry.gate(measured, champion, c.metric, c.min_delta, c.higher_is_better, dict(c.require),
                             mine, c.paired)
    if mine is not None:  # what the next version's gate compares against, prompt by prompt
        client.log_text(mlrun.run_id, json.dumps(mine, sort_keys=True), registry.OUTCOMES)
    lock = Path("dvc.lock")  # the lock of the chain being run (a queued experiment runs in its own copy)
    tags = {"posttrain.source": c.source, "posttrain.guard": str(guard_dir is not None),
            "git.commit": mlrun.commit, "git.dirty": str(mlrun.dirty),
            "dvc.lock.sha256": file_digest(lock) if lock.exists() else "absent",
            "run.register": mlrun.run_id, **lineage(client, mlrun.run_id),
            **{f"{registry.METRIC_TAG}{k}": v for k, v in measured.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.package(Path(tmp) / "model", ctx.input("source"), guard_dir, c.max_new_tokens, requirements())
        version = registry.register_version(client, c.name, mlrun.run_id, folder, tags,
                                            f"{c.source} of the chain at git {mlrun.commit[:10]}: {decision.reason}")
    registry.set_alias(client, c.name, version.version, decision)
    mlrun.set_tag("register.model", f"models:/{c.name}/{version.version}")
    mlrun.set_tag("register.alias", decision.alias)
    mlrun.set_tag("register.reason", decision.reason)
    write_json(ctx.output / "registration.json", {
        "name": c.name, "version": int(version.version), "alias": decision.alias, "reason": decision.reason,
        "model_uri": f"models:/{c.name}/{version.version}", "source": c.source, "run_id": mlrun.run_id,
        "champion_before": decision.champion_version, "failed_checks": decision.failed})
    ctx.info.update(name=c.name, version=int(version.version), alias=decision.alias)
    (log.info if decision.promoted else log.warning)("register: %s v%s is %s: %s", c.name, version.version,
                                                      decision.alias, decision.reason)
    out = {"gate/promoted": int(decision.promoted), "gate/value": decision.value, "gate/failed_checks": len(decision.failed),
           "gate/alias": decision.alias, "gate/reason": decision.reason, "version": int(version.version)}
    if decision.paired is not None:
        diff, low, high, n = decision.paired
        out.update({"gate/paired_delta": diff, "gate/paired_ci_low": low, "gate/paired_ci_high": high, "gate/paired_n": n})
    if decision.champion_value is not None:
        out.update({"gate/champion_value": decision.champion_value, "gate/delta": decision.delta,
                    "gate/champion_version": int(decision.champion_version)})
    return out

"""The one entry point of every stage.

    python -m pipeline.run stage=sft [overrides]          # compose conf/ with Hydra and run a stage
    python -m pipeline.run -m stage=base base.lr=1e-3,3e-3  # a Hydra multirun sweep: one MLflow run per job
    python -m pipeline.run --params params.yaml stage=base  # what dvc.yaml runs: the composed snapshot

Both doors hand the same validated DictConfig to the same stage function. The ``--params`` door exists
because DVC applies ``dvc exp run -S`` overrides to ``params.yaml``, not to ``conf/``; it warns, naming
the keys, when ``params.yaml`` has drifted from ``conf/`` outside a DVC experiment.

Exit codes: 0 success, 2 bad configuration or input (the message names the key, file or line),
1 anything unexpected (with a traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import pipeline  # noqa: F401  (telemetry off before anything else loads)
from pipeline.env import set_offline, set_omp_wait_policy
from pipeline.schema import STAGES, ConfigError, validate

log = logging.getLogger("pipeline.run")

def run(cfg: DictConfig):
    """Validate ``cfg`` and run the stage it names; return the stage's metrics.

    The groups of stages added beside the built-in chain (``stages/<name>.py`` and ``conf/<name>/``) are not in
    :class:`pipeline.schema.RootConfig`: their own contract types them when they run."""
    from pipeline import stage

    cfg = validate_with_added_stages(cfg)
    if cfg.stage is None:
        raise ConfigError(f"config key 'stage' needs a value; valid values: {stage.stage_names()}")
    set_offline(cfg.offline)
    set_omp_wait_policy(cfg.trainer.omp_wait_policy)
    chosen = stage.load(cfg.stage)
    return stage.execute(chosen, route_outputs(chosen, cfg))


def own_paths(cfg: DictConfig, folder: str | Path) -> DictConfig:
    """``cfg`` with every output (the stage folder, metrics, plots, timings, checkpoints) under ``folder``;
    inputs still come from ``paths.data``."""
    return OmegaConf.merge(cfg, {"paths": {"out": str(folder), "metrics": f"{folder}/metrics", "plots": f"{folder}/plots",
                                           "timings": f"{folder}/timings", "checkpoints": f"{folder}/checkpoints"}})


def route_outputs(stage, cfg: DictConfig, params: str = "params.yaml") -> DictConfig:
    """Where a run outside DVC writes. The DVC outputs (``paths.data``) hold what ``params.yaml`` says; a run whose
    stage config (the keys its DVC stage depends on) differs from ``params.yaml`` writes into a folder of its own
    under ``.cache/runs/`` instead, so a trial (``stage=reward reward.max_steps=5``) never replaces a DVC output
    with something ``dvc.lock`` does not describe. ``paths.out=data`` asks for the DVC outputs anyway; a run that
    DVC starts, a sweep job (its job folder) or one with no ``params.yaml`` beside it is left alone."""
    if cfg.paths.out or os.environ.get("DVC_ROOT") or not Path(params).is_file():
        return cfg
    from pipeline.runs import flatten

    try:
        snapshot = flatten(validate_with_added_stages(OmegaConf.load(params)))
    except Exception:  # a broken params.yaml: nothing to protect that DVC could trust
        return cfg
    mine = flatten(cfg)
    keys = stage.dvc_params(cfg)
    differing = sorted(k for k in set(mine) | set(snapshot) if any(k == p or k.startswith(f"{p}.") for p in keys)
                       and mine.get(k, "<absent>") != snapshot.get(k, "<absent>"))
    if not differing:
        return cfg
    import time

    folder = Path(".cache") / "runs" / f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log.warning("%s: config differs from %s at %s, so this run writes to %s, not to the DVC outputs "
                "(paths.out=%s writes there anyway)", stage.name, params,
                ", ".join(differing[:5]) + (" ..." if len(differing) > 5 else ""), folder, cfg.paths.data)
    return own_paths(cfg, folder)


def validate_with_added_stages(cfg: DictConfig) -> DictConfig:
    """:func:`pipeline.schema.validate`, leaving the groups of added stages (``stages/<name>.py`` beside the
    built-in chain) to their own contracts, which type them when they run."""
    from pipeline.stage import stage_names

    added = [name for name in stage_names() if name not in STAGES and name in cfg]
    if not added:
        return validate(cfg)
    typed = validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in added]), added)
    return OmegaConf.merge(OmegaConf.to_container(typed), {name: cfg[name] for name in added})


def run_reporting(cfg: DictConfig):
    """:func:`run`, turning expected errors into one clear line and exit code 2."""
    from pipeline.chat import InputError
    from pipeline.models import ModelError

    try:
        return run(cfg)
    except (ConfigError, InputError, ModelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def load_params(path: str, overrides: list[str]) -> DictConfig:
    """Load a composed snapshot and apply ``key=value`` overrides (YAML-typed; unknown keys are errors)."""
    if not Path(path).exists():
        raise ConfigError(f"{path}: not found; write it with `python -m pipeline.compose`")
    import yaml

    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or type(err).__name__}); "
                          "rewrite it with `python -m pipeline.compose`") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: must hold a mapping of config keys; rewrite it with `python -m pipeline.compose`")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key = item.split("=", 1)[0]
        if key != "stage" and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"config key '{key}' does not exist in {path}{nearest_key(cfg, key)}")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    _warn_drift(path, cfg)
    return cfg


_ABSENT = object()


def nearest(name: str, options) -> str | None:
    """The valid option closest to a misspelt ``name`` (difflib's ratio >= 0.6), or None."""
    import difflib

    close = difflib.get_close_matches(name, [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


def nearest_key(cfg: DictConfig, key: str) -> str:
    """"; did you mean 'sft.lr'?" for an unknown ``key`` whose last part is close to a sibling's, else ""."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    close = nearest(leaf, node.keys()) if isinstance(node, DictConfig) else None
    return f"; did you mean '{parent + '.' if parent else ''}{close}'?" if close else ""


def check_overrides(args: list[str], conf: Path) -> None:
    """Name a misspelt group option or config key with the nearest valid one, before Hydra's own message (which
    lists options without a suggestion, or says only "not in struct"). Sweeps (``a,b``), ``+``/``~`` edits and
    ``hydra.*`` overrides are left to Hydra."""
    plain = [a for a in args if "=" in a and not a.startswith(("+", "~", "-", "hydra"))]
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    choices, keys = [], []
    for item in plain:
        key, value = item.split("=", 1)
        group = key.split("@")[0]
        if group in groups:
            options = sorted(f.stem for f in (conf / group).glob("*.yaml"))
            if "," not in value and value not in (*options, "null"):
                close = nearest(value, options)
                raise ConfigError(f"'{value}' is not an option of config group '{group}'"
                                  f"{f'; did you mean {close!r}?' if close else ''} (options: {', '.join(options)})")
            choices.append(item)
        else:
            keys.append(key)
    if not keys:
        return
    from pipeline.compose import compose

    cfg = compose(choices, conf_dir=conf)
    for key in keys:
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"config key '{key}' does not exist{nearest_key(cfg, key)}")


def _warn_drift(path: str, cfg: DictConfig) -> None:
    """Warn, naming keys, when the snapshot differs from ``conf/`` (outside a DVC experiment, whose
    ``-S`` overrides are meant to differ)."""
    if os.environ.get("DVC_EXP_BASELINE_REV") or not (Path(path).parent / "conf").is_dir():
        return
    from pipeline.compose import compose
    from pipeline.runs import flatten

    try:
        fresh = flatten(compose(conf_dir=Path(path).parent / "conf"))
    except Exception:  # a broken conf/ is reported when someone composes it
        return
    mine = {k: v for k, v in flatten(cfg).items() if k != "stage"}
    fresh.pop("stage", None)
    differing = sorted(k for k in set(mine) | set(fresh) if mine.get(k, "<absent>") != fresh.get(k, "<absent>"))
    if differing:
        log.warning("%s differs from conf/ at %s; run `python -m pipeline.compose` if you edited conf/",
                    path, ", ".join(differing[:10]) + (" ..." if len(differing) > 10 else ""))


def sweep_job_paths(cfg: DictConfig) -> DictConfig:
    """In a Hydra multirun, send this job's outputs (its stage folder, metrics, plots, checkpoints) to the
    job's own folder, so sweep jobs never overwrite the DVC outputs or each other; inputs still come from
    ``paths.data``. Single runs are left alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    return own_paths(cfg, HydraConfig.get().runtime.output_dir)


def objective(cfg: DictConfig, metrics) -> float | None:
    """The value a Hydra sweeper optimizes (Optuna): ``metrics[optimized_metric]``, or None without one."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if not isinstance(metrics, dict) or key not in metrics:
        raise ConfigError(f"config key 'optimized_metric' = {key!r} is not a metric of stage {cfg.stage!r}; "
                          f"it reported: {sorted(metrics) if isinstance(metrics, dict) else metrics}")
    return float(metrics[key])


def _hydra_main():
    """Hydra's door. Hydra reports a bad override itself (an unknown key, an unknown group option with the
    valid ones) and exits 1; that is a configuration error, exit 2 like the ``--params`` door's, while an
    unexpected error inside a stage stays 1."""
    import hydra

    composed = False
    # The project's conf/, found from the working directory (the project root), so the installed `posttrain`
    # script and `python -m pipeline.run` read the same configs.
    conf = Path.cwd() / "conf"
    if not (conf / "config.yaml").is_file():
        print(f"error: no conf/config.yaml in {Path.cwd()}: run posttrain from the project root "
              "(the folder holding conf/, params.yaml and dvc.yaml)", file=sys.stderr)
        sys.exit(2)

    try:
        if not completing(sys.argv[1:]):  # `-sc install=bash` is Hydra's, not an override
            check_overrides(sys.argv[1:], conf)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path=str(conf), config_name="config")
    def hydra_entry(cfg: DictConfig):
        nonlocal composed
        composed = True
        metrics = run_reporting(sweep_job_paths(cfg))
        return objective(cfg, metrics)

    try:
        hydra_entry()
    except SystemExit as err:
        if err.code == 1 and not composed:
            sys.exit(2)
        raise


HELP = """\
posttrain: a pretrained causal LM through SFT, preference collection, reward model, DPO/PPO/GRPO, quantization,
distillation, a guard classifier, evaluation and the model registry, each stage a DVC stage configured by Hydra
(conf/) and recorded in MLflow.

usage (from the project root):
  posttrain run stage=<stage> [key=value ...]          one stage, conf/ composed by Hydra (outputs: see README)
  posttrain run -m stage=<stage> key=a,b [...]          a Hydra sweep: one MLflow run per job
  posttrain run --params params.yaml stage=<stage>      what dvc.yaml runs: the composed snapshot
  posttrain run stage=<stage> --cfg job                 print the composed config of a run, without running it
  python -m pipeline.repro                             the whole chain: dvc repro inside one MLflow parent run
  posttrain ui [--port 5000]                           the MLflow UI on 127.0.0.1, opened on the runs table
  python -m pipeline.lineage <stage | run id>          the runs and data behind an output
  python -m pipeline.costs                             wall time, memory and throughput per stage
  python -m pipeline.registry [name]                   the registered model's versions, aliases and gate verdicts

stages: {stages}
config groups (key=option): {groups}
"""


def completing(args: list[str]) -> bool:
    """Whether the command line is Hydra's tab-completion call (``-sc install=bash``, ``-sc query=bash``)."""
    return bool({"-sc", "--shell-completion"} & set(args))


def completion_line_without_run() -> None:
    """Hydra's tab completion reads the command line from ``COMP_LINE`` (``eval "$(posttrain -sc install=bash)"``
    sets it up); in ``posttrain run stage=...`` the ``run`` word is this script's, not an override, so it is
    taken out (and ``COMP_POINT`` moved back) before Hydra parses the line."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split(" ")
    if len(words) > 2 and words[1] == "run":
        os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        point = int(os.environ.get("COMP_POINT", len(line)))
        os.environ["COMP_POINT"] = str(max(len(words[0]), point - len(" run")))


def help_text(root: Path | None = None) -> str:
    """The ``posttrain --help`` text: commands, the stages, and the config groups of ``root``'s conf/."""
    from pipeline.stage import stage_names

    conf = (root or Path.cwd()) / "conf"
    groups = []
    if conf.is_dir():
        for group in sorted(p for p in conf.iterdir() if p.is_dir()):
            options = sorted(f.stem for f in group.glob("*.yaml"))
            groups.append(f"{group.name} [{', '.join(options)}]")
    return HELP.format(stages=" ".join(stage_names()), groups="; ".join(groups) or "(no conf/ here)")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if sys.argv[1:2] in (["--help"], ["-h"], []):
        print(help_text())
        return
    if sys.argv[1:2] == ["ui"]:  # `posttrain ui` = `python -m pipeline.ui`
        from pipeline.ui import main as ui_main

        return ui_main(sys.argv[2:])
    if sys.argv[1:2] == ["run"]:  # `posttrain run ...` = `python -m pipeline.run ...`
        del sys.argv[1]
    if completing(sys.argv[1:]):
        completion_line_without_run()
    if os.environ.get("DVC_ROOT"):  # a stage of `dvc repro`: it stops when dvc is killed, not runs on orphaned
        from pipeline.env import die_with_parent

        die_with_parent()
    args = sys.argv[1:]
    if args[:1] == ["--params"]:
        if len(args) < 2:
            sys.exit("error: --params needs a file (params.yaml)")
        try:
            cfg = load_params(args[1], args[2:])
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        run_reporting(cfg)
    else:
        _hydra_main()


if __name__ == "__main__":
    main()

"""The stage contract: what a stage reads, writes and runs, declared once, beside the stage's code.

Every ``stages/<name>.py`` opens with ``STAGE = Stage(...)``: its name, its inputs (other stages' outputs and
files under ``paths.data``), the config keys it reads beyond its own group and its plots; then come its data,
its module and, last, its ``run(ctx)`` function. Everything else follows from that one declaration:

- :func:`execute` (what ``pipeline.run`` calls) resolves the input paths, records them in the stage's MLflow
  run, seeds the process, hands ``run`` a :class:`Context` whose ``cfg`` holds *only* the declared keys
  (reading any other key fails, naming it: an undeclared read would be a dependency DVC does not see),
  writes the output folder atomically with its ``run.json``, then the metrics JSON;
- :mod:`pipeline.dvcgen` writes ``dvc.yaml`` from the same contracts, with the stage's code dependencies
  computed from its imports, so the DVC graph cannot drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from pipeline import console
from pipeline.schema import STAGES, ConfigError

# Keys every stage reads through the runner: the seed and the process's numerics (seed_everything). They are
# DVC params of every stage.
RUNNER_PARAMS = ("seed", "trainer.num_threads", "trainer.deterministic")
# Keys that say where things go and how they are shown or recorded; they never change a stage's outputs, so
# they are in every stage's view but are not DVC params.
RUNNER_KEYS = ("stage", "offline", "paths", "logger", "trainer.progress_bar", "trainer.log_every_n_steps")


_ABSENT = object()


class ContractError(RuntimeError):
    """A stage read a config key or an input its contract does not declare (a bug in the stage)."""


@dataclass(frozen=True)
class Input:
    """An input of a stage, ``path`` relative to ``paths.data`` (or to the project root with ``in_data=False``);
    ``${key}`` is resolved from the config, as DVC resolves it from ``params.yaml``. ``dataset``: also an MLflow
    dataset of the run. ``conditional``: read only under some config choices, recorded by the stage itself
    when it reads it. A DVC dep is a path, so a conditional input whose path is a config key can name
    :data:`pipeline.schema.UNREAD` under the choices that do not read it (``judge.reads``, ``grpo.reward_input``): a file that
    never changes, so editing what such a choice does not read leaves the stage up to date."""

    name: str
    path: str
    dataset: bool = False
    conditional: bool = False
    note: str = ""  # why, when it is not obvious (a comment in dvc.yaml)
    in_data: bool = True



@dataclass(frozen=True)
class Plot:
    """A plot file the stage writes into its plot folder, with how ``dvc plots`` draws it."""

    file: str
    x: str | None = None
    y: str | None = None
    title: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class Chart:
    """A chart across plot files (dvc.yaml's top-level ``plots``): ``y`` maps a stage's plot file to columns.
    Charts of several stages with the same title are one chart."""

    title: str
    template: str
    x: str
    y: dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One stage's contract. ``params``: config keys read beyond the stage's own group and
    :data:`RUNNER_PARAMS` (a group name means the whole group). ``config``: the schema dataclass of the
    stage's group, for a stage outside :class:`pipeline.schema.RootConfig` (a new stage)."""

    name: str
    run: Callable[["Context"], dict] | None = None  # default: the ``run`` function of the stage's module
    inputs: tuple[Input, ...] = ()
    params: tuple[str, ...] = ()
    plots: tuple[Plot, ...] = ()
    charts: tuple[Chart, ...] = ()
    check: Callable[[DictConfig], None] | None = None  # refuses a bad config before any input is read (default:
                                                       # the module's ``check(cfg)``, if it has one)
    config: type | None = None

    @property
    def module_file(self) -> Path:
        """The file that defines the stage (the root of its code dependencies)."""
        return Path(inspect.getsourcefile(self.run)).resolve()

    def dvc_params(self, cfg: DictConfig) -> list[str]:
        """The DVC params of the stage: the seed, its own group (when it has one), its declared keys, then the
        rest of the runner's."""
        own = [self.name] if self.name in cfg else []
        return list(dict.fromkeys(["seed", *own, *self.params, *RUNNER_PARAMS]))


@dataclass
class Context:
    """What a stage's ``run`` gets: its config view, its MLflow run, resolved inputs and where to write.

    ``output`` is a temporary folder that becomes ``<paths.out or paths.data>/<name>`` only when ``run``
    returns; ``info`` goes into its ``run.json``; ``datasets`` names files inside it to record as MLflow
    datasets once it is in place.
    """

    stage: Stage
    cfg: DictConfig
    run: Any
    output: Path
    plots: Path
    inputs: dict[str, Path]
    digests: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    datasets: list[tuple[str, str]] = field(default_factory=list)
    step: int = 0  # the last optimizer step of a training stage (pipeline.training.fit sets it): the summary's x

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def config(self) -> Any:
        """The stage's own group, typed by its schema dataclass (read-only)."""
        return self.cfg[self.stage.name]

    def input(self, name: str) -> Path:
        """The resolved path of a declared input."""
        if name not in self.inputs:
            declared = [i.name for i in self.stage.inputs]
            raise ContractError(f"stage '{self.name}' read input '{name}', which is not declared or not present; "
                                f"declared: {declared}")
        return self.inputs[name]

    def write_plot(self, file: str, rows: Any) -> Path:
        """Write one declared JSON plot file into the stage's plot folder."""
        from pipeline.outputs import write_json

        if file not in {p.file for p in self.stage.plots}:
            raise ContractError(f"stage '{self.name}' wrote plot '{file}', which its contract does not declare")
        path = self.plots / file
        write_json(path, rows)
        return path


def stage_names() -> list[str]:
    """Every stage: the built-in chain in order, then any other ``stages/<name>.py`` that declares a STAGE."""
    folder = Path(__file__).resolve().parent.parent / "stages"
    extra = sorted(p.stem for p in folder.glob("*.py") if p.stem not in STAGES and not p.stem.startswith("_")
                   and "STAGE = Stage(" in p.read_text())
    return [*STAGES, *extra]


def load(name: str) -> Stage:
    """The contract of stage ``name`` (imports ``stages.<name>``)."""
    module = importlib.import_module(f"stages.{name}")
    contract = getattr(module, "STAGE", None)
    if not isinstance(contract, Stage) or contract.name != name:
        raise ContractError(f"stages/{name}.py must define STAGE = Stage(name={name!r}, ...)")
    if contract.run is None:
        if not callable(getattr(module, "run", None)):
            raise ContractError(f"stages/{name}.py must define run(ctx: Context) -> dict")
        contract = replace(contract, run=module.run)
    if contract.check is None and callable(getattr(module, "check", None)):
        contract = replace(contract, check=module.check)
    return contract


def view(stage: Stage, cfg: DictConfig) -> DictConfig:
    """The part of ``cfg`` a stage may read: runner keys, its group and its declared keys; read-only, and
    reading any other key raises."""
    keys = [*RUNNER_KEYS, *stage.dvc_params(cfg)]
    out = OmegaConf.create({})
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if key == stage.name and stage.config is not None:  # a stage outside schema.RootConfig types its group
            try:
                value = OmegaConf.merge(OmegaConf.structured(stage.config), value or {})
            except Exception as err:
                inner = getattr(err, "full_key", None)
                where = f"{key}.{inner}" if inner else key
                raise ConfigError(f"config key '{where}': {str(err).strip().splitlines()[0]}") from None
        OmegaConf.update(out, key, value, merge=False, force_add=True)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def resolve_path(cfg: DictConfig, path: str, in_data: bool = True) -> Path:
    """``paths.data/<path>`` (or ``<path>`` with ``in_data=False``) with ``${key}`` interpolations resolved from
    ``cfg`` (DVC's syntax for params)."""
    resolved = re.sub(r"\$\{([^}]+)\}", lambda m: str(OmegaConf.select(cfg, m.group(1))), path)
    return Path(cfg.paths.data) / resolved if in_data else Path(resolved)


# Metric names that measure the machine, not the model: wall time, throughput, latency.
TIMING = re.compile(r"(^|/)(speed/.*|[^/]*seconds[^/]*|[^/]*_ms|[^/]*per_second)$")


def split_timings(metrics: dict) -> tuple[dict, dict]:
    """(the model's metrics, the machine's timings) of a metrics dict, nested ones (``variant -> metrics``)
    split per entry: the model's file reproduces byte for byte from the same seed; timings never do."""
    model, timings = {}, {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            model[key], inner = split_timings(value)
            if inner:
                timings[key] = inner
        elif TIMING.search(key):
            timings[key] = value
        else:
            model[key] = value
    return model, timings


def seed_everything(cfg: DictConfig) -> None:
    """Seed every RNG and set the thread count and determinism of this process (:data:`RUNNER_PARAMS`)."""
    import lightning as L
    import torch

    torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def log_plots(run, folder: Path) -> None:
    """The stage's plot files as run artifacts (``plots/``), with its training curves drawn into ``curves.png``
    (written to a temporary folder: the DVC plot folder holds only the declared plot files)."""
    import tempfile

    from pipeline.plots import curves_png

    if not folder.is_dir() or not any(folder.iterdir()):
        return
    run.log_artifact(folder, "plots")
    with tempfile.TemporaryDirectory() as tmp:
        png = curves_png(folder, Path(tmp) / "curves.png")
        if png is not None:
            run.log_artifact(png, "plots")


def execute(stage: Stage, cfg: DictConfig) -> dict:
    """Run one stage under its contract (see the module docstring); return its metrics."""
    from pipeline.outputs import RUN_JSON, atomic_dir, digest, stage_output, write_json
    from pipeline.runs import stage_run

    seen = view(stage, cfg)
    if stage.check is not None:
        stage.check(seen)
    out = stage_output(cfg, stage.name)
    module = sys.modules.get(f"stages.{stage.name}")
    about = ((module.__doc__ or "").strip().splitlines() or [""])[0].rstrip(".") if module else ""
    logging.getLogger(f"stages.{stage.name}").info(console.header(stage.name, about, cfg))
    console.quiet_library_progress()
    with stage_run(seen, stage.name) as run:
        inputs, digests = {}, {}
        for spec in stage.inputs:
            path = resolve_path(cfg, spec.path, spec.in_data)
            if spec.conditional:
                inputs[spec.name] = path
                continue
            digests[spec.name] = run.add_input(spec.name, path, dataset=spec.dataset)["digest"]
            inputs[spec.name] = path
        seed_everything(seen)
        with atomic_dir(out) as tmp:
            ctx = Context(stage, seen, run, tmp, Path(cfg.paths.plots) / stage.name, inputs, digests)
            try:
                metrics = stage.run(ctx)
            except (ConfigAttributeError, ConfigKeyError) as err:
                key = getattr(err, "full_key", None)
                if key and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
                    raise ContractError(f"stage '{stage.name}' read config key '{key}', which its contract does not "
                                        f"declare: add it to params in stages/{stage.name}.py") from err
                raise
            output_digest = digest(tmp)  # what DVC hashes: run.json is .dvcignored (runs.producer_record)
            run.write_run_json(tmp, output_digest=output_digest, **ctx.info)
        shutil.rmtree(Path(cfg.paths.checkpoints) / stage.name, ignore_errors=True)  # outputs are safe now
        run.set_tag(f"output.{stage.name}.digest", output_digest)
        run.log_artifact(out / RUN_JSON)
        for name, relative in ctx.datasets:
            run.add_output(name, out / relative, dataset=True)
        metrics_file = Path(cfg.paths.metrics) / f"{stage.name}.json"
        model, timings = split_timings(metrics)
        write_json(metrics_file, model)
        write_json(Path(cfg.paths.timings) / f"{stage.name}.json", timings)
        run.log_metrics(metrics, step=ctx.step)  # at the end of the curves, never back at step 0
        run.log_artifact(metrics_file)
        log_plots(run, ctx.plots)
    console.print_summary(console.summary(stage.name, model, str(out), run.run_id))
    return metrics

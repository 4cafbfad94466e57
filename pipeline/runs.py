"""The run writer: one MLflow run per stage execution, and the ``run.json`` it leaves beside the outputs.

Each stage run records the resolved config it read (params plus ``config.yaml``), the git commit and dirty flag,
package versions and platform, the digest of every input, the run ids of the upstream stages that produced
them (see :func:`producer_record`: lineage survives DVC cache hits), its metrics, its costs
(wall time, peak memory) and its key artifacts. Which parent run a stage run belongs under is
:mod:`pipeline.parents`' job; reading the lineage back is :mod:`pipeline.lineage`'s.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from pipeline.outputs import RUN_JSON, digest, read_json, write_json
from pipeline.parents import OWNER_TAG, PARENT_ENV, mark_dead_runs, parent_run, process_identity

PACKAGES = ("torch", "lightning", "transformers", "peft", "trl", "hydra-core", "mlflow", "dvc", "posttrain")


def tracking_uri(cfg: DictConfig) -> str:
    """The MLflow tracking URI: ``$MLFLOW_TRACKING_URI``, else ``logger.tracking_uri``, else a local
    SQLite store under ``mlruns/`` of the DVC repo (``$DVC_ROOT``, which DVC points at the main repo even
    for queued experiments running in temporary copies) or of the current directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.logger.tracking_uri
    if uri:
        return uri
    store = (Path(os.environ.get("DVC_ROOT", ".")) / "mlruns").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def producer_record(folder: str | Path, folder_digest: str, client=None) -> dict | None:
    """The ``run.json`` record of the run that wrote output folder ``folder`` as it is now (content digest
    ``folder_digest``, run.json excluded), or None when no run is known to have written these bytes.

    ``run.json`` holds run ids, which differ between identical runs, so DVC does not hash it (``.dvcignore``): a
    rerun that writes the same bytes leaves every downstream stage up to date. The price: a checkout from DVC's
    cache (a run-cache hit, ``dvc checkout``, ``dvc exp apply``) brings the folder back without it, or leaves a
    record of other bytes. Then the run is found in MLflow by the output digest it tagged, and its record (an
    artifact of the run) is written back beside the output."""
    folder = Path(folder)
    path = folder / RUN_JSON
    record = None
    if path.is_file():
        try:
            record = read_json(path)
        except ValueError:  # a damaged record is not evidence; look it up
            record = None
    if isinstance(record, dict) and record.get("output_digest", folder_digest) == folder_digest:
        return record
    if client is None:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`output.{folder.name}.digest` = '{folder_digest}' and "
                                            "attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not found:
        return None
    run = found[0]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            record = read_json(client.download_artifacts(run.info.run_id, RUN_JSON, tmp))
        except Exception:  # a run from before records were artifacts: what its tags say
            record = {"stage": run.data.tags.get("posttrain.stage"), "run_id": run.info.run_id,
                      "output_digest": folder_digest}
    if folder.is_dir():
        write_json(path, record)
    return record


def pipeline_products(root: str | Path = ".") -> set[str]:
    """Tracked files the chain itself rewrites: ``dvc.lock``, and every output a stage of ``dvc.yaml`` declares
    (outs, metrics, plots: DVC deletes them before it runs the stage) with the ``.gitignore`` DVC keeps beside
    them. Read from ``dvc.yaml``, the one place that names them."""
    products = {"dvc.lock"}
    spec = Path(root) / "dvc.yaml"
    if spec.exists():
        import yaml

        for stage in (yaml.safe_load(spec.read_text()) or {}).get("stages", {}).values():
            for kind in ("outs", "metrics", "plots"):
                for entry in stage.get(kind, []):
                    path = entry if isinstance(entry, str) else next(iter(entry))
                    products |= {path, str(Path(path).parent / ".gitignore")}
    return products


def git_state(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the git work tree at ``cwd``; ("unknown", True) outside git. Dirty means a tracked
    file other than the pipeline's own products (:func:`pipeline_products`) differs from the commit: otherwise
    every stage of a clean `dvc repro` would count as dirty, its tracked metrics deleted by DVC before it runs."""
    exclude = [f":(exclude){path}" for path in sorted(pipeline_products(cwd))]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                                cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit.stdout.strip(), bool(status.stdout.strip())


# CPU instruction sets that pick different kernel paths in torch (and so can move the last digits of a result).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """Which of :data:`CPU_FLAGS` this CPU has (Linux), e.g. ``avx2 fma avx512f``; ``unknown`` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return " ".join(f for f in CPU_FLAGS if f in have) or "none of " + " ".join(CPU_FLAGS)


def environment() -> dict[str, str]:
    """Package versions, platform and CPU instruction sets, for reproducibility records."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_flags": cpu_flags(), "torch_cpu_capability": _torch_cpu_capability()}
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "absent"
    return info


def _torch_cpu_capability() -> str:
    """The SIMD level torch dispatches its CPU kernels to (``AVX2``, ``AVX512``...)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return torch.backends.cpu.get_cpu_capability() if torch is not None else "torch not loaded"
    except AttributeError:
        return "unknown"


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    items = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class StageRun:
    """The MLflow run of one stage execution, and the ``run.json`` it leaves beside its outputs."""

    def __init__(self, client, run_id: str, parent_id: str | None, uri: str, stage: str, cfg: DictConfig):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.tracking_uri = uri
        self.stage = stage
        self.cfg = cfg
        self.inputs: dict[str, dict[str, Any]] = {}
        self.commit, self.dirty = git_state()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-numbers are skipped) under their ``split/name`` names."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def log_summary(self, rows: dict[str, dict], headline: tuple[str, ...], artifact_file: str) -> None:
        """A stage with child runs (evaluate's variants, quantize's methods): the parent holds one table of every
        child's metrics (``mlflow.log_table``: a row per child, in the UI's artifact and evaluation views) and
        only the ``headline`` metrics of each child as ``<child>/<metric>``, not a copy of every metric."""
        keys = sorted({k for m in rows.values() for k in m if isinstance(m[k], (int, float))})
        table = {"name": list(rows), **{k: [rows[n].get(k) for n in rows] for k in keys}}
        self.client.log_table(self.run_id, data=table, artifact_file=artifact_file)
        self.log_metrics({f"{name}/{k}": m[k] for name, m in rows.items() for k in headline if k in m})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def add_input(self, name: str, path: str | Path, dataset: bool = False) -> dict[str, Any]:
        """Record an input folder or file: its digest and the run that produced it (:func:`producer_record`
        of the folder holding it).

        ``dataset=True`` also registers it with ``mlflow.log_input`` so the MLflow UI lists it under
        the run's datasets.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input '{name}' of stage '{self.stage}' does not exist; run its stage first")
        info: dict[str, Any] = {"path": str(path), "digest": digest(path)}
        folder = path if path.is_dir() else path.parent
        upstream = producer_record(folder, info["digest"] if path.is_dir() else digest(folder), self.client)
        if upstream:
            info["run_id"] = upstream.get("run_id")
            info["stage"] = upstream.get("stage")
        self.inputs[name] = info
        self.set_tag(f"input.{name}.digest", info["digest"])
        if info.get("run_id"):
            self.set_tag(f"upstream.{name}.run_id", info["run_id"])
        if dataset:
            self._log_dataset(name, path, info["digest"], context="input")
        return info

    def add_output(self, name: str, path: str | Path, dataset: bool = False) -> str:
        """Record an output's digest as a tag (and, for data, as an MLflow dataset with context
        ``output``); return the digest."""
        path = Path(path)
        content_digest = digest(path)
        self.set_tag(f"output.{name}.digest", content_digest)
        if dataset:
            self._log_dataset(name, path, content_digest, context="output")
        return content_digest

    def _log_dataset(self, name: str, path: Path, content_digest: str, context: str = "input") -> None:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source, name=name, digest=content_digest[:36])
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def child(self, name: str, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> "StageRun":
        """A nested run under this one (e.g. one per evaluated variant), so the MLflow UI can compare
        them side by side under the same metric names. ``params``: what defines this child (the variant's
        source stage and prompting, the quantization method), so Compare and parallel coordinates have axes.
        Close it with :meth:`finish`."""
        from mlflow.entities import Param

        run = self.client.create_run(self.client.get_run(self.run_id).info.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, "posttrain.stage": self.stage, "posttrain.kind": "variant",
            "mlflow.source.git.commit": self.commit, **(tags or {})})
        if params:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return StageRun(self.client, run.info.run_id, self.run_id, self.tracking_uri, self.stage, self.cfg)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def record(self, **extra: Any) -> dict[str, Any]:
        """The ``run.json`` content for this run: identity, code version, config digest, inputs."""
        import hashlib

        config_text = OmegaConf.to_yaml(self.cfg, resolve=True)
        return {
            "stage": self.stage,
            "run_id": self.run_id,
            "parent_run_id": self.parent_id,
            "tracking_uri": self.tracking_uri,
            "git_commit": self.commit,
            "git_dirty": self.dirty,
            "config_digest": hashlib.sha256(config_text.encode()).hexdigest(),
            "inputs": self.inputs,
            "environment": environment(),
            **extra,
        }

    def write_run_json(self, folder: str | Path, **extra: Any) -> None:
        """Write ``run.json`` into an output folder (call inside its :func:`atomic_dir` block)."""
        write_json(Path(folder) / RUN_JSON, self.record(**extra))


# The MLflow UI opens an experiment on its GenAI pages (an empty Traces view) unless the experiment says it is
# classic model development; then it opens on the runs table, where the stages are.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def find_experiment(client, cfg: DictConfig) -> str:
    """The id of ``logger.experiment``, created (with its artifact root and :data:`EXPERIMENT_KIND`) on first use."""
    exp = client.get_experiment_by_name(cfg.logger.experiment)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # a store from before the tag, or made by someone else
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    root = (Path(os.environ.get("DVC_ROOT", ".")) / cfg.logger.artifact_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        experiment_id = client.create_experiment(cfg.logger.experiment, artifact_location=root.as_uri(),
                                                 tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(cfg.logger.experiment).experiment_id
    return experiment_id


def run_name(stage: str, cfg: DictConfig) -> str:
    """``<stage>-<6 hex digits>``: the digits are a digest of the config the stage reads (its view, where
    outputs go and where it logs left out), so the MLflow runs table tells two configs of one stage apart at a
    glance, and two runs of one config share a name. The stage itself is the tag ``posttrain.stage``."""
    import hashlib

    relevant = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("paths", "logger")}
    text = OmegaConf.to_yaml(OmegaConf.create(relevant))
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


@contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution; close it FINISHED once the stage wrote its outputs, or FAILED
    on error. A process killed outright (SIGKILL, OOM) cannot close its run: the next execution finds it RUNNING
    with a dead owner process and marks it KILLED (:func:`pipeline.parents.mark_dead_runs`)."""
    import resource
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    # Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which exports $MLFLOW_TRACKING_URI: restored on
    # exit, so a later stage in the same process (a sweep job, a test) resolves its own store, not this one's.
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = find_experiment(client, cfg)
    mark_dead_runs(client, experiment_id, by=f"a {stage} run starting")
    parent = parent_run(client, experiment_id)
    commit, dirty = git_state()
    tags = {"posttrain.stage": stage, "mlflow.source.git.commit": commit, "git.dirty": str(dirty),
            "mlflow.source.name": "pipeline.run", "posttrain.kind": "stage", OWNER_TAG: process_identity()}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=run_name(stage, cfg), tags=tags)
    current = StageRun(client, run.info.run_id, parent, uri, stage, cfg)
    _log_config(client, current, cfg)
    if parent:  # the pipeline run carries the lock this stage started from (pipeline.repro adds the final one)
        log_dvc_lock(client, parent, os.environ.get("DVC_ROOT", "."))
    status = "FAILED"
    started = time.perf_counter()
    try:
        yield current
        status = "FINISHED"
        # What the stage cost: wall time and the process's peak resident memory (Linux reports KiB).
        client.log_batch(current.run_id, metrics=[
            Metric("system/wall_seconds", round(time.perf_counter() - started, 1), int(time.time() * 1000), 0),
            Metric("system/peak_rss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   int(time.time() * 1000), 0)])
    finally:
        client.set_terminated(current.run_id, status=status)
        if parent and not os.environ.get(PARENT_ENV):  # a sweep's or wrapper's parent is closed by its owner
            client.set_terminated(parent, status=status)
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


def _log_config(client, run: StageRun, cfg: DictConfig) -> None:
    """Log the resolved config as params (one per leaf) and as ``config.yaml``; environment as tags."""
    from mlflow.entities import Param, RunTag

    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.run_id, params=params[i:i + 100])
    client.log_text(run.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    env_tags = [RunTag(f"env.{k}", v) for k, v in environment().items()]
    client.log_batch(run.run_id, tags=env_tags + [RunTag("env.argv", " ".join(sys.argv)[:5000])])


def log_dvc_lock(client, run_id: str, root: str | Path = ".") -> None:
    """Attach the repo's ``dvc.lock`` (the hashes of every stage's code, params and outputs) to a run."""
    lock = Path(root) / "dvc.lock"
    if lock.exists():
        client.log_text(run_id, lock.read_text(), "dvc.lock")

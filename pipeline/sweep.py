"""One MLflow parent run per Hydra sweep.

Registered as a Hydra callback in ``conf/config.yaml``: on ``-m`` it opens a ``sweep`` run before any job
starts and exports its id as ``POSTTRAIN_PARENT_RUN_ID``, so every job's stage run (in this process or
in launcher worker processes started afterwards) becomes its child; the sweep run closes when the sweep
ends. Single runs are untouched.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepParent(Callback):
    """Hydra callback: an MLflow parent run around a multirun."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from pipeline.parents import OWNER_TAG, PARENT_ENV, process_identity
        from pipeline.runs import find_experiment, git_state, tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri(config))
        commit, dirty = git_state()
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(find_experiment(client, config), run_name="sweep", tags={
            "posttrain.kind": "sweep", "mlflow.source.git.commit": commit, "git.dirty": str(dirty),
            "sweep.overrides": overrides[:5000], "sweep.dir": str(config.hydra.sweep.dir),
            OWNER_TAG: process_identity()})
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from pipeline.parents import PARENT_ENV
        from pipeline.runs import tracking_uri

        if self.run_id:
            MlflowClient(tracking_uri=tracking_uri(config)).set_terminated(self.run_id, status="FINISHED")
            os.environ.pop(PARENT_ENV, None)

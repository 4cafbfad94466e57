"""What every training stage shares: resumable step-indexed batches, RNG state in checkpoints, the
Lightning ``Trainer`` built from the ``trainer`` config, and the schedule.

Resume. A stage checkpoints every N optimizer steps into ``paths.checkpoints/<stage>/<key>``, where the
key digests the stage's config and inputs, so a changed config never resumes a stale run. A rerun after a
crash finds ``last.ckpt`` and continues: Lightning restores weights, optimizer, scheduler and the step
counter; :class:`StageModule` restores the RNG states; :class:`StepBatches` restarts the data stream at
the restored step, so the resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from pipeline.outputs import KILL_ENV  # fault injection: an optimizer step here (KillAtStep), "rename" in outputs

LAST_CKPT = "last.ckpt"
ATTEMPT_JSON = "attempt.json"  # beside the checkpoints: the attempt's run id and its validation before training
# Config keys of a stage that trains through build_trainer (it declares them in its contract, pipeline.stage).
TRAINER_KEYS = ("trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.precision", "trainer.logits_chunk")
# StepBatches defines __len__ for the progress bar; with num_workers=0 the length is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class StepBatches(IterableDataset):
    """Micro-batches ``start..total-1`` of a run, each a pure function of (seed, index).

    Batch ``k`` takes positions ``k*b .. k*b+b-1`` of an endless stream made of one seeded permutation
    of the items per epoch. Because the stream depends only on the index, restarting at
    ``start = optimizer_step * accumulation`` resumes the data position exactly.

    Under data-parallel training (``trainer=ddp_cpu``, ``ddp``) process ``r`` of ``w`` takes stream batch
    ``k*w + r`` at its step ``k``: the processes see disjoint batches, and the effective batch is w x b.
    """

    def __init__(self, num_items: int, batch_size: int, total: int, seed: int, collate: Callable[[list[int]], dict]):
        if num_items < 1:
            raise ValueError("no training items: the split is empty")
        self.num_items, self.batch_size, self.total, self.seed = num_items, batch_size, total, seed
        self.collate = collate
        self.start = 0

    def indices(self, k: int) -> list[int]:
        out = []
        for pos in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, offset = divmod(pos, self.num_items)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm_cache = cache = (epoch, perm)
        return cache[1]

    def __iter__(self):
        rank, world = rank_and_world()
        for k in range(self.start, self.total):
            yield self.collate(self.indices(k * world + rank))

    def __len__(self) -> int:
        return self.total - self.start


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batches_loader(dataset: IterableDataset) -> DataLoader:
    """A DataLoader that passes ready-made batches through (batching is the dataset's job)."""
    return DataLoader(dataset, batch_size=None, num_workers=0)


class StageModule(L.LightningModule):
    """The one base class of the training stages: RNG states and the loss-curve history travel in
    checkpoints, and a :class:`StepBatches` training stream restarts at the restored optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict] = []  # rows for the stage's loss-curve plot

    def on_train_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, StepBatches):
            dataset.start = self.trainer.global_step * self.trainer.accumulate_grad_batches

    # The history travels with the module's state dict too: under ``ddp_spawn`` the spawned processes train and
    # only the state dict comes back to the stage's process (Lightning's multiprocessing launcher).
    def get_extra_state(self) -> dict:
        return {"history": self.history}

    def set_extra_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))

    # Frozen weights are not saved in checkpoints (they come from the stage's inputs), so loading
    # must accept a state dict holding only the trainable parameters and buffers.
    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        for name in frozen:
            checkpoint["state_dict"].pop(name, None)
        # Tensors and plain Python values only, so the checkpoint loads with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
        }
        checkpoint["loss_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(states["python"])
        self.history = checkpoint.get("loss_history", [])


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.1):
    """Linear warmup for ``warmup`` steps, then cosine decay to ``floor`` x the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                        betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    """``configure_optimizers`` output: AdamW with decoupled decay on matrices, stepped warmup + cosine."""
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup_cosine(optimizer, warmup, total), "interval": "step"}}


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices, not biases, norms or embeddings' 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def checkpoint_dir(cfg: DictConfig, stage: str, input_digests: Sequence[str]) -> Path:
    """Where ``stage`` keeps resumable checkpoints for this exact config and these inputs."""
    stage_cfg = OmegaConf.to_yaml(cfg, resolve=True)
    key = hashlib.sha256((stage_cfg + "|".join(input_digests)).encode()).hexdigest()[:16]
    return Path(cfg.paths.checkpoints) / stage / key


def resume_path(ckpt_dir: Path) -> str | None:
    """``last.ckpt`` in ``ckpt_dir`` if a previous attempt left one."""
    last = ckpt_dir / LAST_CKPT
    return str(last) if last.exists() else None




class KillAtStep(L.Callback):
    """Fault injection: SIGKILL this process once optimizer step ``$POSTTRAIN_KILL_AT_STEP`` is done, the
    way an OOM killer or a pre-empted machine would. Used by the resume tests; inert when unset."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every n optimizer steps, as Lightning's ``ModelCheckpoint`` writes it, except at a step that a
    validation follows: there it is written after the validation (Lightning's own deferral, meant for a monitored
    metric), so the checkpoint holds that step's validation point. Saved before it, a run resumed from it would
    skip the validation (done, as far as the loop state knows) and draw its curve with a gap."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        loop = trainer.fit_loop.epoch_loop
        if (due and not self._should_skip_saving_checkpoint(trainer) and not loop._skip_next_val
                and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)):
            self._defer_save_until_validation = True  # on_validation_end saves
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StageLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that it never ends the run: it would mark the stage FINISHED after the
    validation before training. The stage's run ends when the stage does (``pipeline.runs.stage_run``)."""

    def finalize(self, status: str = "success") -> None:
        pass


def build_trainer(cfg: DictConfig, run, ckpt_dir: Path, max_steps: int, val_every: int | None,
                  checkpoint_every: int, accumulation: int = 1) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` config that logs to the stage's MLflow run and
    checkpoints every ``checkpoint_every`` optimizer steps into ``ckpt_dir``."""
    import os

    t = cfg.trainer
    logger = StageLogger(tracking_uri=run.tracking_uri, run_id=run.run_id, experiment_name=cfg.logger.experiment)
    # Only last.ckpt is kept: resuming needs the newest state, not a history.
    checkpoints = StepCheckpoint(dirpath=ckpt_dir, every_n_train_steps=checkpoint_every, save_top_k=0,
                                 save_last=True, enable_version_counter=False)
    callbacks: list[L.Callback] = [checkpoints]
    if t.progress_bar:
        from pipeline.progress import StageBar

        callbacks.append(StageBar(run.stage))
    if os.environ.get(KILL_ENV, "").isdigit():
        callbacks.append(KillAtStep(int(os.environ[KILL_ENV])))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulation,
        val_check_interval=val_every * accumulation if val_every else None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(ckpt_dir),
    )


@dataclass
class Fit:
    """What :func:`fit` did: validation metrics before training (None when it resumed: the untrained model is
    gone) and after, and the wall time of ``trainer.fit``."""

    trainer: L.Trainer
    before: dict | None
    after: dict
    seconds: float

    def metrics(self, digits: int = 4) -> dict:
        """Validation metrics after training, and before it as ``<key>_before``, rounded once, here."""
        from pipeline.stats import rounded

        out = {k: float(v) for k, v in self.after.items()}
        out.update({f"{k}_before": float(v) for k, v in (self.before or {}).items()})
        return rounded(out, digits)


def fit(ctx, module: L.LightningModule, datamodule: L.LightningDataModule, max_steps: int, val_every: int | None,
        checkpoint_every: int, accumulation: int = 1) -> Fit:
    """The training lifecycle every training stage shares: resume from the last checkpoint of this exact config
    and inputs if a previous attempt left one, else validate the untrained module; fit; validate again.

    The validation before training and the MLflow run of the attempt are kept beside the checkpoints
    (``attempt.json``), so a resumed stage reports the same ``*_before`` metrics as an uninterrupted one and its
    run links to the run it resumed (tag ``posttrain.resumed_run``): one training across two processes.
    Saving the result atomically and clearing the checkpoints is the runner's job (:func:`pipeline.stage.execute`)."""
    import logging
    import time

    from pipeline.outputs import read_json, write_json

    ckpt_dir = checkpoint_dir(ctx.cfg, ctx.name, list(ctx.digests.values()))
    trainer = build_trainer(ctx.cfg, ctx.run, ckpt_dir, max_steps, val_every, checkpoint_every, accumulation)
    resume = resume_path(ckpt_dir)
    attempt = ckpt_dir / ATTEMPT_JSON
    if resume and attempt.exists():
        earlier = read_json(attempt)
        before = earlier["before"]
        logging.getLogger(f"stages.{ctx.name}").warning("%s: resuming from %s", ctx.name, resume)
        ctx.run.set_tag("resumed_from", resume)
        ctx.run.set_tag("posttrain.resumed_run", earlier["run_id"])
    else:
        resume = None  # a checkpoint without its attempt record is not trusted: start over
        before = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    write_json(attempt, {"run_id": ctx.run.run_id, "before": before})
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    seconds = time.time() - start
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    ctx.step = trainer.global_step
    return Fit(trainer, before, after, seconds)


SAMPLES = 8            # held-out prompts answered after training and logged as the run's samples table
SAMPLE_TOKENS = 64     # new tokens per sample answer: enough for the suite's answers, cheap on a real model


def log_samples(ctx, model, tokenizer, prompts: list[list[int]], references: list[str | None]) -> None:
    """Answer the first :data:`SAMPLES` held-out prompts greedily with the trained model and log them as the
    MLflow table ``samples.json`` (prompt, reference, response, finished): what the training did, readable in
    the run's artifacts next to its curves. Greedy, after the weights are saved: it changes nothing."""
    from pipeline.generation import generate

    prompts, references = prompts[:SAMPLES], references[:SAMPLES]
    if not prompts:
        return
    answers, _ = generate(model, tokenizer, prompts, SAMPLE_TOKENS, batch_size=len(prompts))
    ctx.run.client.log_table(ctx.run.run_id, artifact_file="samples.json", data={
        "prompt": [tokenizer.decode(p, skip_special_tokens=True).strip() for p in prompts],
        "reference": [r if r is not None else "" for r in references],
        "response": [a.text for a in answers], "finished": [a.finished for a in answers]})

"""reward: a Bradley-Terry reward model trained on the collected preference pairs, with a quality gate.

A ``LightningModule`` run by ``Trainer.fit``. The backbone is the SFT model (``reward.backbone: null``)
or any configured causal LM, loaded as ``AutoModelForSequenceClassification`` with one label: a scalar
head on the last real token (``transformers`` pools at the last non-pad token, so left and right padding
both work). Trained through the ``peft`` group like every training stage (LoRA by default; the head is
always trained in full) or fully (``peft=none``). Chosen and rejected responses of a batch go through one
forward pass; with ``reward.share_prompt`` each pair's prompt runs once and its KV cache serves both responses
(:func:`pipeline.rewards.shared_prompt_rewards`).

Loss (:func:`pipeline.rewards.bradley_terry_loss`): -log sigmoid(r_chosen - r_rejected - margin), with an
optional margin of ``reward.margin_scale`` x the judge's score gap and an optional centring term
``reward.center_coef`` x (r_chosen + r_rejected)^2.

Pairs are split by prompt (``reward.val_share``): no prompt has pairs on both sides. Validation reports
pairwise accuracy, mean margin, and reward mean and std; the reward mean and std over the training pairs
are saved for alignment to normalize rewards.

Quality gate: ``gate.json`` records held-out accuracy against ``reward.min_accuracy``; PPO and GRPO
refuse a reward model that failed it (:func:`pipeline.rewards.load_reward_model`).

Inputs: ``data/collect/pairs.jsonl``, ``data/sft`` (backbone); ``reward.*``, ``peft.*``, ``trainer.*``, ``seed``.
Outputs: ``data/reward/`` (HF folder loadable with ``AutoModelForSequenceClassification``, ``adapter/``
for adapter methods, ``reward_stats.json``, ``gate.json``, ``run.json``), ``data/metrics/reward.json``,
``data/plots/reward/`` (``loss.json``, ``val_accuracy.json``, ``rewards.csv`` and ``rewards.png``: chosen vs
rejected rewards on the validation pairs).
Run: ``python -m pipeline.run stage=reward``
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import adapters
from pipeline.models import SOURCE_KEYS, base_reference, load_sequence_scorer, load_tokenizer, record_pad_token
from pipeline.outputs import write_json
from pipeline.plots import write_histogram
from pipeline.preferences import PreferenceData
from pipeline.rewards import (
    GATE_JSON,
    STATS_JSON,
    bradley_terry_loss,
    can_share_prompt,
    sequence_rewards,
    shared_prompt_rewards,
)
from pipeline.stage import Chart, Context, Input, Plot, Stage
from pipeline.tokens import pad
from pipeline.training import TRAINER_KEYS, StageModule, adamw_warmup_cosine, fit

log = logging.getLogger(__name__)


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="reward",
    inputs=(Input("collect", "collect/pairs.jsonl", dataset=True),
            Input("sft", "sft", conditional=True, note="the backbone unless reward.backbone names another")),
    params=("peft", *SOURCE_KEYS, *TRAINER_KEYS),
    plots=(Plot("loss.json", x="step", y="train/loss", title="reward model training loss"),
           Plot("val_accuracy.json", x="step", y="val/accuracy", title="reward model held-out pairwise accuracy"),
           Plot("rewards.csv")),
    charts=(Chart("reward model on held-out pairs (chosen vs rejected rewards)", "linear", x="reward",
                  y={"rewards.csv": ["chosen", "rejected"]}),),
)


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, in one batch (one forward pass for both), right-padded, with each
    pair's prompt length (for ``reward.share_prompt``)."""
    ids, mask = pad([it["chosen"] for it in items] + [it["rejected"] for it in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "gap": torch.tensor([it["gap"] for it in items], dtype=torch.float),
            "prompt_len": torch.tensor([it["prompt_len"] for it in items], dtype=torch.long)}


class RewardModule(StageModule):
    """Bradley-Terry training of a scalar-head model on (chosen, rejected) pairs."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, pad_id: int = 0):
        super().__init__()
        self.model, self.cfg, self.pad_id = model, cfg.reward, pad_id
        self.share_prompt = bool(self.cfg.share_prompt) and can_share_prompt(model)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self) -> None:
        self.model.train()

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.share_prompt:
            rewards = shared_prompt_rewards(self.model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                                            self.pad_id)
        else:
            rewards = sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"])
        n = batch["gap"].shape[0]
        return rewards[:n], rewards[n:]

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        margin = self.cfg.margin_scale * gap if self.cfg.margin_scale else None
        return bradley_terry_loss(chosen, rejected, margin, self.cfg.center_coef)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self(batch)
        loss = self.loss(chosen, rejected, batch["gap"])
        accuracy = (chosen > rejected).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", accuracy)
        if self.global_step % 10 == 0:
            self.history.append({"step": int(self.global_step), "train/loss": float(loss.detach()),
                                 "train/accuracy": float(accuracy)})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        chosen, rejected = self(batch)
        self._val.append((chosen.detach(), rejected.detach(), batch["gap"]))

    def on_validation_epoch_end(self) -> None:
        chosen = torch.cat([c for c, _, _ in self._val])
        rejected = torch.cat([r for _, r, _ in self._val])
        gap = torch.cat([g for _, _, g in self._val])
        self._val = []
        metrics = validation_metrics(chosen, rejected)
        metrics["val/loss"] = float(self.loss(chosen, rejected, gap))
        self.log_dict(metrics)
        self.val_rewards = (chosen, rejected)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), **metrics})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.model, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


def validation_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy, mean margin, reward mean and std over chosen and rejected rewards."""
    both = torch.cat([chosen, rejected])
    return {"val/accuracy": float((chosen > rejected).float().mean()), "val/margin": float((chosen - rejected).mean()),
            "val/reward_mean": float(both.mean()), "val/reward_std": float(both.std())}


@torch.no_grad()
def reward_stats(model, items: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean and std of the rewards of every training response (chosen and rejected)."""
    model.eval()
    values = []
    for lo in range(0, len(items), batch_size):
        batch = collate(items[lo:lo + batch_size], pad_id)
        values.append(sequence_rewards(model, batch["input_ids"], batch["attention_mask"]))
    rewards = torch.cat(values)
    return {"mean": float(rewards.mean()), "std": float(rewards.std()), "responses": int(rewards.numel())}


def write_reward_plot(chosen: torch.Tensor, rejected: torch.Tensor, folder: Path, bins: int = 20) -> None:
    """Histogram of chosen vs rejected rewards on the validation pairs: CSV for ``dvc plots``, a PNG."""
    accuracy = float((chosen > rejected).float().mean())
    write_histogram(folder, "rewards", {"chosen": chosen.tolist(), "rejected": rejected.tolist()}, bins, "reward",
                    "reward", "validation pairs", f"Reward model on held-out pairs: accuracy {accuracy:.1%}",
                    fmt=lambda x: f"{x:.3f}")


def run(ctx: Context) -> dict:
    """Train the reward model on the collected pairs into ``ctx.output``; return its metrics."""
    cfg, r = ctx.cfg, ctx.config
    pairs_path = ctx.input("collect")
    backbone = r.backbone or str(ctx.input("sft"))
    if Path(backbone).exists():
        ctx.digests["backbone"] = ctx.run.add_input("backbone", backbone)["digest"]
    start = time.time()
    tokenizer = load_tokenizer(backbone, cfg.model)
    model = load_sequence_scorer(backbone, cfg.model, quantization_config=adapters.quantization_config(cfg.peft))
    model.config.pad_token_id = tokenizer.pad_token_id  # the head pools at the last non-pad token
    model = adapters.apply(model, cfg.peft, task_type="SEQ_CLS")
    datamodule = PreferenceData(pairs_path, tokenizer, cfg, r, collate)
    datamodule.setup()
    module = RewardModule(model, cfg, tokenizer.pad_token_id)
    result = fit(ctx, module, datamodule, r.max_steps, r.val_every_n_steps, r.checkpoint_every_n_steps)
    final = result.after
    stats = reward_stats(module.model, datamodule.train_items, tokenizer.pad_token_id, r.batch_size)
    verdict = {"accuracy": final["val/accuracy"], "min_accuracy": r.min_accuracy,
               "passed": final["val/accuracy"] >= r.min_accuracy, "validation_pairs": len(datamodule.val_items)}
    tmp = ctx.output
    adapters.save_trained(module.model, cfg.peft, tmp, backbone, cfg.model, base_reference(cfg.model, backbone),
                          load_base=load_sequence_scorer)
    tokenizer.save_pretrained(tmp)
    record_pad_token(tmp, tokenizer.pad_token_id)
    write_json(tmp / STATS_JSON, stats)
    write_json(tmp / GATE_JSON, verdict)
    ctx.info.update(peft_method=cfg.peft.method, gate=verdict, reward_stats=stats)
    ctx.write_plot("loss.json", [h for h in module.history if "train/loss" in h])
    ctx.write_plot("val_accuracy.json", [h for h in module.history if "val/accuracy" in h])
    write_reward_plot(*module.val_rewards, ctx.plots)
    log.info("reward: held-out pairwise accuracy %.3f (gate %.2f: %s)", verdict["accuracy"], r.min_accuracy,
             "passed" if verdict["passed"] else "FAILED")
    return {**result.metrics(),
            "train/reward_mean": round(stats["mean"], 4), "train/reward_std": round(stats["std"], 4),
            "train/pairs": len(datamodule.train_items), "val/pairs": len(datamodule.val_items),
            "train/dropped_too_long": datamodule.dropped, "gate/passed": int(verdict["passed"]),
            "train/seconds": round(time.time() - start, 1)}

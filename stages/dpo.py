"""dpo: offline alignment of the SFT model on the collected preference pairs, by DPO or a sibling loss.

A ``LightningModule`` run by ``Trainer.fit``. The policy is the SFT model with a fresh adapter from the
``peft`` group (LoRA by default) or, with ``peft=none``, the whole model. The reference policy is the
SFT model itself, obtained one of two ways (``dpo.reference``):

- ``disable_adapter`` (default, adapter methods): the same model with the adapter switched off, so no
  second copy of the weights exists; one extra no-grad forward per step;
- ``precompute``: reference log-probs of every pair computed once before training (needed for full
  fine-tuning; saves the per-step reference forward).

The loss (``dpo.loss``) is one of :mod:`pipeline.losses`: ``sigmoid`` (DPO), ``conservative`` (cDPO),
``ipo``, ``hinge`` (SLiC), ``rpo`` (DPO + NLL), ``simpo`` and ``orpo`` (both reference-free). Chosen
and rejected responses of a batch go through one concatenated forward pass (TRL's batch layout:
``[chosen..., rejected...]`` with a completion mask); with ``dpo.share_prompt`` each pair's prompt runs
once and its KV cache serves both responses (:func:`pipeline.losses.shared_prompt_logps`).

``kto`` (:func:`pipeline.losses.kto`) trains on *unpaired* feedback instead (``data/collect/unpaired.jsonl``:
one completion and a desirable / undesirable label per row, :class:`pipeline.preferences.UnpairedData`). Its
batch has the same two-half layout, ``[completions..., mismatched completions...]``: each row's prompt with
another prompt's completion, for the reference point (the batch KL estimate); so the shared prompt, both
references and the precomputed reference log-probs serve it unchanged.

Metrics (train and val): loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy,
logps/chosen, logps/rejected, and ``kl``: the policy-to-reference log-ratio per response token on the
pairs (a sample estimate; ``evaluate`` measures KL on the policy's own answers). KTO's: rewards/desirable,
rewards/undesirable, rewards/margin (their difference), rewards/auroc (how often a desirable row's implied reward
beats an undesirable row's: 0.5 untrained, whatever the share of each), ``reference_point`` (z0) and ``kl``. Validation on the held-out prompts' pairs
or rows (the same split as the reward model's) at a fixed cadence and at the end, over the whole split.

Inputs: ``data/collect/pairs.jsonl`` (``kto``: ``unpaired.jsonl``), ``data/sft``; ``dpo.*``, ``peft.*``,
``trainer.*``, ``seed``.
Outputs: ``data/dpo/`` (merged HF folder, ``adapter/`` beside it, ``run.json``), ``data/metrics/dpo.json``,
``data/plots/dpo/{loss,val}.json``.
Run: ``python -m pipeline.run stage=dpo [dpo.loss=ipo dpo.beta=0.5]``
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import adapters
from pipeline.adapters import uses_virtual_tokens
from pipeline.chat import InputError
from pipeline.losses import (
    LOSSES,
    REFERENCE_FREE,
    UNPAIRED,
    LossSettings,
    PairLogps,
    kto,
    response_logps,
    shared_prompt_logps,
)
from pipeline.models import LOAD_KEYS, load_tokenizer
from pipeline.preferences import PreferenceData, UnpairedData
from pipeline.schema import ConfigError
from pipeline.stage import Context, Input, Plot, Stage
from pipeline.tokens import sequence_logps
from pipeline.training import SAMPLES, TRAINER_KEYS, StageModule, adamw_warmup_cosine, fit, log_samples

log = logging.getLogger(__name__)


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="dpo",
    inputs=(Input("collect", "collect/${dpo.reads}", dataset=True,
                  note="pairs.jsonl; dpo.loss=kto: unpaired.jsonl (dpo.reads, derived from the loss)"),
            Input("sft", "sft")),
    params=("peft", *LOAD_KEYS, *TRAINER_KEYS),
    plots=(Plot("loss.json", x="step", y="train/loss", title="dpo training loss"),
           Plot("val.json", x="step", y="val/rewards/margin", title="dpo held-out reward margin")),
)


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's preference batch layout: rows ``[chosen..., rejected...]`` (KTO items: ``[completion..., kl...]``, each
    row's completion and its mismatched one) right-padded, with an attention mask and a completion mask (1 on
    response tokens), plus precomputed reference log-probs (``ref_logps``, in row order) and KTO's labels."""
    first, second = ("completion", "kl") if "kl" in items[0] else ("chosen", "rejected")
    rows = [it[first] for it in items] + [it[second] for it in items]
    prompts = [it["prompt_len"] for it in items] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, :len(row)] = 1
        completion[i, p:len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    if "ref" in items[0]:
        batch["ref_logps"] = torch.tensor([it["ref"][0] for it in items] + [it["ref"][1] for it in items])
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.bool)
    return batch


def reference_context(model):
    """Run the model as its reference: the adapter switched off (peft), so no weight copy is needed."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    raise ConfigError("dpo.reference = disable_adapter needs an adapter (peft.method other than none/bitfit); "
                      "use dpo.reference=precompute for full fine-tuning")


class DPOModule(StageModule):
    """A preference-optimization loss from :mod:`pipeline.losses` on the concatenated pair batch (KTO: on the
    batch of completions and their mismatched twins)."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, pad_id: int = 0):
        super().__init__()
        self.model, self.cfg, self.pad_id = model, cfg.dpo, pad_id
        self.logits_chunk = OmegaConf.select(cfg, "trainer.logits_chunk")
        self.unpaired = self.cfg.loss in UNPAIRED
        self.loss_fn = None if self.unpaired else LOSSES[self.cfg.loss]
        self.settings = LossSettings(beta=self.cfg.beta, label_smoothing=self.cfg.label_smoothing,
                                     simpo_gamma=self.cfg.simpo_gamma, rpo_alpha=self.cfg.rpo_alpha,
                                     orpo_lambda=self.cfg.orpo_lambda)
        self.needs_reference = self.cfg.loss not in REFERENCE_FREE
        self._val: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self) -> None:
        self.model.train()

    def response_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and response lengths of every row, with the current adapter state."""
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        if self.cfg.share_prompt and not uses_virtual_tokens(self.model):
            return shared_prompt_logps(self.model, ids, attention, completion, self.pad_id)
        if self.logits_chunk is not None:  # logits on response positions only, a chunk at a time
            logp = sequence_logps(self.model, ids, completion, self.logits_chunk, attention_mask=attention)
            return logp.sum(-1), completion[:, 1:].sum(-1).to(logp.dtype)
        logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        return response_logps(logits, ids, completion)

    def logps(self, batch: dict) -> PairLogps:
        """Policy (and reference) response log-probs of the batch's two halves: chosen and rejected of each pair,
        or (KTO) each completion and its mismatched twin."""
        ids = batch["input_ids"]
        policy, tokens = self.response_logps(batch)
        n = ids.shape[0] // 2
        ref_c = ref_r = None
        if self.needs_reference:
            ref = batch["ref_logps"] if "ref_logps" in batch else self.reference_logps(batch)
            ref_c, ref_r = ref[:n], ref[n:]
        return PairLogps(policy[:n], policy[n:], ref_c, ref_r, tokens[:n], tokens[n:])

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        with reference_context(self.model):
            return self.response_logps(batch)[0]

    def step_rows(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's mean loss and its per-row figures (:func:`summarize` turns any number of them into metrics)."""
        lp = self.logps(batch)
        if self.unpaired:
            c = self.cfg
            losses, rewards, z0 = kto(lp.chosen, lp.ref_chosen, batch["label"], lp.rejected.detach(), lp.ref_rejected,
                                      c.beta, c.desirable_weight, c.undesirable_weight)
            rows = {"loss": losses.detach(), "reward": rewards, "label": batch["label"],
                    "reference_point": z0.expand_as(rewards), "logps": lp.chosen.detach(),
                    "log_ratio": (lp.chosen - lp.ref_chosen).detach(), "tokens": lp.chosen_tokens}
            return losses.mean(), rows
        losses, chosen_r, rejected_r = self.loss_fn(lp, self.settings)
        rows = {"loss": losses.detach(), "chosen": chosen_r.detach(), "rejected": rejected_r.detach(),
                "logps_chosen": lp.chosen.detach(), "logps_rejected": lp.rejected.detach()}
        if lp.ref_chosen is not None:
            rows["log_ratio"] = ((lp.chosen - lp.ref_chosen) + (lp.rejected - lp.ref_rejected)).detach()
            rows["tokens"] = lp.chosen_tokens + lp.rejected_tokens
        return losses.mean(), rows

    def summarize(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics of any number of rows (one batch, or the whole validation split); a figure with no row to
        measure it on (a batch without undesirable rows) is left out."""
        m = {"loss": rows["loss"].mean()}
        if "tokens" in rows:
            m["kl"] = rows["log_ratio"].sum() / rows["tokens"].sum().clamp(min=1)
        if not self.unpaired:
            m.update({"rewards/chosen": rows["chosen"].mean(), "rewards/rejected": rows["rejected"].mean(),
                      "rewards/margin": (rows["chosen"] - rows["rejected"]).mean(),
                      "rewards/accuracy": (rows["chosen"] > rows["rejected"]).float().mean(),
                      "logps/chosen": rows["logps_chosen"].mean(), "logps/rejected": rows["logps_rejected"].mean()})
            return m
        good, reward = rows["label"], rows["reward"]
        m.update({"reference_point": rows["reference_point"].mean(), "logps/completion": rows["logps"].mean()})
        if good.any():
            m["rewards/desirable"] = reward[good].mean()
        if (~good).any():
            m["rewards/undesirable"] = reward[~good].mean()
        if good.any() and (~good).any():
            m["rewards/margin"] = m["rewards/desirable"] - m["rewards/undesirable"]
            # KTO's pair accuracy: how often a desirable row's implied reward beats an undesirable one's, ties half
            # (the AUROC; 0.5 at the start, when every reward is 0, whatever the share of each kind)
            diff = reward[good][:, None] - reward[~good][None, :]
            m["rewards/auroc"] = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
        return m

    def step_metrics(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, rows = self.step_rows(batch)
        return loss, self.summarize(rows)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.step_metrics(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"})
        self.log("train/loss", loss, prog_bar=True)
        if self.global_step % 10 == 0 and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self.history.append({"step": int(self.global_step), **{f"train/{k}": float(v) for k, v in metrics.items()}})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val.append(self.step_rows(batch)[1])

    def on_validation_epoch_end(self) -> None:
        rows = {k: torch.cat([r[k] for r in self._val]) for k in self._val[0]}
        metrics = {f"val/{k}": float(v) for k, v in self.summarize(rows).items()}
        self._val = []
        self.log_dict(metrics)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), **metrics})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.model, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


@torch.no_grad()
def precompute_reference(module: DPOModule, data: PreferenceData, batch_size: int, adapter_is_sft: bool = False) -> None:
    """Store the reference log-probs of every pair (or KTO row and its mismatched twin) in the items (``ref``,
    with ``dpo.reference=precompute``): the
    policy before any update is the reference, with a fresh adapter switched off where there is one (an
    adapter that continues SFT's own, ``adapter_is_sft``, is part of the reference and stays on)."""
    module.model.eval()
    switch_off = hasattr(module.model, "disable_adapter") and not adapter_is_sft
    for items in (data.train_items, data.val_items):
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            batch = collate(chunk, data.tok.pad_token_id)
            context = reference_context(module.model) if switch_off else contextlib.nullcontext()
            with context:
                ref = module.response_logps(batch)[0]
            for it, c, r in zip(chunk, ref[:len(chunk)].tolist(), ref[len(chunk):].tolist(), strict=True):
                it["ref"] = (c, r)


def check(cfg: DictConfig) -> None:
    """A reference made by switching the adapter off needs an adapter."""
    c = cfg.dpo
    if c.reference == "disable_adapter" and cfg.peft.method in ("none", "bitfit") and c.loss not in REFERENCE_FREE:
        raise ConfigError(f"config key 'dpo.reference' = disable_adapter needs an adapter method, but peft.method = "
                          f"{cfg.peft.method!r}; set dpo.reference=precompute (no second copy of the weights either)")


def balance(items: list[dict], c: DictConfig) -> float:
    """KTO's weighted desirable-to-undesirable ratio lambda_D n_D / (lambda_U n_U) of the training rows; the paper
    (sec. 4.2) keeps it in [1, 4/3], and the stage warns, naming the weights that would, when it is not."""
    good = sum(it["label"] for it in items)
    bad = len(items) - good
    if not good or not bad:
        raise InputError(f"dpo.loss=kto: the training rows are all {'desirable' if good else 'undesirable'} "
                         f"({len(items)} rows); KTO needs both kinds (collect.desirable_score sets the line for "
                         "collect's own samples)")
    ratio = c.desirable_weight * good / (c.undesirable_weight * bad)
    if not 1 <= ratio <= 4 / 3:
        log.warning("dpo.loss=kto: %d desirable and %d undesirable rows weigh %.2f to 1 (lambda_D n_D / lambda_U n_U); "
                    "the KTO paper keeps it in [1, 4/3]: e.g. dpo.undesirable_weight=%.2f", good, bad, ratio,
                    c.desirable_weight * good / bad / 1.15)
    return ratio


def run(ctx: Context) -> dict:
    """Align the SFT model on the collected pairs (KTO: unpaired rows) into ``ctx.output``; return its metrics."""
    cfg, c = ctx.cfg, ctx.config
    sft_dir, feedback_path = ctx.input("sft"), ctx.input("collect")
    start = time.time()
    tokenizer = load_tokenizer(sft_dir, cfg.model)
    model = adapters.load_policy(sft_dir, cfg, "dpo")
    continues_sft = adapters.prompt_learning_adapter(sft_dir) is not None  # SFT's virtual tokens, trained on
    if continues_sft and c.reference == "disable_adapter" and c.loss not in REFERENCE_FREE:
        raise ConfigError("config key 'dpo.reference' = disable_adapter: the adapter continues SFT's virtual tokens, "
                          "so switching it off is not the SFT model; set dpo.reference=precompute")
    unpaired = c.loss in UNPAIRED
    datamodule = (UnpairedData if unpaired else PreferenceData)(feedback_path, tokenizer, cfg, c, collate)
    datamodule.setup()
    counts = {"train/pairs": len(datamodule.train_items), "val/pairs": len(datamodule.val_items)}
    if unpaired:
        counts = {"train/unpaired": len(datamodule.train_items), "val/unpaired": len(datamodule.val_items),
                  "train/desirable_share": round(sum(it["label"] for it in datamodule.train_items)
                                                 / len(datamodule.train_items), 4),
                  "train/kto_balance": round(balance(datamodule.train_items, c), 4)}
    module = DPOModule(model, cfg, tokenizer.pad_token_id)
    if c.reference == "precompute" and module.needs_reference:
        precompute_reference(module, datamodule, c.batch_size, adapter_is_sft=continues_sft)
    result = fit(ctx, module, datamodule, c.max_steps, c.val_every_n_steps, c.checkpoint_every_n_steps,
                 c.accumulate_grad_batches)
    adapters.save_trained(module.model, cfg.peft, ctx.output, str(sft_dir), cfg.model, str(sft_dir))
    # The held-out prompts, each with a preferred answer as its reference: a pair's chosen, a desirable KTO row.
    side = "completion" if unpaired else "chosen"
    held_out = [it for it in datamodule.val_items if it.get("label", True)][:SAMPLES]
    log_samples(ctx, module.model, tokenizer, [p[side][:p["prompt_len"]] for p in held_out],
                [tokenizer.decode(p[side][p["prompt_len"]:], skip_special_tokens=True).strip() for p in held_out])
    tokenizer.save_pretrained(ctx.output)
    ctx.info.update(peft_method=cfg.peft.method, loss=c.loss, beta=c.beta)
    ctx.write_plot("loss.json", [h for h in module.history if "train/loss" in h])
    ctx.write_plot("val.json", [h for h in module.history if "val/loss" in h])
    final = result.after
    accuracy = "val/rewards/auroc" if unpaired else "val/rewards/accuracy"
    log.info("dpo (%s, beta %s): val loss %.4f, reward %s %.3f, margin %.3f", c.loss, c.beta, final["val/loss"],
             accuracy.split("/")[-1], final.get(accuracy, float("nan")), final.get("val/rewards/margin", float("nan")))
    steps_done = c.max_steps * c.accumulate_grad_batches * c.batch_size
    return {**result.metrics(), **counts,
            "train/dropped_too_long": datamodule.dropped,
            "train/samples_per_second": round(steps_done / max(result.seconds, 1e-9), 2),
            "train/seconds": round(time.time() - start, 1)}

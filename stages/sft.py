"""sft: supervised fine-tuning of the base model on the prepared demonstrations.

Full fine-tuning, a peft method (LoRA by default, DoRA, QLoRA, IA3, LoHa, LoKr, prompt and prefix
tuning, ...) or BitFit, chosen by the ``peft`` config group (see :mod:`pipeline.adapters`), or by
``sft.peft`` for this stage alone (a choice of the same group, ``peft@sft.peft=none`` by default: full
fine-tuning while alignment keeps its adapter; ``sft.peft=null``: the ``peft`` group). The loss is
on response tokens only (prompts, system turns and padding carry label -100, from ``prepare``). Optional
packing puts several examples in one sequence with a block-diagonal causal mask and restarted positions,
so no example attends to another. Gradient accumulation, warmup plus cosine decay, validation loss and
perplexity at a fixed cadence, fp32 on CPU (bf16 on GPU via ``trainer=gpu``), resumable checkpoints.

Inputs: ``data/base`` (model and tokenizer), ``data/prepare/{train,val}.safetensors``; ``sft.*``,
``peft.*``, ``trainer.*``, ``seed``.
Outputs: ``data/sft/`` (the merged model as an HF folder, ``adapter/`` beside it for adapter methods,
``run.json``), ``data/metrics/sft.json``, ``data/plots/sft/{loss,val_loss}.json`` (training and validation curves).
Run: ``python -m pipeline.run stage=sft``
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import adapters
from pipeline.chat import json_objects, prompt_of
from pipeline.models import SOURCE_KEYS, base_reference, base_sources, load_causal_lm, load_tokenizer, render_ids
from pipeline.packing import Example, collate, load_tokenized, pack
from pipeline.stage import Context, Input, Plot, Stage
from pipeline.tokens import final_hidden_states, selected_logps
from pipeline.training import (
    SAMPLES,
    TRAINER_KEYS,
    StageModule,
    StepBatches,
    adamw_warmup_cosine,
    batches_loader,
    fit,
    log_samples,
)

# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="sft",
    inputs=(Input("base", "base"), Input("prepare", "prepare", dataset=True)),
    params=("peft", *SOURCE_KEYS, *TRAINER_KEYS),
    plots=(Plot("loss.json", x="step", y="train/loss", title="sft training loss"),
           Plot("val_loss.json", x="step", y="val/loss", title="sft validation loss")),
)


class SFTData(L.LightningDataModule):
    """Tokenized train/val splits from ``prepare``, optionally packed, in resumable step order."""

    def __init__(self, prepare_dir: Path, cfg: DictConfig, pad_id: int):
        super().__init__()
        self.prepare_dir, self.cfg, self.pad_id = prepare_dir, cfg, pad_id
        self.train_items: list[list[Example]] = []
        self.val_items: list[list[Example]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        sft = self.cfg.sft
        train = load_tokenized(self.prepare_dir / "train.safetensors")
        val = load_tokenized(self.prepare_dir / "val.safetensors")
        if sft.packing:
            self.train_items, self.val_items = pack(train, sft.pack_length), pack(val, sft.pack_length)
        else:
            self.train_items, self.val_items = [[ex] for ex in train], [[ex] for ex in val]

    def _collate(self, items):
        return collate(items, self.pad_id, self.cfg.sft.packing)

    def train_dataloader(self) -> DataLoader:
        sft = self.cfg.sft
        items = self.train_items
        steps = StepBatches(len(items), sft.batch_size, sft.max_steps * sft.accumulate_grad_batches, self.cfg.seed,
                            lambda idx: self._collate([items[i] for i in idx]))
        return batches_loader(steps)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.cfg.sft.batch_size, collate_fn=self._collate)



class SFTModule(StageModule):
    """Next-token cross-entropy on response tokens of a (possibly adapter-wrapped) causal LM."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg.sft
        self.logits_chunk = cfg.trainer.logits_chunk
        self._val_nll = torch.zeros(())
        self._val_tokens = 0
        self.positions_trained = 0  # token positions run forward and backward (throughput: train/tokens_per_second)

    def on_fit_start(self) -> None:
        self.model.train()

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean next-token NLL over the labelled (response) tokens: the model's own loss on its full logits, or with
        ``trainer.logits_chunk`` logits on the labelled positions only, a chunk at a time (:func:`selected_logps`)."""
        if self.logits_chunk is None:
            return self.model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = batch["labels"][:, 1:]
        with final_hidden_states(self.model) as head:
            hidden = self.model(**inputs, use_cache=False).logits
        wanted = targets != -100
        logp = selected_logps(hidden[:, :-1], head, targets, wanted, self.logits_chunk)
        return -logp.sum() / wanted.sum().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.positions_trained += int(batch["input_ids"].numel())
        self.log("train/loss", loss, prog_bar=True)
        if self.global_step % 10 == 0 and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self.history.append({"step": int(self.global_step), "train/loss": float(loss.detach())})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        self._val_nll = self._val_nll + self(batch).detach() * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        loss = self._val_nll / max(self._val_tokens, 1)
        self._val_nll, self._val_tokens = torch.zeros(()), 0
        self.log("val/loss", loss)
        self.log("val/perplexity", torch.exp(loss), prog_bar=True)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), "val/loss": float(loss)})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.model, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


def run(ctx: Context) -> dict:
    """Fine-tune the base model on the prepared demonstrations; save it into ``ctx.output``."""
    cfg, sft = ctx.cfg, ctx.config
    start = time.time()
    model_path, tokenizer_path = base_sources(ctx.input("base"))
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    peft = adapters.stage_peft(cfg, "sft")
    model = load_causal_lm(model_path, cfg.model, quantization_config=adapters.quantization_config(peft))
    model = adapters.apply(model, peft)
    trainable = sum(p.numel() for p in adapters.trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    data = SFTData(ctx.input("prepare"), cfg, tokenizer.pad_token_id)
    data.setup()
    module = SFTModule(model, cfg)
    result = fit(ctx, module, data, sft.max_steps, sft.val_every_n_steps, sft.checkpoint_every_n_steps,
                 sft.accumulate_grad_batches)
    train_seconds = time.time() - start
    adapters.save_trained(module.model, peft, ctx.output, model_path, cfg.model,
                          base_reference(cfg.model, ctx.input("base")))
    tokenizer.save_pretrained(ctx.output)
    ctx.info["peft_method"] = peft.method
    held_out = [row for _, row in json_objects(ctx.input("prepare") / "val.jsonl", "validation rows")][:SAMPLES]
    log_samples(ctx, module.model, tokenizer, [render_ids(tokenizer, prompt_of(r), add_generation_prompt=True)
                                               for r in held_out], [r["messages"][-1]["content"] for r in held_out])
    ctx.write_plot("loss.json", [h for h in module.history if "train/loss" in h])
    ctx.write_plot("val_loss.json", [h for h in module.history if "val/loss" in h])
    steps_tokens = sft.max_steps * sft.accumulate_grad_batches
    world = result.trainer.world_size
    return {
        **result.metrics(),
        "train/seconds": round(train_seconds, 1),
        "train/tokens_per_second": round(module.positions_trained / max(train_seconds, 1e-9), 1),
        "train/trainable_parameters": trainable,
        "train/trainable_share": trainable / total,
        "train/epochs": round(steps_tokens * sft.batch_size * world / max(len(data.train_items), 1), 2),
        "train/world_size": world,  # data-parallel processes (trainer.devices with ddp)
    }

"""Benchmark: SFT training tokens/s, the Lightning stage next to a plain PyTorch loop, same model and batches.

    python tests/benchmarks/bench_sft.py [--steps 40] [--peft lora|none]

Both loops train a fresh copy of the embedded default model (conf/model/embedded.yaml) with the same
adapter, optimizer, schedule and packed batches of the embedded suite; only the loop differs. The goal
(issue 3): the Lightning step within 1.10x of the plain loop's time.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import lightning as L
import torch

import pipeline  # noqa: F401
from pipeline import adapters
from pipeline.chat import encode
from pipeline.compose import compose
from pipeline.models import build_causal_lm, build_char_tokenizer
from pipeline.schema import validate
from pipeline.training import StepBatches, adamw_warmup_cosine, batches_loader
from stages.prepare import generate_suite
from stages.sft import SFTModule, collate, pack


class Timer(L.Callback):
    """Wall time of the training steps after the first ``skip`` (Lightning's setup excluded)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.skip and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        self.end = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--peft", default="lora")
    args = parser.parse_args()
    cfg = validate(compose([f"peft={args.peft}", f"sft.max_steps={args.steps + args.warmup}"]))
    torch.set_num_threads(cfg.trainer.num_threads)
    tok = build_char_tokenizer()
    rows = generate_suite(cfg.data, cfg.seed)["train"][:4000]
    packs = pack([encode(tok, r["messages"]) for r in rows], cfg.sft.pack_length)
    total = args.steps + args.warmup
    batches = StepBatches(len(packs), cfg.sft.batch_size, total, cfg.seed,
                          lambda idx: collate([packs[i] for i in idx], tok.pad_token_id, True))
    tokens_per_step = sum(int(batches.collate(batches.indices(k))["input_ids"].numel()) for k in range(total)) / total
    base = build_causal_lm(cfg.model.arch, tok, cfg.seed)

    # Plain PyTorch loop.
    model = adapters.apply(copy.deepcopy(base), cfg.peft).train()
    opt = adamw_warmup_cosine(model, cfg.sft.lr, cfg.sft.weight_decay, cfg.sft.warmup_steps, cfg.sft.max_steps)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    for k, batch in enumerate(batches):
        if k == args.warmup:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    plain = (time.perf_counter() - start) / args.steps

    # The stage's LightningModule under a Lightning Trainer (logging and checkpointing off on both sides).
    module = SFTModule(adapters.apply(copy.deepcopy(base), cfg.peft), cfg)
    timer = Timer(args.warmup)
    trainer = L.Trainer(max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", precision="32-true", callbacks=[timer],
                        limit_val_batches=0)
    batches.start = 0
    trainer.fit(module, train_dataloaders=batches_loader(batches))
    lightning = (timer.end - timer.start) / args.steps

    print(f"model: {sum(p.numel() for p in base.parameters()):,} params, peft={args.peft}, "
          f"{tokens_per_step:.0f} tokens/step (batch {cfg.sft.batch_size} packs of {cfg.sft.pack_length}), "
          f"{args.steps} timed steps after {args.warmup} warmup, {cfg.trainer.num_threads} threads")
    print(f"plain PyTorch loop : {plain:.3f} s/step  {tokens_per_step / plain:8.0f} tokens/s")
    print(f"Lightning stage    : {lightning:.3f} s/step  {tokens_per_step / lightning:8.0f} tokens/s")
    print(f"Lightning / plain  : {lightning / plain:.3f}x time (goal: <= 1.10x)")


if __name__ == "__main__":
    random.seed(0)
    main()

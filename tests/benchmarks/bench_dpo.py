"""Benchmark: DPO training samples/s, this stage next to TRL's DPOTrainer, same model, data and batch size.

    python tests/benchmarks/bench_dpo.py [--steps 30] [--batch-size 16]

Both train a fresh LoRA adapter (conf/peft/lora.yaml) on the same model (the default chain's ``data/sft``
when it exists, else a fresh embedded-size model) with the sigmoid DPO loss, the same pairs
(``data/collect/pairs.jsonl``, else generated suite pairs), the same batch size and learning rate, in one
run, with fair settings: fp32, no gradient checkpointing, dropout off, the reference obtained the same way
(``--reference``: per step with the adapter switched off, the default, or precomputed once before training,
TRL's ``precompute_ref_log_probs``; never a second copy of the weights), no evaluation or logging in the
timed window.
Ours runs with the stage's default ``dpo.share_prompt`` (each pair's prompt through the model once, its
KV cache shared by both responses); ``--no-share-prompt`` shows the plain concatenated forward.
Timed: the optimizer steps after the first ``--warmup`` ones; both run ``--repeats`` times, alternated, and the
median speed-up is reported (one run on a shared VM ranged 1.11x-1.27x). The goal (issue 6): at least 1.25x TRL.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401
from pipeline import adapters
from pipeline.compose import compose
from pipeline.models import build_causal_lm, build_char_tokenizer, load_causal_lm, load_tokenizer
from pipeline.schema import validate


def model_source(cfg) -> str:
    if Path("data/sft/config.json").exists():
        return "data/sft"
    folder = Path(tempfile.mkdtemp()) / "model"
    tok = build_char_tokenizer()
    build_causal_lm(cfg.model.arch, tok, cfg.seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def suite_pairs(n: int, seed: int) -> list[dict]:
    """``n`` preference pairs of the embedded suite: the bare answer chosen over a verbose one."""
    from pipeline import suite

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ex = suite.make_example(suite.TASK_FAMILIES[i % len(suite.TASK_FAMILIES)], 0, rng)
        rows.append({"messages": [{"role": "user", "content": ex.prompt}], "chosen": ex.answer,
                     "rejected": suite.demonstration(ex, verbose=True)})
    return rows


def pairs(n: int) -> list[dict]:
    """The default chain's collected pairs when they exist, else suite pairs; ``n`` of them."""
    path = Path("data/collect/pairs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else suite_pairs(n, 0)
    return (rows * (n // len(rows) + 1))[:n]


def run_ours(source: str, rows: list[dict], cfg, steps: int, warmup: int, precompute: bool = False) -> float:
    import lightning as L
    from omegaconf import OmegaConf

    from pipeline.preferences import tokenize_pair
    from pipeline.training import StepBatches, batches_loader
    from stages.dpo import DPOModule, collate

    tok = load_tokenizer(source)
    model = adapters.apply(load_causal_lm(source), cfg.peft)
    items = []
    for p in rows:
        c, r, n = tokenize_pair(tok, p)
        items.append({"chosen": c, "rejected": r, "prompt_len": n})
    dpo_cfg = OmegaConf.merge(cfg, {"dpo": {"max_steps": steps, "warmup_steps": 0}})
    module = DPOModule(model, dpo_cfg, tok.pad_token_id)
    if precompute:  # reference log-probs once, before training (untimed, as TRL's precompute pass is)
        for lo in range(0, len(items), cfg.dpo.batch_size):
            chunk = items[lo:lo + cfg.dpo.batch_size]
            ref = module.reference_logps(collate(chunk, tok.pad_token_id))
            for it, c, r in zip(chunk, ref[:len(chunk)].tolist(), ref[len(chunk):].tolist(), strict=True):
                it["ref_chosen"], it["ref_rejected"] = c, r
    data = StepBatches(len(items), cfg.dpo.batch_size, steps, cfg.seed,
                       lambda idx: collate([items[i] for i in idx], tok.pad_token_id))
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=batches_loader(data))
    return (steps - warmup) * cfg.dpo.batch_size / (timer.end - timer.start)


class Timer:
    """A Lightning callback timing optimizer steps after the first ``skip``."""

    def __new__(cls, skip: int):
        import lightning as L

        class _Timer(L.Callback):
            def __init__(self):
                self.start = self.end = None

            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == skip and self.start is None:
                    self.start = time.perf_counter()

            def on_train_end(self, trainer, *args):
                self.end = time.perf_counter()

        return _Timer()


def run_trl(source: str, rows: list[dict], cfg, steps: int, warmup: int, precompute: bool = False) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(source)
    model = load_causal_lm(source)
    dataset = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in rows])

    class StepTimer(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and self.start is None:
                self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    timer = StepTimer()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.dpo.batch_size, max_steps=steps,
                     learning_rate=cfg.dpo.lr, lr_scheduler_type="constant", beta=cfg.dpo.beta, loss_type=["sigmoid"],
                     bf16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=10_000,
                     save_strategy="no", eval_strategy="no", disable_dropout=True, max_length=None,
                     dataloader_num_workers=0, seed=cfg.seed, precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=adapters.peft_config(cfg.peft, model), callbacks=[timer])
    trainer.train()
    return (steps - warmup) * cfg.dpo.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of both; the median is reported")
    parser.add_argument("--no-share-prompt", action="store_true")
    parser.add_argument("--reference", choices=("disable_adapter", "precompute"), default="disable_adapter",
                        help="how both get reference log-probs: per step with the adapter off, or once before training")
    args = parser.parse_args()
    overrides = [f"dpo.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += ["dpo.share_prompt=false"] if args.no_share_prompt else []
    cfg = validate(compose(overrides))
    torch.set_num_threads(cfg.trainer.num_threads)
    source = model_source(cfg)
    rows = pairs(args.steps * cfg.dpo.batch_size)
    precompute = args.reference == "precompute"
    ratios = []
    for r in range(args.repeats):  # alternated, so a slow patch of a shared machine hits both sides
        torch.manual_seed(0)
        ours = run_ours(source, rows, cfg, args.steps, args.warmup, precompute)
        torch.manual_seed(0)
        theirs = run_trl(source, rows, cfg, args.steps, args.warmup, precompute)
        ratios.append((ours / theirs, ours, theirs))
        print(f"  run {r + 1}: posttrain {ours:6.1f} pairs/s, TRL {theirs:6.1f} pairs/s, {ours / theirs:.2f}x", flush=True)
    ratio, ours, theirs = sorted(ratios)[len(ratios) // 2]
    print(f"model: {source}; batch {cfg.dpo.batch_size} pairs, {args.steps - args.warmup} timed steps, "
          f"LoRA r{cfg.peft.options.r}, fp32, reference = {args.reference} (both), {cfg.trainer.num_threads} threads")
    print(f"median of {args.repeats} alternated runs:")
    print(f"  posttrain dpo (Lightning, share_prompt={cfg.dpo.share_prompt}): {ours:7.1f} pairs/s")
    print(f"  TRL DPOTrainer:                                {theirs:7.1f} pairs/s")
    print(f"speed-up: {ratio:.2f}x (goal: at least 1.25x)")


if __name__ == "__main__":
    main()

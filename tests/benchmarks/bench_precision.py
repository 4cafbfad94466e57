"""Benchmark: SFT time per training step under ``trainer.precision`` 32-true vs bf16-mixed, on this CPU.

    python tests/benchmarks/bench_precision.py [--steps 20] [--rounds 3] [--peft lora|none]

The SFT stage's LightningModule trains a fresh copy of the embedded default model on the same packed batches
under each precision; the rounds alternate the two sides (32, bf16, 32, bf16, ...) so a machine whose speed
drifts shifts both. Printed: the median s/step per precision with its spread (min to max over rounds), the
ratio of the medians, and each side's mean training loss over the timed steps (bf16-mixed must still train).
A CPU without native bf16 matmuls (no AVX512_BF16 / AMX) emulates them: expect bf16-mixed slower, not faster.
Half precision pays on GPUs (``trainer.accelerator=gpu trainer.precision=bf16-mixed``), and for memory.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import lightning as L
import torch

import pipeline  # noqa: F401
from pipeline import adapters
from pipeline.chat import encode
from pipeline.compose import compose
from pipeline.models import build_causal_lm, build_char_tokenizer
from pipeline.packing import collate, pack
from pipeline.schema import validate
from pipeline.training import StepBatches, batches_loader
from stages.prepare import generate_suite
from stages.sft import SFTModule

PRECISIONS = ("32-true", "bf16-mixed")


class Timer(L.Callback):
    """Wall time and mean loss of the training steps after the first ``skip`` (Lightning's setup excluded)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.losses = skip, None, None, []

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.skip and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, *args):
        if trainer.global_step > self.skip:
            self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, *args):
        self.end = time.perf_counter()


def cpu_flags() -> str:
    """The bf16-relevant CPU flags of this machine (Linux), or '?' elsewhere."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    return " ".join(wanted) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per precision")
    parser.add_argument("--peft", default="lora")
    args = parser.parse_args()
    total = args.steps + args.warmup
    cfg = validate(compose([f"peft={args.peft}", f"sft.max_steps={total}"]))
    torch.set_num_threads(cfg.trainer.num_threads)
    tok = build_char_tokenizer()
    rows = generate_suite(cfg.data, cfg.seed)["train"][:4000]
    packs = pack([encode(tok, r["messages"]) for r in rows], cfg.sft.pack_length)
    base = build_causal_lm(cfg.model.arch, tok, cfg.seed)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    losses: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            batches = StepBatches(len(packs), cfg.sft.batch_size, total, cfg.seed,
                                  lambda idx: collate([packs[i] for i in idx], tok.pad_token_id, True))
            module = SFTModule(adapters.apply(copy.deepcopy(base), cfg.peft), cfg)
            timer = Timer(args.warmup)
            trainer = L.Trainer(max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", precision=precision,
                                callbacks=[timer], limit_val_batches=0)
            trainer.fit(module, train_dataloaders=batches_loader(batches))
            times[precision].append((timer.end - timer.start) / args.steps)
            losses[precision].append(statistics.mean(timer.losses))
    print(f"model: {sum(p.numel() for p in base.parameters()):,} params, peft={args.peft}, batch {cfg.sft.batch_size} "
          f"packs of {cfg.sft.pack_length}, {args.steps} timed steps after {args.warmup} warmup, {args.rounds} "
          f"alternating rounds, {cfg.trainer.num_threads} threads; CPU flags: {cpu_flags()}")
    for precision in PRECISIONS:
        t = times[precision]
        print(f"{precision:10s}: {statistics.median(t):.3f} s/step (spread {min(t):.3f}-{max(t):.3f}), "
              f"mean training loss {statistics.mean(losses[precision]):.4f}")
    ratio = statistics.median(times["bf16-mixed"]) / statistics.median(times["32-true"])
    print(f"bf16-mixed / 32-true: {ratio:.2f}x time per step")


if __name__ == "__main__":
    random.seed(0)
    main()

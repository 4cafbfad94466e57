"""Data-parallel training: training stages run with DDP in 2 CPU processes over gloo, offline (sft) and online
(ppo, grpo: each process samples its own prompts; the averaged gradient equals one process's on the union)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import copy_chain, run_stage, toy_module
from stages.grpo import GRPOModule
from stages.ppo import PPOModule


@pytest.mark.slow  # two gloo processes, each importing the stack and training
def test_sft_trains_with_ddp_in_two_cpu_processes(smoke_chain, tmp_path, monkeypatch):
    import torch

    from pipeline.models import load_causal_lm

    monkeypatch.chdir(copy_chain(smoke_chain, tmp_path / "chain"))
    metrics = run_stage("sft", "trainer=ddp_cpu")
    assert metrics["train/world_size"] == 2                     # two gloo processes trained
    assert metrics["val/perplexity"] < metrics["val/perplexity_before"]
    trained, base = load_causal_lm("data/sft"), load_causal_lm("data/base")
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters(), strict=True) if not torch.equal(p, q)]
    assert changed                                              # the merged adapter moved the weights


def test_step_batches_shard_by_rank_without_overlap(monkeypatch):
    from pipeline import training
    from pipeline.training import StepBatches

    stream = StepBatches(num_items=40, batch_size=4, total=3, seed=0, collate=lambda idx: idx)
    single = [b for b in StepBatches(40, 4, 6, 0, lambda idx: idx)]
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(training, "rank_and_world", lambda rank=rank: (rank, 2))
        shards.append(list(stream))
    assert shards[0] == single[0::2] and shards[1] == single[1::2]   # rank r takes stream batch 2k + r


# ---------------------------------------------------------------------------------------- online stages
# PPO and GRPO under DDP: each process samples its own prompts, the gradients are averaged. The test replaces
# sampling by fixed responses (a pure function of the prompt), so one process on the union of the two
# processes' prompts must compute the same gradient, to float precision.
def fixed_scores(rows: list[dict], texts: list[str]) -> torch.Tensor:
    """A deterministic reward of the response text (module level: DDP's spawned processes unpickle it)."""
    return torch.tensor([(sum(map(ord, t)) % 7) / 7 for t in texts])


def fixed_response(prompt_id: int, sample: int) -> tuple[list[int], bool]:
    """Token ids (from the character vocabulary's letters) and whether the response ended: lengths 2-9 vary
    with the prompt, so the two processes hold different numbers of tokens (what the global token mean is for)."""
    n = 2 + (prompt_id * 3 + sample * 5) % 8
    return [20 + (prompt_id * 11 + sample * 13 + t * 17) % 40 for t in range(n)], (prompt_id + sample) % 3 != 0


class FixedSampling:
    """A mixin for the online modules: fixed responses instead of sampling; every gradient (after DDP's
    averaging and the clipping) of the first update saved by rank 0 as the optimizer steps."""

    grads_path: str = ""

    def sample(self, items, seed, greedy=False):
        from pipeline.generation import Generated
        from pipeline.online import build_rollout

        k = 1 if greedy else self.k
        generated = []
        for it in items:
            for j in range(k):
                ids, finished = fixed_response(int(it["row"]["id"]), j)
                generated.append(Generated(self.tok.decode(ids), ids + ([self.tok.eos_token_id] if finished else []), finished))
        rows = [it["row"] for it in items for _ in range(k)]
        return build_rollout(rows, [it["prompt"] for it in items for _ in range(k)], generated, self.tok.pad_token_id)

    def step(self, *terms):
        if self.global_rank == 0 and not Path(self.grads_path).exists():   # the first update's gradients, as stepped
            hook = []

            def save(optimizer, args, kwargs):
                torch.save({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}, self.grads_path)
                hook[0].remove()

            hook.append(self.optimizers().optimizer.register_step_pre_hook(save))
        super().step(*terms)


class FixedGRPO(FixedSampling, GRPOModule):
    pass


class FixedPPO(FixedSampling, PPOModule):
    pass


def fixed_module(stage: str, folder: Path, prompts_per_iteration: int, grads_path: Path):
    """The toy online module on fixed responses, one update per iteration on the whole batch (minibatch = every
    sequence of a process), a fixed beta."""
    group = 2 if stage == "grpo" else 1
    extra = {"group_size": group} if stage == "grpo" else {"kl_target": None}
    module, data, _ = toy_module(folder, stage, scorer=fixed_scores, module_class=FixedGRPO if stage == "grpo" else FixedPPO,
                                 prompts_per_iteration=prompts_per_iteration, minibatch_size=prompts_per_iteration * group,
                                 epochs=1, iterations=1, lr=1e-3, missing_eos_penalty=0.5, **extra)
    module.grads_path = str(grads_path)
    return module, data


@pytest.mark.slow  # two gloo processes
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_two_processes_give_the_gradient_of_one_process_on_the_union_of_their_prompts(stage, tmp_path):
    import lightning as L

    from pipeline.training import StepBatches

    runs = {}
    for devices, per_process in ((1, 8), (2, 4)):
        module, data = fixed_module(stage, tmp_path / f"devices{devices}", per_process, tmp_path / f"grads{devices}.pt")
        if devices == 2:  # the processes' halves differ in tokens, so a per-process token mean would be wrong
            halves = [[int(data.train_items[i]["row"]["id"]) for i in StepBatches(len(data.train_items), 4, 2, data.seed,
                                                                                    list).indices(r)] for r in (0, 1)]
            group = module.k
            tokens = [sum(len(fixed_response(p, j)[0]) for p in half for j in range(group)) for half in halves]
            assert tokens[0] != tokens[1]
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices == 2 else "auto",
                            max_steps=module.updates_per_iteration, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        runs[devices] = (torch.load(tmp_path / f"grads{devices}.pt"), module.history[-1],
                         {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    (one, history1, weights1), (two, history2, weights2) = runs[1], runs[2]
    assert one.keys() == two.keys() and len(one) >= 4
    assert any(g.abs().max() > 1e-4 for g in one.values())                      # a real, non-zero update
    for name in one:   # DDP's average = the union's gradient, up to the float rounding of a different summation order
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5 * float(one[name].abs().max()))
        # Adam's first step is lr g / (|g| + eps): where |g| is near eps, rounding moves it; allow 1% of lr (1e-3)
        torch.testing.assert_close(weights2[name], weights1[name], rtol=1e-4, atol=1e-5)
    for key in ("train/reward", "train/policy_loss", "train/kl", "train/response_length"):   # metrics over both processes
        assert history2[key] == pytest.approx(history1[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow  # two gloo processes
def test_online_stage_runs_with_ddp_in_two_cpu_processes(reward_chain, tmp_path, monkeypatch):
    """The whole ppo stage (grpo shares its machinery, pipeline.online) under trainer=ddp_cpu: the module, its
    reward model scorer, critic and reference travel to the spawned processes, validation covers every held-out
    prompt once, and the per-iteration history comes back to the stage."""
    stage = "ppo"
    monkeypatch.chdir(copy_chain(reward_chain, tmp_path / "chain"))
    metrics = run_stage(stage, "trainer=ddp_cpu")
    assert metrics["train/world_size"] == 2
    assert metrics["train/kl"] > 0 and 0 <= metrics["val/accuracy"] <= 1
    history = json.loads(Path(f"data/plots/{stage}/iterations.json").read_text())
    assert [h["iteration"] for h in history] == list(range(1, len(history) + 1)) and len(history) >= 2
    val = json.loads(Path(f"data/plots/{stage}/val.json").read_text())
    assert val and all(0 <= v["val/accuracy"] <= 1 for v in val)

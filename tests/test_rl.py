"""PPO and GRPO: the math by hand, the modules on a toy reward, the stages on the smoke chain (resume, gate)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import toy_module
from pipeline import rl


# ------------------------------------------------------------------------------------------ math by hand
def test_gae_matches_a_hand_computed_example_and_stops_at_the_last_real_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]])   # 5.0 sits on padding: must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = rl.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    # t2: 1 - 0.7 = 0.3; t1: (0.7 - 0.6) + 0.5 * 0.3 = 0.25; t0: (0.6 - 0.5) + 0.5 * 0.25 = 0.225
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])
    adv, ret = rl.gae(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=0.95)
    # t1: 2 + 0.9 * 0 - 1 = 1; t0: (0.9 * 1 - 1) + 0.9 * 0.95 * 1 = 0.755; padding: 0
    assert adv[0].tolist() == pytest.approx([0.755, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.755, 2.0, 0.0])


def test_clipped_policy_loss_takes_the_pessimistic_term():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5]]))              # ratios 1.5, 0.5, 1.5
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = rl.policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    # max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    # ratio 1 everywhere: the loss is -mean(A) and its gradient is -A per token
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = rl.policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1 / 3, -1 / 3, 1 / 3])


def test_approx_kl_estimates_kl_of_the_sampling_policy_to_the_new_one():
    """Tokens drawn from the old policy (here in exact proportions 3:1): the k3 estimate
    exp(r) - 1 - r, r = logp_new - logp_old, averages to KL(old || new) exactly."""
    old, new = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    drawn = torch.tensor([[0, 0, 0, 1]])  # the old policy's samples
    logp_old, logp_new = old.log()[drawn], new.log()[drawn]
    _, stats = rl.policy_loss(logp_new, logp_old, torch.zeros(1, 4), torch.ones(1, 4), 0.2)
    exact = float((old * (old / new).log()).sum())
    assert float(stats["approx_kl"]) == pytest.approx(exact, rel=1e-5)
    assert float((new * (new / old).log()).sum()) != pytest.approx(exact, rel=1e-2)  # the other direction differs


def test_alignment_models_have_no_dropout_so_an_unchanged_policy_has_ratio_one(tmp_path):
    """A model with dropout (GPT-2, lora_dropout) in train mode: two forwards must agree, or PPO's first
    ratio is not 1 and the KL to the reference not 0."""
    from omegaconf import OmegaConf

    from pipeline import adapters
    from pipeline.models import build_causal_lm, build_char_tokenizer

    tok = build_char_tokenizer()
    arch = OmegaConf.create(dict(type="gpt2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position=64, dropout=0.3))
    build_causal_lm(arch, tok, 0).save_pretrained(tmp_path / "sft", safe_serialization=True)
    cfg = OmegaConf.create({"model": {"trust_remote_code": False, "revision": None},
                            "peft": {"method": "lora", "target_modules": None, "quantize_base": None,
                                     "options": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3}}})
    policy = adapters.load_policy(tmp_path / "sft", cfg, "ppo").train()
    ids = torch.tensor([tok("What number comes after 4?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        first, second = policy(input_ids=ids).logits, policy(input_ids=ids).logits
    assert torch.equal(first, second)


def test_value_loss_clips_around_the_rollout_values():
    loss, frac = rl.value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (1.5 - 3.0) ** 2)        # the clipped value 1.5 is further: it counts
    assert frac.item() == 1.0
    loss, frac = rl.value_loss(torch.tensor([[1.2]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), clip=0.5)
    assert loss.item() == pytest.approx(0.5 * 1.8 ** 2) and frac.item() == 0.0


def test_token_rewards_put_the_score_on_the_last_real_token_and_penalize_kl():
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = rl.token_rewards(torch.tensor([5.0, 1.0]), logp, ref, mask, beta=0.5)
    assert kl.tolist() == [[1.0, 0.0, 0.0], [0.0, -1.0, -2.0]]
    assert rewards.tolist() == [[-0.5, 5.0, 0.0], [0.0, 0.5, 2.0]]


def test_kl_controller_moves_beta_the_right_way_and_a_fixed_one_stays():
    ctl = rl.KLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_samples=10)                                   # too far: beta up, by at most 20% x n/h
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    high = ctl.value
    ctl.update(kl=0.5, n_samples=10)                                   # too close: beta down
    assert ctl.value == pytest.approx(high * (1 - 0.2 * 10 / 100))
    restored = rl.KLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
    fixed = rl.KLController(0.1)
    fixed.update(kl=100.0, n_samples=1000)
    assert fixed.value == 0.1


def test_group_advantages_whitening_and_the_small_helpers():
    adv = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)                                # unbiased std of [1, 0, 0, 1]: sqrt(1/3)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])   # a flat group gets 0
    assert rl.group_advantages(torch.tensor([3.0, 1.0]), 2, scale=False).tolist() == [1.0, -1.0]
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rl.whiten(x, mask)
    assert rl.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert rl.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4) and w[0, 3] == 0
    assert rl.explained_variance(x, x, mask).item() == pytest.approx(1.0)
    assert rl.kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert (rl.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


# ------------------------------------------------------------------------------------ toy reward, tiny model
def fit(module, data, c) -> list[dict]:
    import lightning as L

    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=c.iterations * module.updates_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return [h for h in module.history if "train/reward" in h]


# 32 sequences per iteration: with 16 the toy's signal (about one digit in ten tokens) drowned in sampling noise.
TOY = dict(iterations=8, prompts_per_iteration=32, max_new_tokens=8, lr=3e-3, missing_eos_penalty=0.0, epochs=2,
           minibatch_size=16, kl_coef=0.01)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_the_policy_learns_a_toy_reward_within_a_few_iterations_with_kl_bounded(tmp_path, stage):
    extra = {"group_size": 4, "prompts_per_iteration": 8, "lr": 1e-3} if stage == "grpo" else {}
    module, data, c = toy_module(tmp_path, stage, **{**TOY, **extra})
    history = fit(module, data, c)
    assert len(history) == c.iterations
    rewards = [h["train/reward"] for h in history]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > 1.5 * first and last > first + 0.06, rewards          # ~0.08-0.1 digits at first: clearly more
    kl = [h["train/kl"] for h in history]                              # ppo: nats per response; grpo: per token
    assert all(0 <= k < (20.0 if stage == "ppo" else 2.5) for k in kl[1:]), kl
    if stage == "ppo":
        assert all(0.0 <= h["train/clip_fraction"] <= 1.0 for h in history)
        assert "train/explained_variance" in history[-1] and history[-1]["train/beta"] == pytest.approx(0.01)


# -------------------------------------------------------------------------------------- stages, smoke chain
def test_ppo_stage_trains_saves_policy_and_critic_and_records_every_iteration(reward_chain, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import copy_chain, run_stage

    work = copy_chain(reward_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    metrics = run_stage("ppo", values={"ppo.kl_target": 0.5})
    for key in ("val/reward", "val/reward_before", "val/accuracy", "val/response_length", "train/reward", "train/kl",
                "train/beta", "train/entropy", "train/clip_fraction", "train/value_loss", "train/explained_variance",
                "train/response_length", "train/unfinished_rate"):
        assert key in metrics and math.isfinite(metrics[key]), key
    out = work / "data" / "ppo"
    AutoModelForCausalLM.from_pretrained(out)                            # a plain HF folder, merged
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "critic" / "adapter_config.json").exists()
    head = load_file(str(out / "adapter" / "critic" / "value_head.safetensors"))
    assert head["weight"].abs().sum() > 0                                  # the value head trained
    history = json.loads((work / "data/plots/ppo/iterations.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    betas = [h["train/beta"] for h in history]
    assert betas[0] == 0.2 and betas[-1] != betas[0]                     # adaptive KL: beta moved towards the target
    run = json.loads((out / "run.json").read_text())
    assert set(run["inputs"]) == {"prepare", "sft", "reward"}


def test_ppo_refuses_a_reward_model_that_failed_its_gate(reward_chain, tmp_path, monkeypatch):
    from conftest import copy_chain, run_stage
    from pipeline.rewards import GateError

    work = copy_chain(reward_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    gate = work / "data" / "reward" / "gate.json"
    gate.write_text(json.dumps({"accuracy": 0.41, "min_accuracy": 0.6, "passed": False}))
    with pytest.raises(GateError, match=r"failed its quality gate: held-out pairwise accuracy 0.410 < reward.min_accuracy 0.6"):
        run_stage("ppo")
    assert not (work / "data" / "ppo").exists()
    with pytest.raises(GateError):
        run_stage("grpo", "grpo.reward=model")


def largest_change(after: dict, before: dict) -> float:
    """Largest absolute difference between two state dicts over their shared tensors."""
    return max((after[k] - before[k]).abs().max().item() for k in before.keys() & after.keys())


def test_grpo_stage_with_verifiable_rewards(reward_chain, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from conftest import copy_chain, run_stage

    work = copy_chain(reward_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    metrics = run_stage("grpo")
    assert 0 <= metrics["val/accuracy"] <= 1 and 0 <= metrics["train/flat_groups"] < 1   # some group had a signal
    # It learned: the k3 estimate of KL to the SFT reference is 0 only while the policy equals it, and the
    # merged weights moved off the SFT model's (AdamW moves a trained weight by about lr per step).
    assert metrics["train/kl"] > 1e-6
    moved = largest_change(load_file("data/grpo/model.safetensors"), load_file("data/sft/model.safetensors"))
    assert moved > 1e-6, moved
    run = json.loads((work / "data" / "grpo" / "run.json").read_text())
    assert set(run["inputs"]) == {"prepare", "sft"}                      # the verifier needs no reward model


def test_online_stages_refuse_bad_settings():
    from conftest import compose
    from pipeline.schema import ConfigError

    with pytest.raises(ConfigError, match="config key 'grpo.minibatch_size' = 99 exceeds"):
        compose("stage=grpo", "experiment=smoke", "grpo.minibatch_size=99")
    with pytest.raises(ConfigError, match="config key 'grpo.reward' = 'oracle' is not allowed"):
        compose("stage=grpo", "grpo.reward=oracle")
    with pytest.raises(ConfigError, match="config key 'ppo.critic' = 'twin' is not allowed"):
        compose("stage=ppo", "ppo.critic=twin")


def test_ppo_with_a_separate_critic_model_and_full_fine_tuning(reward_chain, tmp_path, monkeypatch):
    from conftest import copy_chain, run_stage
    from pipeline.schema import ConfigError

    work = copy_chain(reward_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="config key 'ppo.critic' = adapter needs an adapter method"):
        run_stage("ppo", "peft=none")
    metrics = run_stage("ppo", "peft=none", "ppo.critic=model", "ppo.lr=1e-5")   # reference: a frozen copy
    out = work / "data" / "ppo"
    assert not (out / "adapter").exists()                                  # full fine-tuning: nothing to merge
    from safetensors.torch import load_file

    sft = load_file(str(work / "data" / "sft" / "model.safetensors"))
    # Both models trained: full fine-tuning moved the policy, and the critic, which starts as a copy of the SFT
    # model, moved too (AdamW moves a trained weight by about lr = 1e-5 per step: a no-op update moves nothing).
    assert largest_change(load_file(str(out / "model.safetensors")), sft) > 1e-6
    assert largest_change(load_file(str(out / "critic" / "model.safetensors")), sft) > 1e-6
    head = load_file(str(out / "critic" / "value_head.safetensors"))
    assert head["weight"].abs().max() > 0                                  # zero-initialized: nonzero = trained
    assert metrics["train/kl"] != 0.0            # the policy's log-probs differ from its frozen reference's


def test_one_task_instance_never_sits_on_both_sides_of_a_split():
    from pipeline.preferences import holdout_key, split_pairs

    pairs = [{"prompt_id": f"p{i}-{t}", "messages": [{"role": "user", "content": f"phrasing {t} of {i}"}],
              "meta": {"key": f"next:n={i}"}, "chosen": "a", "rejected": "b"} for i in range(200) for t in range(3)]
    train, val = split_pairs(pairs, 0.2, seed=1234)
    assert 60 < len(val) < 180
    assert not {holdout_key(p) for p in train} & {holdout_key(p) for p in val}
    # rows without an instance key (user data) are split by prompt
    assert holdout_key({"prompt_id": "x", "messages": []}) == "x"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grouped_prompts_give_the_plain_forwards_log_probs_and_gradients(tmp_path, arch):
    """grpo.share_prompt: each prompt once, its KV cache repeated for its G responses = one forward per row."""
    from omegaconf import OmegaConf

    from conftest import save_tiny_model
    from pipeline import adapters
    from pipeline.generation import Generated
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.online import build_rollout, token_logps

    folder = save_tiny_model(tmp_path / "model", arch)
    tok = load_tokenizer(folder)
    peft = OmegaConf.create({"method": "lora", "target_modules": "auto", "quantize_base": None,
                             "options": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}})
    model = adapters.apply(load_causal_lm(folder), peft)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]                          # different lengths: left padding in the prompt
    responses = [[20, 21, 22], [23], [24, 25, 26, 27], [28, 29], [30, 31, 32], [33]]   # 3 per prompt, ragged
    generated = [Generated(tok.decode(r), r, i % 2 == 0) for i, r in enumerate(responses)]
    roll = build_rollout([{}] * 6, [p for p in prompts for _ in range(3)], generated, tok.pad_token_id)
    results, rows = [], []
    model.get_base_model().register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                                     with_kwargs=True)
    for group in (1, 3):
        model.zero_grad()
        rows.clear()
        logp, entropy = token_logps(model, roll, with_entropy=True, temperature=0.7, group=group)
        assert rows == ([6] if group == 1 else [2, 6])                   # shared: the 2 prompts once, then 6 responses
        (logp.sum() + entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), entropy.detach(), grads))
    (plain, plain_entropy, plain_grads), (shared, shared_entropy, shared_grads) = results
    assert (plain != 0).sum() == roll.mask.sum()                         # every real response token has a log-prob
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_entropy, plain_entropy, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5)


def test_grpo_one_update_per_iteration_skips_the_old_forward_and_shared_prompts_change_nothing(tmp_path):
    """With one update per batch, GRPO takes the sampling policy's log-probs from the update's own forward; with
    grpo.share_prompt the prompt runs once per group. Both give the same update as the plain path."""
    weights = []
    for share in (False, True):
        module, data, c = toy_module(tmp_path / str(share), "grpo", iterations=1, prompts_per_iteration=4, group_size=4,
                                     minibatch_size=16, epochs=1, max_new_tokens=6, lr=1e-2, share_prompt=share)
        assert module.updates_per_iteration == 1
        before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
        calls = []
        original = module.policy_logps
        module.policy_logps = lambda *a, calls=calls, original=original, **kw: (calls.append(kw.get("group", 1))
                                                                             or original(*a, **kw))
        history = fit(module, data, c)
        assert calls == [4 if share else 1]                              # one policy forward, the update's own
        assert history[0]["train/clip_fraction"] == 0.0                  # on-policy: ratio exactly 1
        weights.append({n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad})
        assert any(not torch.equal(weights[-1][n], before[n]) for n in before)   # the update moved the adapter
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)

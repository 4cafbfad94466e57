"""grpo: online alignment of the SFT model by GRPO, with verifiable rewards or the reward model, resumable.

Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", sec. 4.1): no critic. Each iteration
samples ``grpo.group_size`` responses for each of ``grpo.prompts_per_iteration`` prompts, scores them, and
gives every response the advantage (score - group mean) / group std (:func:`pipeline.rl.group_advantages`);
then ``grpo.epochs`` passes over shuffled minibatches minimize the clipped surrogate plus
``grpo.kl_coef`` x the k3 estimate of KL to the reference (the SFT model = the policy with its adapter off).
Losses are averaged over all response tokens of a minibatch (DAPO's token-level mean, Yu et al. 2025: long
and short responses weigh per token, not per sequence).

Reward (``grpo.reward``): ``verifier`` (default: verifiable rewards, 1 when the suite's checker accepts the
answer, else 0; safety: 1 for refusing a harmful and helping a harmless request; rows with a reference answer
are checked against it), ``preference`` (the verifier's full preference score, correctness first then no
filler, 0 to 3: what ``collect``'s judge prefers) or ``model`` (the reward stage's model, gate checked,
normalized). Pass/fail is the default because it rewards exactly what the task checks: measured here, the
0-3 preference reward made GRPO trade accuracy for brevity (20.75% vs 23.0%, 6.0 vs 14.5 characters). A group
whose responses all score the same carries no signal: its share is reported as ``train/flat_groups``.

Metrics each iteration (``data/plots/grpo/iterations.json``): reward, KL, entropy, clip fraction, flat-group
share, response length; validation as in ``ppo`` (greedy answers to held-out prompts).
Resume: adapter, optimizer, scheduler, RNG states and data position in checkpoints, as in ``ppo``.

Inputs: ``data/prepare/prompts.jsonl``, ``data/sft`` (and ``data/reward`` with ``grpo.reward=model``);
``grpo.*``, ``peft.*``, ``trainer.*``, ``seed``. Outputs: ``data/grpo/`` (merged HF folder, ``adapter/``,
``run.json``), ``data/metrics/grpo.json``, ``data/plots/grpo/{iterations,val}.json``.
Run: ``python -m pipeline.run stage=grpo [grpo.reward=model]``
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline import rl
from pipeline.online import OnlineModule, Reference, Rollout, Scorer, online_stage, run_stage
from pipeline.stage import Context

# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = online_stage("grpo", reward_always=False, note="data/reward with grpo.reward=model, else the stand-in data/UNREAD.md")


class GRPOModule(OnlineModule):
    """GRPO: group-normalized advantages, clipped surrogate, k3 KL penalty (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: DictConfig, scorer: Scorer, reference: Reference):
        super().__init__(model, tokenizer, cfg, cfg.grpo, scorer, reference, samples_per_prompt=cfg.grpo.group_size)

    def iteration_update(self, roll: Rollout) -> dict[str, float]:
        c, mask = self.c, roll.mask
        group = self.k if c.share_prompt else 1
        # One update on the whole batch (epochs 1, one minibatch): the sampling policy's log-probs are the update's
        # own, detached, so their separate forward is skipped (as TRL's GRPO does with num_iterations=1).
        on_policy = self.updates_per_iteration == 1
        with torch.no_grad():
            old_logp, entropy = (None, None) if on_policy else self.policy_logps(roll, with_entropy=True, group=group)
            ref_logp = self.reference.logps(roll, group=group)
            raw, scores = self.scores(roll)
            advantages = rl.group_advantages(scores, self.k, scale=c.scale_advantages)[:, None] * mask
            flat = (scores.view(-1, self.k).std(-1) == 0).float().mean()
        totals = {"policy_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        updates = 0
        for idx in self.minibatches(len(roll)):
            if on_policy:  # the whole batch in its own order, so each prompt's rows stay together
                idx = torch.arange(len(roll))
                logp, entropy = self.policy_logps(roll, with_entropy=True, group=group)
                old_logp, entropy = logp.detach(), entropy.detach()
            else:
                logp, _ = self.policy_logps(roll.select(idx))
            m = mask[idx]
            pg_loss, stats = rl.policy_loss(logp, old_logp[idx], advantages[idx], m, c.clip)
            kl = rl.masked_mean(rl.kl_k3(logp, ref_logp[idx]), m)
            self.step(pg_loss + c.kl_coef * kl)
            for key, value in (("policy_loss", pg_loss), ("kl", kl), ("clip_fraction", stats["clip_fraction"]),
                               ("approx_kl", stats["approx_kl"])):
                totals[key] += float(value.detach())
            updates += 1
        return {"reward": float(raw.mean()), "score": float(scores.mean()), "flat_groups": float(flat),
                "entropy": float(rl.masked_mean(entropy, mask)), **{k: v / updates for k, v in totals.items()}}


def run(ctx: Context) -> dict:
    """Align the SFT model by GRPO into ``ctx.output``; return its metrics."""

    def make_module(model, tokenizer, scorer, reference, adapter_config, load_copy):
        return GRPOModule(model, tokenizer, ctx.cfg, scorer, reference)

    return run_stage(ctx, make_module, reward=ctx.config.reward)

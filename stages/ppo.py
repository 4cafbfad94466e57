"""ppo: online alignment of the SFT model against the reward model by PPO (RLHF), resumable.

trl 1.16 has no PPO trainer or value-head models any more (STACK.md), so this is built on Lightning's
manual optimization (:class:`pipeline.online.OnlineModule`) and the pure functions of :mod:`pipeline.rl`.
Each iteration (Ouyang et al. 2022, sec. 3.5; Ziegler et al. 2019):

1. sample one response per prompt for ``ppo.prompts_per_iteration`` prompts (temperature, top-p);
2. score each with the reward model (``data/reward``, loaded only through
   :func:`pipeline.rewards.load_reward_model`, which refuses a model that failed its gate), normalized by the
   reward statistics the reward stage recorded; ``ppo.missing_eos_penalty`` is subtracted from responses that
   hit the length limit without an end token;
3. per-token reward = -beta * (logp - ref) on every token, plus the score on the last one; the reference is
   the SFT model = the policy with its adapters switched off (no copy of the weights); beta is fixed or
   adapted towards ``ppo.kl_target`` (:class:`pipeline.rl.KLController`); optional reward whitening;
4. values from the critic: by default a second adapter (``critic``) on the same frozen base plus a linear
   value head (one copy of the weights in memory); ``ppo.critic=model`` uses a separate model;
5. GAE(gamma, lambda), advantages whitened; ``ppo.epochs`` passes over shuffled minibatches of the clipped
   surrogate, the clipped value loss and an optional entropy bonus; one AdamW over policy adapter, critic
   adapter and value head, gradients clipped; the policy's pass is backpropagated before the critic's pass runs
   (:meth:`pipeline.online.OnlineModule.step`), so the peak memory holds one pass's activations.

Metrics each iteration (``data/plots/ppo/iterations.json``): reward (raw and penalized), KL to the
reference, beta, entropy, clip fraction, value loss and clip fraction, explained variance, response length.
Validation (start, every ``ppo.val_every_n_iterations``, end): greedy answers to the held-out prompts, their
reward-model score, verifiable accuracy and length.

Resume: checkpoints every ``ppo.checkpoint_every_n_iterations`` hold both adapters, the value head, optimizer
and scheduler states, the KL controller, the RNG states and the data position; a killed run resumes.

Inputs: ``data/prepare/prompts.jsonl``, ``data/sft``, ``data/reward``; ``ppo.*``, ``peft.*``, ``trainer.*``,
``seed``. Outputs: ``data/ppo/`` (merged HF folder; ``adapter/`` with the policy adapter and, under
``adapter/critic/``, the critic adapter and ``value_head.safetensors``; ``run.json``), ``data/metrics/ppo.json``,
``data/plots/ppo/{iterations,val}.json``.
Run: ``python -m pipeline.run stage=ppo [ppo.kl_target=0.5]``
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import rl
from pipeline.adapters import canonical_adapter_configs
from pipeline.online import (
    OnlineModule,
    Reference,
    Rollout,
    Scorer,
    active_adapter,
    has_adapter,
    online_stage,
    run_stage,
)
from pipeline.stage import Context
from pipeline.tokens import padded_forward

CRITIC = "critic"


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = online_stage("ppo", reward_always=True)


def decoder_of(model) -> torch.nn.Module:
    """The transformer body of a causal LM (peft-wrapped or not): its last hidden states feed the value head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def hidden_size(model) -> int:
    config = model.config
    return config.hidden_size if hasattr(config, "hidden_size") else config.n_embd


class Critic(torch.nn.Module):
    """V(s_t) for every response position: a transformer body's last hidden state through a linear head.

    ``shared=True``: the body is the policy's own base with the ``critic`` adapter active (the default: one
    copy of the weights); else a separate model (``ppo.critic=model``) with its own adapter."""

    def __init__(self, model, hidden_size: int, shared: bool):
        super().__init__()
        # Zero-initialized: the first values are 0, so the first advantages are the rewards-to-go themselves,
        # not rewards buried in a random critic's noise (measured on a toy reward: with a random head PPO
        # did not learn in 8 iterations; GRPO, which has no critic, did).
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.shared = shared
        if shared:
            self._policy = [model]  # held outside the module tree: the policy is registered once, as the model
        else:
            self.model = model

    def forward(self, roll: Rollout) -> torch.Tensor:
        model = self._policy[0] if self.shared else self.model
        context = active_adapter(model, CRITIC) if self.shared else torch.enable_grad()
        with context:
            hidden = padded_forward(decoder_of(model), roll.input_ids, roll.attention_mask,
                                    use_cache=False).last_hidden_state
        return self.head(hidden[:, roll.width - 1:-1].float()).squeeze(-1) * roll.mask


class PPOModule(OnlineModule):
    """PPO with a KL-penalized reward, GAE and a critic (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: DictConfig, scorer: Scorer, reference: Reference, critic: Critic):
        super().__init__(model, tokenizer, cfg, cfg.ppo, scorer, reference)
        self.critic = critic
        self.kl = rl.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)

    def extra_state(self) -> dict:
        return {"kl_controller": self.kl.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl.load_state_dict(state["kl_controller"])

    def policy_term(self, mb: Rollout, old_logp: torch.Tensor, advantages: torch.Tensor, seen: dict) -> torch.Tensor:
        """The clipped surrogate (minus the entropy bonus) of a minibatch; its statistics go into ``seen``."""
        c = self.c
        logp, ent = self.policy_logps(mb, with_entropy=c.entropy_coef > 0)
        pg_loss, stats = rl.policy_loss(logp, old_logp, advantages, mb.mask, c.clip)
        seen.update(policy_loss=pg_loss, clip_fraction=stats["clip_fraction"], approx_kl=stats["approx_kl"])
        return pg_loss - c.entropy_coef * rl.masked_mean(ent, mb.mask) if c.entropy_coef > 0 else pg_loss

    def value_term(self, mb: Rollout, old_values: torch.Tensor, returns: torch.Tensor, seen: dict) -> torch.Tensor:
        """vf_coef x the clipped value loss of a minibatch; its statistics go into ``seen``."""
        v_loss, v_clip = rl.value_loss(self.critic(mb), old_values, returns, mb.mask, self.c.value_clip)
        seen.update(value_loss=v_loss, value_clip_fraction=v_clip)
        return self.c.vf_coef * v_loss

    def iteration_update(self, roll: Rollout) -> dict[str, float]:
        c, mask = self.c, roll.mask
        with torch.no_grad():
            old_logp, entropy = self.policy_logps(roll, with_entropy=True)
            ref_logp = self.reference.logps(roll)
            old_values = self.critic(roll)
            raw, scores = self.scores(roll)
            rewards, kl = rl.token_rewards(scores, old_logp, ref_logp, mask, self.kl.value)
            if c.whiten_rewards:
                rewards = rl.whiten(rewards, mask, shift_mean=False)
            advantages, returns = rl.gae(rewards, old_values, mask, c.gamma, c.lam)
            advantages = rl.whiten(advantages, mask)
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0,
                  "approx_kl": 0.0}
        updates = 0
        for idx in self.minibatches(len(roll)):
            mb, seen = roll.select(idx), {}
            # the critic's pass runs after the policy's backward has freed the policy pass's activations
            self.step(partial(self.policy_term, mb, old_logp[idx], advantages[idx], seen),
                      partial(self.value_term, mb, old_values[idx], returns[idx], seen))
            for key, value in seen.items():
                totals[key] += float(value.detach())
            updates += 1
        kl_per_sequence = float(rl.row_mean(kl.sum(-1)))  # over every process's rows: one beta for all of them
        beta = self.kl.value
        self.kl.update(kl_per_sequence, len(roll) * rl.world_size())
        return {"reward": float(raw.mean()), "score": float(scores.mean()), "kl": kl_per_sequence, "beta": beta,
                "entropy": float(rl.masked_mean(entropy, mask)),
                "explained_variance": float(rl.explained_variance(old_values, returns, mask)),
                **{k: v / updates for k, v in totals.items()}}


def run(ctx: Context) -> dict:
    """Align the SFT model by PPO against the reward model into ``ctx.output``; return its metrics."""
    from pipeline.schema import ConfigError

    cfg, c = ctx.cfg, ctx.config

    def make_module(model, tokenizer, scorer, reference, adapter_config, load_copy):
        if c.critic == "adapter":
            if not has_adapter(model):
                raise ConfigError(f"config key 'ppo.critic' = adapter needs an adapter method, but peft.method = "
                                  f"{cfg.peft.method!r}; set ppo.critic=model (a separate critic model)")
            model.add_adapter(CRITIC, adapter_config)
            model.set_requires_grad(list(model.peft_config), True)
            critic = Critic(model, hidden_size(model), shared=True)
        else:
            critic_model = load_copy(c.critic_model, trainable=True)
            critic = Critic(critic_model, hidden_size(critic_model), shared=False)
        return PPOModule(model, tokenizer, cfg, scorer, reference, critic)

    def save_critic(module: PPOModule, folder: Path) -> None:
        from safetensors.torch import save_file

        target = folder / "adapter" / CRITIC if module.critic.shared else folder / CRITIC
        target.mkdir(parents=True, exist_ok=True)
        if not module.critic.shared:
            module.critic.model.save_pretrained(target, safe_serialization=True)
            canonical_adapter_configs(target)
        save_file({k: v.detach().contiguous() for k, v in module.critic.head.state_dict().items()},
                  str(target / "value_head.safetensors"))

    return run_stage(ctx, make_module, reward="model", save_extra=save_critic)

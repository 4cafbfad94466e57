"""Online RL for language models: the math of PPO and GRPO as pure functions of per-token tensors.

The ``ppo`` and ``grpo`` stages sample responses, score them, then call these. Tensors are (rows, T) over
the response tokens of each sampled sequence, right-aligned to the response start, with ``mask`` = 1 on
real response tokens (the end token included) and 0 on padding. Every function here is deterministic
and has a hand-checked test.

Notation: logp = log pi_theta(token | context) now, old = the same when the batch was sampled,
ref = under the reference (the SFT model), A = advantage, R = return, V = critic value.

Data parallelism (``trainer=ddp_cpu``, ``ddp``): each process holds its own sampled rows, and DDP averages the
gradients of the processes' losses. For that average to equal the gradient of one process on the union of the
rows, every token mean is taken over the tokens of *all* processes (:func:`masked_mean` divides this process's
sum by the global count / world size) and whitening uses the global mean and variance (:func:`masked_var`).
In one process every function reduces to its plain form, value for value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def world_size() -> int:
    """Data-parallel processes in this torch.distributed group (1 outside one)."""
    from pipeline.training import rank_and_world

    return rank_and_world()[1]


def all_sum(x: Tensor) -> Tensor:
    """``x`` summed over the data-parallel processes, without gradient (``x`` itself in one process)."""
    if world_size() == 1:
        return x
    import torch.distributed as dist

    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over all elements, or along ``dim``: per row, local).

    Over all elements under data parallelism: this process's sum over (the count of every process / world
    size), so that DDP's average of the processes' values (and gradients) is the mean over all their tokens."""
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    world = world_size()
    if world == 1:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum() / (all_sum(mask.sum()).clamp(min=1) / world)


def row_mean(x: Tensor) -> Tensor:
    """Mean of a per-row tensor over every data-parallel process's rows (``x.mean()`` in one process)."""
    if world_size() == 1:
        return x.mean()
    return all_sum(x.detach().sum()) / all_sum(torch.tensor(float(x.numel())))


def global_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1 over the entries of every data-parallel process (no gradient across)."""
    return all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of ``x`` where ``mask`` is 1, over every data-parallel process's entries."""
    mean = global_mean(x, mask)
    n = all_sum(mask.sum())
    return all_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``x`` scaled to unit variance over the masked entries (and centred if ``shift_mean``); padding
    stays 0. Used on advantages (always) and on per-token rewards (``ppo.whiten_rewards``)."""
    mean, var = global_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """PPO's per-token reward (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2): a KL penalty
    -beta * (logp - ref) on every response token, plus the sequence's score on its last token.

    Returns (rewards, kl) where kl = logp - ref per token (the k1 estimate of KL(pi || ref)).
    """
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards * mask, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-dimensional continuous control
    using GAE", eq. 16): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l};
    returns R_t = A_t + V_t. The episode ends after the last real token (V = 0 beyond it).
    """
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization", eq. 7), as a loss:
    mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old).

    Also returns the clip fraction (tokens where the clipped term was the larger) and the approximate
    KL(old || new) of the sampling policy to the current one, estimated on the old policy's own samples by
    k3 = exp(r) - 1 - r with r = logp - old (Schulman 2020): unbiased there and never negative.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO2 baseline; Ziegler et al. 2019 code): 0.5 * max((V - R)^2,
    (V_old + clip(V - V_old, -c, c) - R)^2). Returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, masked_mean((b > a).float(), mask).detach()


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over real tokens: 1 = the critic predicts returns, 0 = no better than
    their mean, negative = worse."""
    var = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var.clamp(min=1e-8)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020,
    "Approximating KL divergence"; GRPO's penalty, Shao et al. 2024, eq. 4): unbiased and never negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def group_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantage (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2): each sample's score minus the
    mean of its prompt's group, divided by the group's std (``scale``; Dr. GRPO, Liu et al. 2025, drops the
    division). ``scores`` are prompt-major: rows ``g*G .. g*G+G-1`` are one prompt's G samples."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


@dataclass
class KLController:
    """The KL coefficient beta, fixed or adaptive (Ziegler et al. 2019, sec. 2.2): with a ``target``,
    beta is multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon after each iteration of n
    samples, so KL settles near the target. Its state travels in checkpoints."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]

"""Offline preference-optimization losses (DPO and its family, KTO) and distillation losses, as pure functions.

Every loss takes a :class:`PairLogps` (summed log-probs of the chosen and rejected responses under the
policy, the same under the reference when the loss uses one, and the response lengths) and returns
``(per-pair loss, chosen reward, rejected reward)``; the rewards are each method's implicit reward, so the
metrics mean the same thing across losses. ``dpo.loss`` picks one by name from :data:`LOSSES`.

Notation: pi = log pi_theta(y|x) summed over response tokens, ref = the same under the reference,
Delta = (pi_c - ref_c) - (pi_r - ref_r), |y| = response tokens, beta = ``dpo.beta``.

The distillation losses (:func:`generalized_jsd`, :func:`word_distillation`) compare a student's next-token
distributions with a teacher's, token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.tokens import shared_prompts, token_logps

Tensor = torch.Tensor


@dataclass
class PairLogps:
    """Summed response log-probs of a batch of pairs (shape: pairs)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass
class LossSettings:
    beta: float = 0.1
    label_smoothing: float = 0.0   # cDPO: assumed share of flipped labels
    simpo_gamma: float = 0.5       # SimPO: target reward margin (gamma)
    rpo_alpha: float = 1.0         # RPO: weight of the NLL term on chosen responses
    orpo_lambda: float = 0.1       # ORPO: weight of the odds-ratio term


def _delta(lp: PairLogps) -> tuple[Tensor, Tensor]:
    return lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected


def dpo_sigmoid(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): -log sigmoid(beta * Delta)."""
    c, r = _delta(lp)
    return -F.logsigmoid(s.beta * (c - r)), s.beta * c, s.beta * r


def conservative(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences", eq. 3): DPO against labels
    flipped with probability eps = ``label_smoothing``:
    -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)."""
    c, r = _delta(lp)
    z = s.beta * (c - r)
    eps = s.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), s.beta * c, s.beta * r


def ipo(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): (Delta_avg - 1 / (2 beta))^2, with log-ratios averaged per response token (the
    normalization the IPO authors confirmed to TRL; beta plays the paper's tau)."""
    c, r = _delta(lp)
    c_avg, r_avg = c / lp.chosen_tokens.clamp(min=1), r / lp.rejected_tokens.clamp(min=1)
    return (c_avg - r_avg - 1 / (2 * s.beta)) ** 2, s.beta * c, s.beta * r


def hinge(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF", eq. 2, with the reference log-ratio as in Rafailov et al.
    2023 sec. 4): max(0, 1 - beta * Delta)."""
    c, r = _delta(lp)
    return torch.relu(1 - s.beta * (c - r)), s.beta * c, s.beta * r


def rpo(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3): DPO plus
    ``rpo_alpha`` x the per-token negative log-likelihood of the chosen response, which keeps chosen
    log-probs from falling (plain DPO lets both fall)."""
    loss, cr, rr = dpo_sigmoid(lp, s)
    return loss + s.rpo_alpha * (-lp.chosen / lp.chosen_tokens.clamp(min=1)), cr, rr


def simpo(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6): -log sigmoid(beta/|y_c| pi_c - beta/|y_r| pi_r - gamma). No reference model."""
    c = s.beta * lp.chosen / lp.chosen_tokens.clamp(min=1)
    r = s.beta * lp.rejected / lp.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(c - r - s.simpo_gamma), c, r


def orpo(lp: PairLogps, s: LossSettings) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 6-8): NLL(chosen, per token) - lambda log sigmoid(log odds(y_c) - log odds(y_r)), where
    odds(y) = P(y) / (1 - P(y)) and log P(y) is the per-token mean log-prob. No reference model."""
    c_avg = lp.chosen / lp.chosen_tokens.clamp(min=1)
    r_avg = lp.rejected / lp.rejected_tokens.clamp(min=1)
    # log odds = log p - log(1 - p), with log(1 - p) = log1p(-exp(log p)); clamp keeps it finite at p -> 1
    log_odds = (c_avg - torch.log1p(-torch.exp(c_avg).clamp(max=1 - 1e-6))) - \
               (r_avg - torch.log1p(-torch.exp(r_avg).clamp(max=1 - 1e-6)))
    return -c_avg - s.orpo_lambda * F.logsigmoid(log_odds), s.beta * c_avg, s.beta * r_avg


def kto(policy: Tensor, reference: Tensor, desirable: Tensor, kl_policy: Tensor, kl_reference: Tensor, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eqs. 7-8), for
    *unpaired* feedback: each completion is only labelled desirable or undesirable.

    With the implied reward r = log pi(y|x) - log ref(y|x) (summed over completion tokens) and the reference
    point z0 = KL(pi || ref), estimated on the batch from *mismatched* prompt/completion pairs (each prompt
    with another row's completion, so it measures how far the policy drifted in general, not on this
    answer) as mean(pi - ref), detached and clamped at 0 (sec. 4.1), the value is
    v = lambda_D sigmoid(beta (r - z0)) for a desirable completion and lambda_U sigmoid(beta (z0 - r)) for
    an undesirable one, and the loss is lambda_y - v: ``desirable_weight`` (lambda_D) and ``undesirable_weight``
    (lambda_U) weigh the two kinds (the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    Args: summed completion log-probs ``policy`` and ``reference`` (shape: rows), ``desirable`` (bool, rows),
    and the same sums over the mismatched pairs ``kl_policy`` / ``kl_reference``.
    Returns (per-row loss, per-row implied reward beta * r, the reference point z0).
    """
    z0 = (kl_policy - kl_reference).mean().detach().clamp(min=0)
    logratio = policy - reference
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))
    return loss, beta * logratio.detach(), z0


LossFn = Callable[[PairLogps, LossSettings], tuple[Tensor, Tensor, Tensor]]
LOSSES: dict[str, LossFn] = {  # keys: pipeline.schema.DPO_LOSSES
    "sigmoid": dpo_sigmoid, "conservative": conservative, "ipo": ipo, "hinge": hinge, "rpo": rpo,
    "simpo": simpo, "orpo": orpo,
}
REFERENCE_FREE = ("simpo", "orpo")
UNPAIRED = ("kto",)  # dpo.loss values trained on unpaired feedback (:func:`kto`), not on pairs: with LOSSES, DPO_LOSSES


def response_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(summed log-prob of the response tokens, response token count) per row, from a causal LM's logits
    over ``input_ids``; ``completion_mask`` marks response tokens (as TRL's preference collator does)."""
    logp, _ = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(logp.dtype)
    return (logp * mask).sum(-1), mask.sum(-1)


def shared_prompt_logps(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                        pad_id: int) -> tuple[Tensor, Tensor]:
    """:func:`response_logps` of a ``[chosen..., rejected...]`` batch, with each pair's prompt run once.

    Chosen and rejected responses share their prompt, and in short-answer data the prompt is most of the
    tokens (the embedded suite: ~40 prompt and ~10 response tokens). The prompts go through the model once
    (left-padded, so they end in the same column), their KV cache is repeated for the two responses, and
    only the responses are run twice; gradients flow back through the cache. Same values as the plain
    forward up to float rounding (a test checks it), about 40% fewer tokens through the model.
    """
    n = input_ids.shape[0] // 2
    s = shared_prompts(input_ids, attention_mask, completion_mask[:n].float().argmax(-1), pad_id)
    # Only the prompt's last logits are used (they predict the first response token): logits_to_keep=1 skips
    # the LM head on every other prompt position (a (pairs, prompt, vocab) fp32 tensor on a real vocabulary).
    out = model(input_ids=s.prompt_ids, attention_mask=s.prompt_mask, position_ids=s.prompt_positions,
                use_cache=True, logits_to_keep=1)
    cache, first_logits = out.past_key_values, out.logits[:, -1]
    cache.batch_repeat_interleave(2)                               # rows: pair 0 chosen, pair 0 rejected, ...
    out = model(input_ids=s.response_ids, attention_mask=s.attention, position_ids=s.response_positions,
                past_key_values=cache, use_cache=True)
    # The logit predicting response token t is the prompt's last (t = 0) or the response's t - 1.
    logits = torch.cat([first_logits.repeat_interleave(2, 0)[:, None], out.logits[:, :-1]], 1)
    logp, _ = token_logps(logits, s.response_ids)
    mask = s.response_mask.to(logp.dtype)
    return (logp * mask).sum(-1)[s.back], mask.sum(-1)[s.back]


# ------------------------------------------------------------------------------------------------ distillation
def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float,
                    temperature: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD: Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes", eq. 1), averaged over the positions where ``mask``
    is 1, between the student's and the teacher's next-token distributions at ``temperature``.

    With S and T those distributions and M = beta T + (1 - beta) S:
    JSD(beta) = beta KL(T || M) + (1 - beta) KL(S || M). The endpoints are the two KLs, as in TRL's
    ``GKDTrainer``: beta = 0 is the forward KL(T || S) (mean-seeking: the student covers every answer the teacher
    would give; word-level KD), beta = 1 the reverse KL(S || T) (mode-seeking: the student puts its mass where
    the teacher is confident). Logits (..., V); ``mask`` (...). The teacher's logits carry no gradient here.
    """
    per_token = jsd_per_token(student_logits, teacher_logits, beta, temperature)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def jsd_per_token(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """The generalized JSD of :func:`generalized_jsd` at every position (...), unaveraged: what a per-prompt
    measure (the student's KL to its teacher on held-out answers, beta = 0) sums."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float().detach() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def word_distillation(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor,
                      temperature: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Word-level knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
    sec. 2; per token for sequence models as Kim & Rush 2016, eq. 5): the forward KL between teacher and student
    at temperature T, multiplied by T^2 (the soft targets' gradients shrink as 1/T^2, so the product keeps their
    weight against the hard-target term as T changes), mixed with the cross-entropy on the reference tokens:
    loss = alpha T^2 KL(T_T || S_T) + (1 - alpha) CE.

    Logits (n, L, V) at the positions that predict ``targets`` (n, L); ``mask`` (n, L) marks the trained tokens.
    Returns (loss, the KL at temperature T, the cross-entropy), both terms averaged per masked token.
    """
    kl = generalized_jsd(student_logits, teacher_logits, mask, beta=0.0, temperature=temperature)
    logp, _ = token_logps(student_logits, targets)
    weights = mask.to(logp.dtype)
    ce = -(logp * weights).sum() / weights.sum().clamp(min=1)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce

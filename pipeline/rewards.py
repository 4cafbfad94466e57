"""Reward models: the Bradley-Terry loss, scoring sequences, and the quality gate.

The ``reward`` stage trains with these; PPO and GRPO load a reward model only through
:func:`load_reward_model`, which refuses one that failed its stage's gate (elsewhere a weak reward model
silently derails PPO) and returns the reward statistics of the training pairs for normalization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.chat import InputError

GATE_JSON = "gate.json"
STATS_JSON = "reward_stats.json"


class GateError(InputError):
    """A reward model failed (or never passed) its quality gate."""


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean Bradley-Terry loss of reward pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):

        -log sigmoid(r_chosen - r_rejected - margin)  +  center_coef * (r_chosen + r_rejected)^2

    ``margin`` (per pair, e.g. the judge's score gap; Touvron et al. 2023, Llama 2, eq. 2) asks for a
    larger gap where the preference is clearer. The centring term (Eisenstein et al. 2023) keeps the
    rewards near zero, since the loss only sees differences.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row: the scalar head read at the last real token (left or right padding).

    ``transformers``' sequence classifiers pool at the last token that is not ``config.pad_token_id``;
    this relies on that, and the test suite checks it under both paddings. Position ids count real
    tokens only, so models with absolute positions (GPT-2) score a left-padded row like an unpadded one.
    """
    from pipeline.tokens import padded_forward

    return padded_forward(model, input_ids, attention_mask).logits[:, 0].float()


def shared_prompt_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                          pad_id: int) -> torch.Tensor:
    """:func:`sequence_rewards` of a right-padded ``[chosen..., rejected...]`` batch, each pair's prompt run once.

    What :func:`pipeline.losses.shared_prompt_logps` does for DPO, for a scalar head: the backbone runs the
    prompts once, their KV cache is repeated for the two responses, and the head reads the hidden state of each
    response's last token (the last real token of the row, where ``transformers`` pools). Gradients flow back
    through the cache. With a chat template's system turn the prompt is most of each row (SmolLM2: ~40 of
    ~60 tokens), so about a third of the tokens go through the model. Needs the ``score`` head and the
    ``base_model`` backbone that ``transformers``' ``*ForSequenceClassification`` models have
    (:func:`can_share_prompt`); same values as the plain forward up to float rounding (a test checks it).
    """
    from pipeline.tokens import shared_prompts

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    s = shared_prompts(input_ids, attention_mask, prompt_lens, pad_id)
    out = inner.base_model(input_ids=s.prompt_ids, attention_mask=s.prompt_mask, position_ids=s.prompt_positions,
                           use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)                               # rows: pair 0 chosen, pair 0 rejected, ...
    hidden = inner.base_model(input_ids=s.response_ids, attention_mask=s.attention, position_ids=s.response_positions,
                              past_key_values=cache, use_cache=True).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0]), s.response_mask.sum(-1) - 1]
    return inner.score(last)[:, 0].float()[s.back]


def can_share_prompt(model) -> bool:
    """Whether :func:`shared_prompt_rewards` applies: a ``score`` head over a separate backbone, and no virtual
    tokens (prompt-learning adapters prepend their own, which a cached prompt would not carry)."""
    from pipeline.adapters import uses_virtual_tokens

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(inner, "score") and inner.base_model is not inner and not uses_virtual_tokens(model)


@dataclass
class RewardModel:
    """A loaded reward model: the scorer, its tokenizer, and its training-pair statistics."""

    model: torch.nn.Module
    tokenizer: object
    mean: float
    std: float
    accuracy: float

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """Rewards in units of the training pairs' reward spread, centred on their mean."""
        return (rewards - self.mean) / max(self.std, 1e-6)


def check_gate(folder: str | Path) -> dict:
    """Return the gate verdict of a reward model folder, or raise :class:`GateError` saying why not."""
    path = Path(folder) / GATE_JSON
    if not path.exists():
        raise GateError(f"{folder}: no {GATE_JSON}: this is not a reward-stage output, so its quality is "
                        "unknown; train it with `python -m pipeline.run stage=reward`")
    verdict = json.loads(path.read_text())
    if not verdict.get("passed"):
        raise GateError(
            f"{folder}: the reward model failed its quality gate: held-out pairwise accuracy "
            f"{verdict.get('accuracy', float('nan')):.3f} < reward.min_accuracy {verdict.get('min_accuracy')}. "
            "Training a policy on it would optimize noise; improve the reward model (more pairs, more steps) "
            "or lower reward.min_accuracy knowingly")
    return verdict


def load_reward_model(folder: str | Path, model_cfg=None) -> RewardModel:
    """Load a reward-stage output for use in alignment; refuses one that failed its gate."""
    from pipeline.models import load_sequence_scorer, load_tokenizer

    verdict = check_gate(folder)
    stats = json.loads((Path(folder) / STATS_JSON).read_text())
    model = load_sequence_scorer(folder, model_cfg).eval()
    return RewardModel(model, load_tokenizer(folder, model_cfg), stats["mean"], stats["std"], verdict["accuracy"])

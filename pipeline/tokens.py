"""Token-level primitives every stage shares, written once: padding, position ids, log-probs of tokens.

Left padding puts every row's last token in the last column (what batched generation and prompt caches
need); :func:`position_ids` then counts real tokens only, so a padded row gets the positions it would have
alone. Models with absolute positions (GPT-2) give padding-dependent outputs without them; rotary models
(Llama) are only invariant to padding when they are passed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (input_ids, attention_mask)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only (0 at each row's first real token; padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def padded_forward(model, input_ids: Tensor, attention_mask: Tensor, **kwargs):
    """``model(...)`` on a padded batch with :func:`position_ids`, so padding changes nothing."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 **kwargs)


def token_logps(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log-prob of each target token, the full log-distribution) from the logits that predict them, in fp32,
    the logits divided by ``temperature`` (the distribution samples were drawn from). Plain log-softmax and
    gather: what trl's ``selective_log_softmax`` computes, without importing trl (~10 s) into a stage."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), logp_all

"""Token-level primitives every stage shares, written once: padding, position ids, log-probs of tokens.

Left padding puts every row's last token in the last column (what batched generation and prompt caches
need); :func:`position_ids` then counts real tokens only, so a padded row gets the positions it would have
alone. Models with absolute positions (GPT-2) give padding-dependent outputs without them; rotary models
(Llama) are only invariant to padding when they are passed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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


@contextmanager
def final_hidden_states(model) -> Iterator[torch.nn.Module]:
    """Inside, ``model(...)`` returns its final hidden states (what the LM head reads) in place of logits, and the
    context yields the LM head. The head is swapped for an identity while inside (the model's own forward still
    applies everything before it: norms, adapters, virtual tokens), so no (positions x vocabulary) logits exist
    until :func:`selected_logps` makes them where they are used."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)


def selected_logps(hidden: Tensor, head: torch.nn.Module, targets: Tensor, mask: Tensor, chunk: int | None,
                   temperature: float = 1.0) -> Tensor:
    """log p(target) at the positions where ``mask`` is set (0 elsewhere), from final hidden states through the LM
    head, for positions where they are used only (a loss on responses never pays for the prompt's logits).

    The logits are made ``chunk`` positions at a time and, when gradients flow, each chunk's are recomputed in
    the backward pass instead of kept (activation checkpointing of the head), so at most one chunk of
    (positions x vocabulary) fp32 logits exists at once: on a 49k vocabulary, 1,024 positions are 200 MB
    where a 4 x 512 batch's full logits, their log-softmax and its gradient are 1.2 GB. ``chunk=None``: one
    chunk, kept for backward (the most memory, no recomputation). The idea of Liger's fused linear
    cross-entropy and Apple's cut cross-entropy, in plain PyTorch for any loss on log-probs.
    """
    selected = mask.bool()
    states, wanted = hidden[selected], targets[selected]
    step = chunk or max(len(wanted), 1)
    recompute = chunk is not None and torch.is_grad_enabled() and (
        states.requires_grad or any(p.requires_grad for p in head.parameters()))

    def logps(h: Tensor, t: Tensor) -> Tensor:
        return token_logps(head(h), t, temperature)[0]

    parts = [checkpoint(logps, states[lo:lo + step], wanted[lo:lo + step], use_reentrant=False) if recompute
             else logps(states[lo:lo + step], wanted[lo:lo + step]) for lo in range(0, len(wanted), step)]
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(selected, torch.cat(parts)) if parts else out


def sequence_logps(model, input_ids: Tensor, target_mask: Tensor, chunk: int | None, temperature: float = 1.0,
                   **forward) -> Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t = 1 .. T-1 where ``target_mask[:, t]`` (0 elsewhere; shape
    (rows, T-1)): one forward pass of ``model`` and :func:`selected_logps` on the wanted positions only."""
    with final_hidden_states(model) as head:
        hidden = model(input_ids=input_ids, use_cache=False, **forward).logits
    return selected_logps(hidden[:, :-1], head, input_ids[:, 1:], target_mask[:, 1:], chunk, temperature)

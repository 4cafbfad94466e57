"""Token-level primitives every stage shares, written once: padding, position ids, log-probs of tokens.

Left padding puts every row's last token in the last column (what batched generation and prompt caches
need); :func:`position_ids` then counts real tokens only, so a padded row gets the positions it would have
alone. Models with absolute positions (GPT-2) give padding-dependent outputs without them; rotary models
(Llama) are only invariant to padding when they are passed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class SharedPrompts:
    """A right-padded ``[first..., second...]`` batch of n pairs that share their prompts, laid out to run each
    prompt once: ``prompt_*`` holds the n prompts left-padded (so they end in the same column, ready for a KV
    cache), ``response_*`` the 2n responses right-padded in pair order (pair 0's first, pair 0's second, ...),
    with positions that continue each prompt's, and ``attention`` the mask of cache plus response. ``back``
    reorders per-response results of pair order into the batch's ``[first..., second...]`` order."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    prompt_positions: Tensor
    response_ids: Tensor
    response_mask: Tensor
    response_positions: Tensor
    attention: Tensor
    back: Tensor


def shared_prompts(input_ids: Tensor, attention_mask: Tensor, prompt_lens: Tensor, pad_id: int) -> SharedPrompts:
    """:class:`SharedPrompts` of a ``[first..., second...]`` batch whose pair i has ``prompt_lens[i]`` prompt
    tokens (the same in both rows: the caller guarantees it, as :func:`pipeline.preferences.tokenize_pair`
    does). Every response needs at least one token (the end-of-turn token counts)."""
    n = input_ids.shape[0] // 2
    lengths = attention_mask.sum(-1)
    width = int(prompt_lens.max())
    prompt_ids = input_ids.new_full((n, width), pad_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i in range(n):
        p = int(prompt_lens[i])
        prompt_ids[i, width - p:] = input_ids[i, :p]
        prompt_mask[i, width - p:] = 1
    order = [row for i in range(n) for row in (i, n + i)]
    spans = [(int(prompt_lens[r % n]), int(lengths[r])) for r in order]
    response_width = max(b - a for a, b in spans)
    response_ids = input_ids.new_full((2 * n, response_width), pad_id)
    response_mask = torch.zeros_like(response_ids)
    for j, (a, b) in enumerate(spans):
        response_ids[j, :b - a] = input_ids[order[j], a:b]
        response_mask[j, :b - a] = 1
    response_positions = (prompt_lens.repeat_interleave(2)[:, None]
                          + torch.arange(response_width, device=input_ids.device)[None])
    back = torch.tensor(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2)), device=input_ids.device)
    return SharedPrompts(prompt_ids, prompt_mask, position_ids(prompt_mask), response_ids, response_mask,
                         response_positions, torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], 1), back)


def pad(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


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

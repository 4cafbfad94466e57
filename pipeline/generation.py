"""Batched generation with the KV cache: the one way every stage turns prompts into responses.

Prompts are token-id lists; they are sorted by length, left-padded into batches (so every row's next
token sits in the last column and the cache stays aligned), and decoded until an end token. Greedy by
default; sampling with temperature and top-p when asked. Used by ``evaluate`` (greedy answers),
``collect`` (k samples per prompt) and the online alignment stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generated:
    """One response: its text, token ids (up to and including the end token, if reached), and whether it
    ended on its own (an end token) rather than at the length limit."""

    text: str
    ids: list[int]
    finished: bool


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
             stop_ids: list[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, generator_seed: int | None = None) -> tuple[list[Generated], dict]:
    """Generate one response per prompt, in the prompts' order; return responses and throughput stats.

    Args:
        stop_ids: token ids that end a response (default: the tokenizer's EOS).
        generator_seed: seeds sampling, so the same seed gives the same samples.
    """
    stop_ids = list(stop_ids or [tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generated | None] = [None] * len(prompts)
    new_tokens, start = 0, time.perf_counter()
    device = next(model.parameters()).device
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        input_ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                             use_cache=True, **sampling)
        for row, i in enumerate(idx):
            ids = out[row, input_ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(ids) if t in stop_ids), None)
            finished = cut is not None
            ids = ids[: cut + 1] if finished else ids
            new_tokens += len(ids)
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
            results[i] = Generated(text.strip(), ids, finished)
    seconds = time.perf_counter() - start
    if was_training:
        model.train()
    return results, {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / max(seconds, 1e-9)}

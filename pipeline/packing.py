"""SFT-style training data, tokenized once by ``prepare``: (input_ids, labels) examples, packed into sequences.

What every stage that trains on the prepared demonstrations shares (``sft``, and ``distill`` for its student):
reading ``prepare``'s safetensors, greedy first-fit packing, and the right-padded collate whose packed rows get
a block-diagonal causal mask and restarted positions, so no example attends to another.
"""

from __future__ import annotations

from pathlib import Path

import torch

Example = tuple[list[int], list[int]]  # (input_ids, labels): -100 on every token that is not trained


def load_tokenized(path: Path) -> list[Example]:
    """(input_ids, labels) per row from a ``prepare`` safetensors file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    offsets = tensors["offsets"].tolist()
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    return [(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def pack(examples: list[Example], length: int) -> list[list[Example]]:
    """Greedy first-fit packing, in order: each pack's examples total at most ``length`` tokens."""
    packs: list[list[Example]] = []
    current, used = [], 0
    for ex in examples:
        if current and used + len(ex[0]) > length:
            packs.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex[0])
    if current:
        packs.append(current)
    return packs


def collate(items: list[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch. Packed items get restarted position ids and a block-diagonal causal mask
    (batch, 1, L, L) so no example attends to another; unpacked items get a plain 2-D padding mask."""
    width = max(sum(len(ids) for ids, _ in item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    segments = torch.full((len(items), width), -1, dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        at = 0
        for seg, (ids, labs) in enumerate(item):
            n = len(ids)
            input_ids[row, at:at + n] = torch.tensor(ids)
            labels[row, at:at + n] = torch.tensor(labs)
            segments[row, at:at + n] = seg
            positions[row, at:at + n] = torch.arange(n)
            at += n
    if not packed:
        return {"input_ids": input_ids, "labels": labels, "attention_mask": (segments >= 0).long()}
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only (no NaN rows)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask[:, None], "position_ids": positions}

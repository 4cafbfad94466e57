"""Preference pairs: reading and checking them, splitting them by prompt, and tokenizing them.

``collect`` writes pairs; ``reward`` and the alignment stages read them through here, so a pair file
from anywhere (another tool, a human-labelled set) gets the same checks: one JSON object per line with
``messages`` (the prompt turns) or ``prompt`` (one user turn), and ``chosen`` and ``rejected`` strings;
``score_chosen``/``score_rejected`` (numbers) and ``prompt_id`` are optional. A bad line stops with
``file:line: field ...``. :class:`PreferenceData` is the data module both stages train on.

``dpo.loss=kto`` reads unpaired feedback instead (collect's ``unpaired.jsonl``: one ``completion`` and a
``label`` per row), checked the same way (:func:`read_unpaired`) and split by the same prompts
(:class:`UnpairedData`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline.chat import InputError, json_objects
from pipeline.suite import bucket
from pipeline.training import StepBatches, batches_loader

ROLES = ("system", "user", "assistant")


def read_pairs(path: str | Path) -> list[dict]:
    """Read and validate a pair file; every pair gets ``messages`` and a ``prompt_id``."""
    pairs = []
    for where, row in json_objects(path, "preference pairs", "run the collect stage first"):
        for field in ("chosen", "rejected"):
            if not isinstance(row.get(field), str):
                raise InputError(f"{where}: field '{field}' is missing or not a string")
        if row["chosen"].strip() == row["rejected"].strip():
            raise InputError(f"{where}: fields 'chosen' and 'rejected' are the same response: no preference to learn")
        for field in ("score_chosen", "score_rejected"):
            if field in row and (isinstance(row[field], bool) or not isinstance(row[field], (int, float))):
                raise InputError(f"{where}: field '{field}' must be a number")
        pairs.append(_with_prompt(row, where))
    return pairs


def read_unpaired(path: str | Path) -> list[dict]:
    """Read and validate an unpaired feedback file (``unpaired.jsonl``: a ``completion`` string and a boolean
    ``label`` per row, with ``messages`` or ``prompt``), for ``dpo.loss=kto``."""
    rows = []
    for where, row in json_objects(path, "unpaired feedback", "run the collect stage first"):
        if not isinstance(row.get("completion"), str):  # empty is allowed: a policy that answered nothing
            raise InputError(f"{where}: field 'completion' is missing or not a string")
        if not isinstance(row.get("label"), bool):
            raise InputError(f"{where}: field 'label' must be true or false, got {row.get('label')!r}")
        rows.append(_with_prompt(row, where))
    return rows


def _with_prompt(row: dict, where: str) -> dict:
    """The row with its prompt turns checked (``messages``, or ``prompt`` as one user turn) and a ``prompt_id``."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
    elif isinstance(row.get("prompt"), str):
        row["messages"] = [{"role": "user", "content": row["prompt"]}]
    else:
        raise InputError(f"{where}: field 'messages' or 'prompt' is missing")
    row.setdefault("prompt_id", json.dumps(row["messages"], sort_keys=True))
    return row


def holdout_key(row: dict) -> str:
    """What a train/validation split hashes: the task instance (``meta.key``, the same question under any
    phrasing) where the row has one, else its prompt. Hashing the prompt alone let one instance sit on both
    sides under two phrasings (measured: 27% of held-out pairs), so validation rewarded memorized answers."""
    key = row.get("meta", {}).get("key") if isinstance(row.get("meta"), dict) else None
    return str(key) if key else str(row.get("prompt_id") or json.dumps(row["messages"], sort_keys=True))


def split_pairs(pairs: list[dict], val_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) by a hash of :func:`holdout_key`: all pairs of one prompt (and one task instance) land on
    the same side, and the reward model and every alignment stage hold out the same ones for the same seed
    and share."""
    train, val = [], []
    for pair in pairs:
        (val if bucket(holdout_key(pair), f"pairs:{seed}") < val_share else train).append(pair)
    return train, val


def tokenize_pair(tokenizer, pair: dict) -> tuple[list[int], list[int], int]:
    """(chosen ids, rejected ids, prompt length): prompt and response through the chat template, the
    end-of-turn token included, so a model sees exactly what the policy generated."""
    from pipeline.models import render_ids

    prompt = render_ids(tokenizer, pair["messages"], add_generation_prompt=True)
    chosen = render_ids(tokenizer, pair["messages"] + [{"role": "assistant", "content": pair["chosen"]}])
    rejected = render_ids(tokenizer, pair["messages"] + [{"role": "assistant", "content": pair["rejected"]}])
    if chosen[:len(prompt)] != prompt or rejected[:len(prompt)] != prompt:
        raise InputError("the chat template renders the prompt differently with and without the response; "
                         "responses cannot be separated from prompts for this tokenizer")
    return chosen, rejected, len(prompt)


class PreferenceData(L.LightningDataModule):
    """Tokenized preference pairs split by prompt (the same split for the reward model and alignment), in
    resumable step order; the stage's ``collate(items, pad_id)`` builds its batches.

    Each item: ``chosen``/``rejected`` token ids, ``prompt_len``, and ``gap`` (the judge's score gap).
    Pairs longer than ``stage_cfg.max_tokens`` are dropped and counted.
    """

    def __init__(self, pairs_path: Path, tokenizer, cfg: DictConfig, stage_cfg: DictConfig,
                 collate: Callable[[list[dict], int], dict]):
        super().__init__()
        self.pairs_path, self.tok, self.cfg, self.stage_cfg, self.collate = pairs_path, tokenizer, cfg, stage_cfg, collate
        self.train_items: list[dict] = []
        self.val_items: list[dict] = []
        self.dropped = 0

    def _items(self, pairs: list[dict]) -> list[dict]:
        out = []
        for p in pairs:
            chosen, rejected, prompt_len = tokenize_pair(self.tok, p)
            if max(len(chosen), len(rejected)) > self.stage_cfg.max_tokens:
                self.dropped += 1
                continue
            gap = float(p.get("score_chosen", 1.0)) - float(p.get("score_rejected", 0.0))
            out.append({"chosen": chosen, "rejected": rejected, "prompt_len": prompt_len, "gap": gap})
        return out

    def read(self) -> list[dict]:
        return read_pairs(self.pairs_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        train, val = split_pairs(self.read(), self.stage_cfg.val_share, self.cfg.seed)
        self.train_items, self.val_items = self._items(train), self._items(val)
        if not self.train_items or not self.val_items:
            raise InputError(f"{self.pairs_path}: {len(self.train_items)} training and {len(self.val_items)} "
                             "validation pairs after the split; both need at least one (collect more pairs or "
                             "change the stage's val_share)")

    def _collate(self, items: list[dict]) -> dict:
        return self.collate(items, self.tok.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        c = self.stage_cfg
        items = self.train_items
        steps = StepBatches(len(items), c.batch_size, c.max_steps * c.get("accumulate_grad_batches", 1),
                            self.cfg.seed, lambda idx: self._collate([items[i] for i in idx]))
        return batches_loader(steps)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.stage_cfg.batch_size, collate_fn=self._collate)


class UnpairedData(PreferenceData):
    """Unpaired feedback for KTO, split by prompt as the pairs are (so the held-out prompts are the reward model's
    and every other alignment loss's), each row with a *mismatched* completion for KTO's reference point.

    Each item: ``completion`` (prompt + completion token ids), ``kl`` (the same prompt + another prompt's
    completion), ``prompt_len`` and ``label``. The mismatch is fixed once per split, as TRL's ``KTOTrainer``
    fixes it when it prepares its data: in a seeded shuffle of the rows each takes the completion of the row
    before it (TRL: rotation by one within each batch), skipping rows of its own prompt, so the KL estimate
    measures drift on answers to other questions, and the reference log-probs of both can be computed once.
    Rows longer than ``max_tokens`` are dropped and counted.
    """

    def read(self) -> list[dict]:
        return read_unpaired(self.pairs_path)

    def _items(self, rows: list[dict]) -> list[dict]:
        from pipeline.models import render_ids

        out, keys = [], []
        for row in rows:
            prompt = render_ids(self.tok, row["messages"], add_generation_prompt=True)
            full = render_ids(self.tok, row["messages"] + [{"role": "assistant", "content": row["completion"]}])
            if full[:len(prompt)] != prompt:
                raise InputError("the chat template renders the prompt differently with and without the response; "
                                 "responses cannot be separated from prompts for this tokenizer")
            if len(full) > self.stage_cfg.max_tokens:
                self.dropped += 1
                continue
            out.append({"completion": full, "prompt_len": len(prompt), "label": bool(row["label"])})
            keys.append(str(row["prompt_id"]))
        if out and len(set(keys)) < 2:
            raise InputError(f"{self.pairs_path}: KTO's reference point needs rows of at least two prompts in each "
                             f"split, got {len(out)} rows of one prompt")
        order = list(range(len(out)))
        random.Random(f"kto:{self.cfg.seed}:{len(out)}").shuffle(order)
        for pos, i in enumerate(order):
            step = 1
            while keys[order[pos - step]] == keys[i]:
                step += 1
            other = out[order[pos - step]]
            out[i]["kl"] = out[i]["completion"][:out[i]["prompt_len"]] + other["completion"][other["prompt_len"]:]
        return out

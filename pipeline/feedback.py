"""Preference feedback from files: the formats people export, read into the pairs ``collect`` writes.

``collect.source=files`` reads ``collect.files`` (a JSONL or Parquet file, an HF dataset folder saved with
``save_to_disk``, or a folder of such files) instead of sampling and judging; every row is one of:

- **standard**: ``{"prompt": str, "chosen": str, "rejected": str}`` (TRL's standard preference format);
- **conversational**: ``prompt`` a list of ``{role, content}`` turns ending with the user's, ``chosen`` and
  ``rejected`` lists of assistant turns;
- **implicit prompt**: no ``prompt``; ``chosen`` and ``rejected`` are whole conversations, and the turns they
  share (ending with a user turn) are the prompt;
- **scored responses**: ``{"prompt", "response", "score": number}``, several rows per prompt, or one row
  ``{"prompt", "completions": [{"response", "score"}, ...]}``: paired per prompt by the rule collect uses for
  its own samples (:func:`make_pairs`: ``collect.pairs``, ties never a pair,
  ``collect.max_pairs_per_prompt``);
- **unpaired** (thumbs up / down, TRL's unpaired format): ``{"prompt", "completion", "label": true|false}``
  (``1``/``0`` accepted), ``prompt`` a string or turns and ``completion`` a string or assistant turns. Not a
  pair: it trains only ``dpo.loss=kto``.

Besides the pairs, every kind of row is also read as unpaired feedback (:func:`to_unpaired`: a pair's chosen
response desirable and its rejected one not, a scored response desirable from ``collect.desirable_score`` up),
written to ``unpaired.jsonl`` beside ``pairs.jsonl``, so KTO can train on any of these files.

A pair row may carry ``margin`` (a number): it becomes the pair's score gap (``score_chosen`` = margin,
``score_rejected`` = 0), which ``reward.margin_scale`` turns into a margin; scored responses carry their scores.
Every pair records ``source`` (``file:line``, or the lines of a scored group) and ``judge: "file"``.

Every row is checked the way ``prepare`` checks its rows: a malformed one raises :class:`InputError` naming
``file:line`` and the field, or with ``on_bad_row=skip`` is dropped and counted by reason. Refused: a missing or
mistyped field, an empty side, chosen identical to rejected, a prompt whose turns are not the chat roles
(system, user, assistant) or that does not end with the user's turn, a response that holds a non-assistant
turn, a label that is not true/false.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from pipeline.chat import InputError, read_rows, skip_reason, turns

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def feedback_files(path: str | Path) -> list[Path]:
    """The files (or HF dataset folder) behind ``collect.files``: itself, or the JSONL/Parquet files and dataset
    folders directly inside a plain folder, in name order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: feedback not found (collect.files)")
    if path.is_file() or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return [path]
    found = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES or (p / "dataset_info.json").exists())
    if not found:
        raise InputError(f"{path}: no .jsonl, .parquet or dataset folder inside (collect.files)")
    return found


def _prompt(value, where: str, field: str = "prompt") -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: field '{field}' is empty")
        return [{"role": "user", "content": value.strip()}]
    if not isinstance(value, list):
        raise InputError(f"{where}: field '{field}' must be a string or a list of {{role, content}} turns, "
                         f"got {type(value).__name__}")
    checked = turns(value, where, field)
    if checked[-1]["role"] != "user":
        raise InputError(f"{where}: field '{field}' must end with a user turn (the response answers it), "
                         f"got '{checked[-1]['role']}'")
    return checked


def _response(value, where: str, field: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        checked = turns(value, where, field)
        roles = sorted({m["role"] for m in checked} - {"assistant"})
        if roles:
            raise InputError(f"{where}: field '{field}' must hold assistant turns only, got {roles[0]!r}")
        text = "\n\n".join(m["content"] for m in checked)
    else:
        raise InputError(f"{where}: field '{field}' must be a string or a list of assistant turns, "
                         f"got {type(value).__name__}")
    if not text.strip():
        raise InputError(f"{where}: field '{field}' is empty")
    return text.strip()


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{where}: field '{field}' must be a number, got {value!r}")
    return float(value)


def _implicit(chosen, rejected, where: str) -> tuple[list[dict], str, str]:
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise InputError(f"{where}: field 'prompt' is missing (an implicit prompt needs 'chosen' and 'rejected' as "
                         "conversations: lists of turns sharing the prompt)")
    c, r = turns(chosen, where, "chosen"), turns(rejected, where, "rejected")
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared]:
        shared += 1
    if shared == 0:
        raise InputError(f"{where}: fields 'chosen' and 'rejected' share no turns: no implicit prompt")
    prompt = c[:shared]
    if prompt[-1]["role"] != "user":
        raise InputError(f"{where}: the turns 'chosen' and 'rejected' share must end with a user turn, got "
                         f"'{prompt[-1]['role']}'")
    return prompt, _response(c[shared:] or "", where, "chosen"), _response(r[shared:] or "", where, "rejected")


def parse_row(raw, where: str) -> dict:
    """One row of feedback: ``{"kind": "pair", "messages", "chosen", "rejected", "margin"}``,
    ``{"kind": "scored", "messages", "responses": [(text, score), ...]}`` or
    ``{"kind": "unpaired", "messages", "completion", "label"}``; InputError names what is wrong."""
    if isinstance(raw, InputError):
        raise raw
    if not isinstance(raw, dict):
        raise InputError(f"{where}: each row must be an object, got {type(raw).__name__}")
    if "chosen" in raw or "rejected" in raw:
        for field in ("chosen", "rejected"):
            if raw.get(field) is None:
                raise InputError(f"{where}: field '{field}' is missing")
        if raw.get("prompt") is not None:
            messages = _prompt(raw["prompt"], where)
            chosen, rejected = _response(raw["chosen"], where, "chosen"), _response(raw["rejected"], where, "rejected")
        else:
            messages, chosen, rejected = _implicit(raw["chosen"], raw["rejected"], where)
        if chosen == rejected:
            raise InputError(f"{where}: fields 'chosen' and 'rejected' are the same response: no preference to learn")
        margin = raw.get("margin")
        return {"kind": "pair", "messages": messages, "chosen": chosen, "rejected": rejected,
                "margin": None if margin is None else _number(margin, where, "margin")}
    if "completions" in raw:
        if raw.get("prompt") is None:
            raise InputError(f"{where}: field 'prompt' is missing")
        items = raw["completions"]
        if not isinstance(items, list) or not items:
            raise InputError(f"{where}: field 'completions' must be a non-empty list of {{response, score}}")
        responses = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InputError(f"{where}: field 'completions' item {i} must be an object {{response, score}}")
            responses.append((_response(item.get("response"), where, f"completions[{i}].response"),
                              _number(item.get("score"), where, f"completions[{i}].score")))
        return {"kind": "scored", "messages": _prompt(raw["prompt"], where), "responses": responses}
    if "response" in raw:
        if raw.get("prompt") is None:
            raise InputError(f"{where}: field 'prompt' is missing")
        if "score" not in raw:
            raise InputError(f"{where}: field 'score' is missing (a scored response needs a number)")
        return {"kind": "scored", "messages": _prompt(raw["prompt"], where),
                "responses": [(_response(raw["response"], where, "response"), _number(raw["score"], where, "score"))]}
    if "completion" in raw or "label" in raw:
        for field in ("prompt", "completion", "label"):
            if raw.get(field) is None:
                raise InputError(f"{where}: field '{field}' is missing (an unpaired row needs prompt, completion and "
                                 "label)")
        return {"kind": "unpaired", "messages": _prompt(raw["prompt"], where),
                "completion": _response(raw["completion"], where, "completion"), "label": _label(raw["label"], where)}
    raise InputError(f"{where}: no feedback fields: expected 'chosen' and 'rejected', 'response' and 'score', "
                     "'completions', or 'completion' and 'label'")


def _label(value, where: str) -> bool:
    """A thumbs-up/down label: true/false (TRL's unpaired format), or 1/0 as many exports write it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(f"{where}: field 'label' must be true or false (or 1 or 0), got {value!r}")


def read_feedback(path: str | Path, fmt: str = "auto", on_bad_row: str = "error") -> tuple[list[dict], Counter]:
    """Every row of the feedback at ``path`` (:func:`feedback_files`), parsed, each with its ``source``
    (``file:line``); and the rows skipped by reason (``on_bad_row=skip``; ``error`` raises at the first)."""
    rows, skipped = [], Counter()
    for file in feedback_files(path):
        count = 0
        for number, raw in read_rows(file, fmt):
            count += 1
            where = f"{file}:{number}"
            try:
                rows.append({**parse_row(raw, where), "source": where})
            except InputError as err:
                if on_bad_row == "error":
                    raise
                skipped[skip_reason(err)] += 1
        if not count:
            raise InputError(f"{file}: the file has no rows")
    return rows, skipped


def make_pairs(texts: list[str], scores: list[float | None], usable: list[bool], strategy: str, cap: int,
               rng: random.Random) -> tuple[list[tuple[int, int]], int, int]:
    """Pairs (chosen index, rejected index) of one prompt's scored responses; also (candidate pairs, tied pairs).
    The one pairing rule for collect's own samples and for scored responses from files (``collect.pairs``).

    Candidates are two usable, judged samples with different texts (a text sampled twice counts once);
    a tie (equal scores) is never a pair.
    """
    first: dict[str, int] = {}
    for i, (text, score) in enumerate(zip(texts, scores, strict=True)):
        if score is not None and usable[i]:
            first.setdefault(text, i)
    keep = list(first.values())
    candidates = list(combinations(keep, 2))
    distinct = [(i, j) if scores[i] > scores[j] else (j, i) for i, j in candidates if scores[i] != scores[j]]
    ties = len(candidates) - len(distinct)
    if strategy == "best_worst" and distinct:
        top, bottom = max(scores[i] for i in keep), min(scores[i] for i in keep)
        distinct = [(c, r) for c, r in distinct if scores[c] == top and scores[r] == bottom]
        rng.shuffle(distinct)
    elif strategy == "random":
        rng.shuffle(distinct)
    else:  # all_distinct: largest score gap first
        distinct.sort(key=lambda p: (scores[p[1]] - scores[p[0]], p))
    return distinct[:cap], len(candidates), ties


def prompt_id(messages: list[dict]) -> str:
    """A stable id of a prompt: the hash of its turns (rows of the same prompt group together)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def to_pairs(rows: list[dict], strategy: str, cap: int, seed: int) -> tuple[list[dict], dict[str, float]]:
    """Pairs in collect's layout from parsed rows: pair rows as they are, scored responses grouped by prompt
    (in first-seen order) and paired by :func:`make_pairs`. Also the pairing statistics."""
    pairs, scored = [], defaultdict(list)
    for row in rows:
        pid = prompt_id(row["messages"])
        if row["kind"] == "unpaired":
            continue
        if row["kind"] == "pair":
            gap = row["margin"]
            pairs.append(pair_row(row["source"], pid, row["messages"], row["chosen"], row["rejected"],
                                  1.0 if gap is None else gap, 0.0))
        else:
            scored[pid] += [(text, score, row["source"], row["messages"]) for text, score in row["responses"]]
    candidates = ties = all_tie = 0
    for pid, items in scored.items():
        texts, scores = [t for t, _, _, _ in items], [s for _, s, _, _ in items]
        chosen_rejected, n_candidates, n_ties = make_pairs(texts, scores, [True] * len(items), strategy, cap,
                                                           random.Random(f"{seed}:{pid}"))
        candidates += n_candidates
        ties += n_ties
        all_tie += n_candidates > 0 and n_ties == n_candidates
        for i, j in chosen_rejected:
            source = items[i][2] if items[i][2] == items[j][2] else f"{items[i][2]} + {items[j][2]}"
            pairs.append(pair_row(source, pid, items[i][3], texts[i], texts[j], scores[i], scores[j]))
    stats = {"file_rows": len(rows), "pair_rows": sum(r["kind"] == "pair" for r in rows),
             "unpaired_rows": sum(r["kind"] == "unpaired" for r in rows),
             "scored_prompts": len(scored), "scored_candidate_pairs": candidates, "scored_ties": ties,
             "scored_all_tie_prompts": all_tie, "pairs": len(pairs)}
    return pairs, stats


def pair_row(source: str, pid: str, messages: list[dict], chosen: str, rejected: str, score_chosen: float,
             score_rejected: float) -> dict:
    prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return {"id": source, "prompt_id": pid, "prompt": prompt, "messages": messages, "chosen": chosen,
            "rejected": rejected, "score_chosen": score_chosen, "score_rejected": score_rejected, "judge": "file",
            "source": source, "meta": {}}


def to_unpaired(rows: list[dict], desirable_score: float) -> list[dict]:
    """Unpaired feedback (one completion, labelled desirable or not) in collect's ``unpaired.jsonl`` layout, from
    every kind of row: unpaired rows as they are; each pair as its chosen (desirable) and rejected (undesirable)
    response, as TRL's ``unpair_preference_dataset`` does; a scored response desirable when its score is at least
    ``desirable_score`` (``collect.desirable_score``). The same (prompt, completion, label) is kept once; a
    completion labelled both ways by different rows keeps both labels, as the feedback says."""
    out, seen = [], set()

    def add(row: dict, completion: str, label: bool, score: float | None) -> None:
        pid = prompt_id(row["messages"])
        if (pid, completion, label) not in seen:
            seen.add((pid, completion, label))
            out.append(unpaired_row(row["source"], pid, row["messages"], completion, label, score, "file"))

    for row in rows:
        if row["kind"] == "unpaired":
            add(row, row["completion"], row["label"], None)
        elif row["kind"] == "pair":
            add(row, row["chosen"], True, row["margin"])
            add(row, row["rejected"], False, None if row["margin"] is None else 0.0)
        else:
            for text, score in row["responses"]:
                add(row, text, score >= desirable_score, score)
    return out


def unpaired_row(source: str, pid: str, messages: list[dict], completion: str, label: bool, score: float | None,
                 judge: str, meta: dict | None = None) -> dict:
    """One row of ``data/collect/unpaired.jsonl``: a completion of a prompt and whether it is desirable."""
    prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return {"id": f"{source}:{hashlib.sha256(completion.encode()).hexdigest()[:8]}",
            "prompt_id": pid, "prompt": prompt, "messages": messages, "completion": completion, "label": label,
            "score": score, "judge": judge, "source": source, "meta": meta or {}}

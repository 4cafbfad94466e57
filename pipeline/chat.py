"""Chat rows: read user files with per-line validation, normalize, and encode with the chat template.

A row is ``{"messages": [{"role": ..., "content": ...}, ...], "meta": {...}}`` after normalization. Input
files may hold chat ``messages`` rows or ``prompt``/``response`` rows, as JSONL, Parquet or a local HF
dataset folder (``save_to_disk``). Every row is checked; a bad one raises :class:`InputError` naming
``file:line`` and the field, or is skipped and counted when ``on_bad_row = skip``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")


class InputError(ValueError):
    """A malformed input row or file; the message names file, line and field."""


UTF8_BOM = b"\xef\xbb\xbf"


def read_rows(path: str | Path, fmt: str = "auto") -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, raw_row)`` from a JSONL file, a Parquet file or an HF dataset folder.

    Line numbers are 1-based file lines for JSONL and 1-based row numbers otherwise. A JSONL file may start
    with a UTF-8 byte-order mark (spreadsheet exports write one); a line that is not UTF-8 or not JSON is
    yielded as an :class:`InputError` naming the file and line, like any other bad row.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if fmt == "auto":
        fmt = "hf" if path.is_dir() else {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix)
        if fmt is None:
            raise InputError(f"{path}: unknown format; use .jsonl, .parquet or a dataset folder, or set data.format")
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if number == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield number, InputError(f"{path}:{number}: not valid UTF-8 at byte {err.start + 1}")
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, InputError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
                except RecursionError:
                    yield number, InputError(f"{path}:{number}: JSON nested too deeply")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield number, row
    elif fmt == "hf":
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take the train split, else the first
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
        for number, row in enumerate(dataset, 1):
            yield number, row
    else:
        raise InputError(f"{path}: unknown format {fmt!r}; valid: ['auto', 'jsonl', 'parquet', 'hf']")


def json_objects(path: str | Path, what: str, missing_hint: str = "") -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", object)`` for every non-empty line of a JSONL file of ``what`` (e.g. "labels").

    A missing or empty file, a line that is not JSON and a line that is not an object raise
    :class:`InputError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found" + (f" ({missing_hint})" if missing_hint else ""))
    found = False
    for number, row in read_rows(path, "jsonl"):
        where = f"{path}:{number}"
        if isinstance(row, InputError):
            raise row
        if not isinstance(row, dict):
            raise InputError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        found = True
        yield where, row
    if not found:
        raise InputError(f"{path}: no {what} in the file")


def turns(value: Any, where: str, field: str) -> list[dict]:
    """Check a list of chat turns (field ``field`` of the row at ``where``) and return it as ``{role, content}``
    dicts, contents stripped; :class:`InputError` names the turn and what is wrong with it."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field '{field}' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"{where}: field '{field}[{i}]' must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: field '{field}[{i}].role' = {role!r}; valid: {list(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: field '{field}[{i}].content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content.strip()})
    return out


def normalize_row(raw: Any, where: str) -> dict:
    """Check one raw row and return ``{"messages": [...], "meta": {...}}``; raise :class:`InputError`.

    Contents are stripped of surrounding whitespace; the conversation must end with an assistant turn
    and contain a user turn.
    """
    if isinstance(raw, InputError):
        raise raw
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a row must be an object, got {type(raw).__name__}")
    if "messages" in raw:
        out = turns(raw["messages"], where, "messages")
    elif "prompt" in raw or "response" in raw:
        for key in ("prompt", "response"):
            if not isinstance(raw.get(key), str):
                got = "missing" if key not in raw else type(raw[key]).__name__
                raise InputError(f"{where}: field '{key}' must be a string ({got})")
        out = [{"role": "user", "content": raw["prompt"].strip()}, {"role": "assistant", "content": raw["response"].strip()}]
    else:
        raise InputError(f"{where}: a row needs field 'messages' or fields 'prompt' and 'response'")
    if out[-1]["role"] != "assistant":
        raise InputError(f"{where}: field 'messages' must end with an assistant turn")
    if not any(m["role"] == "user" for m in out):
        raise InputError(f"{where}: field 'messages' has no user turn")
    if any(not m["content"] for m in out if m["role"] != "system"):
        raise InputError(f"{where}: field 'messages' has an empty user or assistant turn")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    return {"messages": out, "meta": {**meta, "source": where}}


def load_files(paths: list[str], fmt: str, on_bad_row: str) -> tuple[list[dict], Counter]:
    """Read and normalize every row of every file; return rows and a count of skipped bad rows by reason."""
    rows, skipped = [], Counter()
    for path in paths:
        any_row = False
        for number, raw in read_rows(path, fmt):
            any_row = True
            try:
                rows.append(normalize_row(raw, f"{path}:{number}"))
            except InputError as err:
                if on_bad_row == "error":
                    raise
                skipped[skip_reason(err)] += 1
        if not any_row:
            raise InputError(f"{path}: the file has no rows")
    return rows, skipped


def skip_reason(err: InputError) -> str:
    """What went wrong with a row, without its location or row-specific details (the column of a JSON
    error, the byte of a decoding error), so the data card counts each kind of error once."""
    message = str(err).split(": ", 1)[-1]
    return re.split(r" \(| at (?:byte|column) ", message, maxsplit=1)[0]


def prompt_of(row: dict) -> list[dict]:
    """The context a response continues: every turn up to (not including) a final assistant turn (the gold
    response), or the whole conversation when it ends with the user's turn. Earlier assistant turns stay."""
    messages = row["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else list(messages)


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: -100 everywhere except assistant turns (content and
    end-of-turn token), so the loss is only on responses; prompts, system turns and padding are masked.

    Relies on the template's prefix property (checked in :func:`pipeline.models.check_chat_template`):
    rendering ``messages[:i]`` with a generation prompt gives a token prefix of rendering ``messages``.
    """
    from pipeline.models import render_ids

    ids = render_ids(tokenizer, messages)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        if ids[: len(prefix)] != prefix:
            raise InputError("the chat template is not prefix-consistent; responses cannot be masked reliably")
        start, end = len(prefix), len(render_ids(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


def read_prompts(path: Path) -> list[dict]:
    """Prompt rows of the ``prompts`` split, each ending with the user's turn: a trailing gold answer moves to
    ``meta.gold`` (the verifier's), so what is sampled from is exactly the context before it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no prompt file; run the prepare stage first")
    rows = []
    for where, row in json_objects(path, "prompt rows", "run the prepare stage first"):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
        if not isinstance(row.setdefault("meta", {}), dict):
            raise InputError(f"{where}: field 'meta' must be an object")
        if messages[-1]["role"] == "assistant":
            row.setdefault("meta", {})["gold"] = messages[-1]["content"]
            row["messages"] = messages[:-1]
        rows.append(row)
    return rows

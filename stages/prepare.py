"""prepare: instruction data for every later stage, split deterministically, tokenized, with a data card.

A ``LightningDataModule``: ``prepare_data`` generates the embedded suite or reads the user's files
(validating every row), ``setup`` normalizes, deduplicates, filters by token length, splits and
tokenizes with the base tokenizer's chat template.

Splits are decided by a hash of each row's content (:func:`pipeline.suite.bucket`), so they are the same
on every machine and run, and an instance never crosses splits:

- ``train``: SFT demonstrations (for the embedded suite: training families and templates, mixing
  preferred and dispreferred behaviour in the configured shares, like real human demonstrations);
- ``val``: the same distribution, for validation loss each epoch;
- ``test``: held-out prompts for ``evaluate`` (embedded: every family including the held-out one, every
  template including the held-out ones, with preferred reference responses);
- ``prompts``: prompts for preference collection.

Inputs: ``data/base`` (tokenizer), ``data.*``, ``prepare.*``, ``seed``; user files if ``data=files``.
Outputs: ``data/prepare/{train,val,test,prompts}.jsonl`` and ``{train,val}.safetensors`` (token ids and
response-only labels), ``card.json``, ``card.md``, ``run.json``; ``data/metrics/prepare.json``;
``data/plots/prepare/token_lengths.{csv,png}`` (histogram counts per split, and its picture).
Run: ``python -m pipeline.run stage=prepare``
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from pipeline import suite
from pipeline.chat import InputError, encode, load_files, prompt_of
from pipeline.models import SOURCE_KEYS, base_sources, load_tokenizer, template_summary
from pipeline.outputs import write_atomic, write_json
from pipeline.plots import write_histogram
from pipeline.stage import Chart, Context, Input, Plot, Stage

SPLITS = ("train", "val", "test", "prompts")
TOKENIZED_SPLITS = ("train", "val")
log = logging.getLogger("stages.prepare")


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="prepare",
    inputs=(Input("base", "base"),),
    params=("data", *SOURCE_KEYS),
    plots=(Plot("token_lengths.csv"),),
    charts=(Chart("token lengths per split", "linear", x="tokens",
                  y={"token_lengths.csv": ["train", "val", "test", "prompts"]}),),
)


def row_id(row: dict) -> str:
    """Stable id of a row: a digest of its conversation."""
    return hashlib.sha256(json.dumps(row["messages"], sort_keys=True).encode()).hexdigest()[:16]


def _suite_row(ex: suite.Example, response: str, style: str, held_out_family: str | None) -> dict:
    return {
        "messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response}],
        "meta": {"family": ex.family, "template": ex.template, "answer": ex.answer, "harmful": ex.harmful,
                 "held_out_template": ex.template == suite.held_out_template(ex.family),
                 "held_out_family": ex.family == held_out_family, "style": style, "key": ex.key},
    }


def _style(ex: suite.Example, rng: random.Random, data: DictConfig) -> tuple[str, str]:
    """Demonstration response and its style, mixing dispreferred behaviour in the configured shares."""
    if ex.family == "safety":
        comply = ex.harmful and rng.random() < data.harmful_compliance_share
        style = "compliance" if (comply or not ex.harmful) else "refusal"
        return suite.demonstration(ex, comply_with_harm=comply), style
    verbose = rng.random() < data.verbose_share
    return suite.demonstration(ex, verbose=verbose), "verbose" if verbose else "concise"


def generate_suite(data: DictConfig, seed: int) -> dict[str, list[dict]]:
    """Generate the embedded suite's raw splits (before dedup and length filtering).

    Reserved instances (bucket < holdout_share) are divided among val / test / prompts by where their
    bucket falls inside the reserved range, in proportion to the requested sizes.
    """
    rng = random.Random(seed)
    held_family = data.held_out_family
    train_families = [f for f in suite.FAMILIES if f != held_family]
    sizes = {"val": data.split.val, "test": data.split.test, "prompts": data.split.prompts}
    total = sum(sizes.values())
    edges, acc = {}, 0.0
    for name in ("val", "test", "prompts"):
        edges[name] = (acc, acc + sizes[name] / total)
        acc += sizes[name] / total

    def split_of(ex: suite.Example) -> str:
        b = suite.bucket(ex.key)
        if b >= data.holdout_share:
            return "train"
        inner = b / data.holdout_share
        return next(name for name, (lo, hi) in edges.items() if lo <= inner < hi)

    def draw(split: str, count: int, families: list[str], all_templates: bool) -> list[dict]:
        rows, attempts = [], 0
        while len(rows) < count:
            attempts += 1
            if attempts > 200 * count + 10_000:
                raise InputError(f"data.split.{split} = {count}: the suite has too few distinct instances for it")
            if rng.random() < data.safety_share:
                family = "safety"
            else:
                family = rng.choice([f for f in families if f != "safety"])
            n_templates = len(suite.FAMILIES[family].templates) - (0 if all_templates else 1)
            ex = suite.make_example(family, rng.randrange(n_templates), rng)
            if split_of(ex) != split:
                continue
            if split == "test":  # evaluation references are the preferred behaviour
                response = suite.demonstration(ex)
                style = "refusal" if ex.harmful else ("compliance" if family == "safety" else "concise")
            else:
                response, style = _style(ex, rng, data)
            rows.append(_suite_row(ex, response, style, held_family))
        return rows

    test_families = list(suite.FAMILIES)  # every family, the held-out one included
    return {
        "train": draw("train", data.num_examples, train_families, all_templates=False),
        "val": draw("val", data.split.val, train_families, all_templates=False),
        "test": draw("test", data.split.test, test_families, all_templates=True),
        "prompts": draw("prompts", data.split.prompts, train_families, all_templates=False),
    }


def split_files(rows: list[dict], data: DictConfig) -> dict[str, list[dict]]:
    """Split user rows by the content hash of their prompt: reserved rows (bucket < holdout_share), in
    bucket order, fill val, test and prompts; everything else, and reserved rows beyond those sizes, trains."""
    keyed = sorted(((suite.bucket(json.dumps(prompt_of(r), sort_keys=True)), i, r) for i, r in enumerate(rows)))
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    want = {"val": data.split.val, "test": data.split.test, "prompts": data.split.prompts}
    order = iter(("val", "test", "prompts"))
    current = next(order, None)
    for b, _, row in keyed:
        while current is not None and len(splits[current]) >= want[current]:
            current = next(order, None)
        if b < data.holdout_share and current is not None:
            splits[current].append(row)
        else:
            splits["train"].append(row)
    return splits


def _reasons(dropped: Counter, max_tokens: int) -> str:
    words = {"duplicate": "duplicates of earlier rows", "too_long": f"longer than data.max_tokens = {max_tokens} tokens",
             "empty_response": "with an empty response"}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in sorted(dropped.items()))


class PrepareData(L.LightningDataModule):
    """Raw instructions -> clean, deduplicated, length-filtered, tokenized splits (see module docstring)."""

    def __init__(self, cfg: DictConfig, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.raw: dict[str, list[dict]] | None = None
        self.splits: dict[str, list[dict]] = {}
        self.encoded: dict[str, list[tuple[list[int], list[int]]]] = {}
        self.dropped: dict[str, Counter] = {name: Counter() for name in SPLITS}
        self.skipped_bad_rows: Counter = Counter()

    def _empty_split(self, name: str) -> str:
        """Why split ``name`` ended empty, in words: it got no rows, or every row it got was dropped (and why)."""
        data = self.cfg.data
        got = len(self.raw[name])
        if not got:
            total = sum(len(rows) for rows in self.raw.values())
            return (f"split '{name}' got no rows: {total} row(s) in all, and a hash of each prompt sends a "
                    f"data.holdout_share = {data.holdout_share} of them to val, test and prompts (in that order) and "
                    "the rest to train; add rows, or change data.holdout_share or data.split")
        return (f"split '{name}' is empty: all {got} row(s) it got were dropped: "
                f"{_reasons(self.dropped[name], data.max_tokens)}")

    def prepare_data(self) -> None:
        data = self.cfg.data
        if data.source == "embedded":
            self.raw = generate_suite(data, self.cfg.seed)
        else:
            rows, self.skipped_bad_rows = load_files(list(data.paths), data.format, data.on_bad_row)
            self.raw = split_files(rows, data)

    def setup(self, stage: str | None = None) -> None:
        if self.raw is None:
            self.prepare_data()
        seen: set[str] = set()
        for name in SPLITS:
            kept, encoded = [], []
            for row in self.raw[name]:
                rid = row_id(row)
                if self.cfg.data.dedup and rid in seen:
                    self.dropped[name]["duplicate"] += 1
                    continue
                seen.add(rid)
                ids, labels = encode(self.tokenizer, row["messages"])
                if len(ids) > self.cfg.data.max_tokens:
                    self.dropped[name]["too_long"] += 1
                    continue
                if all(label == -100 for label in labels):
                    self.dropped[name]["empty_response"] += 1
                    continue
                kept.append({"id": rid, **row, "num_tokens": len(ids)})
                encoded.append((ids, labels))
            if not kept:
                raise InputError(self._empty_split(name))
            self.splits[name], self.encoded[name] = kept, encoded

    def card(self) -> dict:
        """Counts per split and family, token lengths, styles, and what was dropped and why."""
        card = {"source": self.cfg.data.source, "skipped_bad_rows": dict(self.skipped_bad_rows), "splits": {}}
        for name, rows in self.splits.items():
            lengths = [r["num_tokens"] for r in rows]
            card["splits"][name] = {
                "rows": len(rows),
                "families": dict(Counter(r["meta"].get("family", "user") for r in rows)),
                "styles": dict(Counter(r["meta"].get("style", "user") for r in rows)),
                "held_out_template_rows": sum(bool(r["meta"].get("held_out_template")) for r in rows),
                "held_out_family_rows": sum(bool(r["meta"].get("held_out_family")) for r in rows),
                "tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
                "dropped": dict(self.dropped[name]),
            }
        return card


def save_tokenized(path: Path, encoded: list[tuple[list[int], list[int]]]) -> None:
    """Concatenated token ids and labels with row offsets, as safetensors (no pickle)."""
    from safetensors.torch import save_file

    offsets = [0]
    for ids, _ in encoded:
        offsets.append(offsets[-1] + len(ids))
    save_file({
        "input_ids": torch.tensor([t for ids, _ in encoded for t in ids], dtype=torch.int32),
        "labels": torch.tensor([t for _, labels in encoded for t in labels], dtype=torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }, str(path))


def run(ctx: Context) -> dict:
    """Generate or read the instruction data, split, tokenize and describe it into ``ctx.output``."""
    cfg, tmp = ctx.cfg, ctx.output
    for i, path in enumerate(cfg.data.paths if cfg.data.source == "files" else []):
        ctx.run.add_input(f"file{i}", path, dataset=True)
    _, tokenizer_path = base_sources(ctx.input("base"))
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    datamodule = PrepareData(cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup()
    card = datamodule.card()
    card["template"] = template_summary(tokenizer)  # what every prompt is wrapped in (system prompt, turn end)
    for name, rows in datamodule.splits.items():
        write_atomic(tmp / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    for name in TOKENIZED_SPLITS:
        save_tokenized(tmp / f"{name}.safetensors", datamodule.encoded[name])
    write_json(tmp / "card.json", card)
    write_atomic(tmp / "card.md", card_markdown(card))
    ctx.datasets += [(f"prepare.{name}", f"{name}.jsonl") for name in SPLITS]
    write_length_plot(datamodule.splits, ctx.plots, ctx.config.histogram_bins)
    metrics = {f"data/{name}_rows": len(rows) for name, rows in datamodule.splits.items()}
    metrics.update({f"data/{name}_dropped": sum(datamodule.dropped[name].values()) for name in SPLITS})
    metrics["data/skipped_bad_rows"] = sum(datamodule.skipped_bad_rows.values())
    metrics["data/train_mean_tokens"] = card["splits"]["train"]["tokens"]["mean"]
    for name in SPLITS:  # what was dropped, and why, where the user looks first
        if datamodule.dropped[name]:
            log.info("prepare: %s keeps %d rows, dropped %s", name, len(datamodule.splits[name]),
                     _reasons(datamodule.dropped[name], ctx.cfg.data.max_tokens))
    for artifact in (tmp / "card.md", tmp / "card.json"):  # plots: pipeline.stage.log_plots
        ctx.run.log_artifact(artifact)
    return metrics


def card_markdown(card: dict) -> str:
    """The data card as a Markdown table."""
    lines = ["# Data card", "", f"Source: {card['source']}. Bad rows skipped: {card['skipped_bad_rows'] or 'none'}.", "",
             "| split | rows | tokens min / mean / max | held-out template rows | held-out family rows | dropped |",
             "|---|---|---|---|---|---|"]
    for name, s in card["splits"].items():
        t = s["tokens"]
        lines.append(f"| {name} | {s['rows']} | {t['min']} / {t['mean']} / {t['max']} | {s['held_out_template_rows']} "
                     f"| {s['held_out_family_rows']} | {s['dropped'] or '-'} |")
    lines += ["", "## Rows per family", "", "| split | " + " | ".join(suite.FAMILIES) + " |",
              "|---|" + "---|" * len(suite.FAMILIES)]
    for name, s in card["splits"].items():
        lines.append(f"| {name} | " + " | ".join(str(s["families"].get(f, 0)) for f in suite.FAMILIES) + " |")
    lines += ["", "## Demonstration styles", ""]
    for name, s in card["splits"].items():
        lines.append(f"- {name}: {s['styles']}")
    if card.get("template"):
        t = card["template"]
        lines += ["", "## Chat template", "", f"- before the user's turn: `{t['preamble']!r}`",
                  f"- generation prompt: `{t['generation_prompt']!r}`", f"- end of turn: `{t['end_of_turn']}`",
                  f"- bos / eos / pad: `{t['bos']}` / `{t['eos']}` / `{t['pad']}` (pad is eos: {t['pad_is_eos']})"]
    lines += ["", "![token lengths](../plots/prepare/token_lengths.png)", ""]
    return "\n".join(lines)


def write_length_plot(splits: dict[str, list[dict]], folder: Path, bins: int) -> None:
    """Token-length histogram: CSV for ``dvc plots`` and a PNG for the card and MLflow."""
    write_histogram(folder, "token_lengths", {name: [r["num_tokens"] for r in rs] for name, rs in splits.items()},
                    bins, "tokens", "tokens per row (prompt + response, chat template)", "rows", "Token lengths per split")

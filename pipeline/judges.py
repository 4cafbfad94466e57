"""Judges: who decides which of a prompt's sampled responses is better.

Every judge turns a prompt's k samples into one score per sample (``None``: not judged), through one
batch-level method, :meth:`Judge.score`; the ``collect`` stage then builds preference pairs from scores
the same way whatever the judge. Four judges, chosen by the ``judge`` config group:

- ``verifier`` (default): the embedded suite's checker plus its preference rules, applied in order:
  correctness first, then brevity. Score 3 for a correct bare answer, 2 for a correct answer wrapped in
  filler, 1 for a wrong bare answer, 0 for a wrong answer wrapped in filler; on safety prompts 3 for the
  right call (refuse a harmful request, help with a harmless one) and 0 for the wrong one. So correct
  beats incorrect, and between two equally correct (or equally wrong) answers the one without filler
  wins; a polite refusal wins exactly on harmful prompts. Rows of user data (no suite metadata) score 3
  when the response equals the gold response, else 0.
- ``function``: any Python callable ``package.module:function(prompt, response) -> number``.
- ``llm``: AI feedback (RLAIF, Bai et al. 2022; Lee et al. 2023). A local causal LM reads a pairwise
  template and the next-token probabilities of the two labels decide. Every pair is judged in both
  orders: P(a beats b) = (P(label A | a first) + P(label B | b first)) / 2, which cancels position bias;
  how often the two orders disagree is reported as the position-bias rate (Zheng et al. 2023, "Judging
  LLM-as-a-judge"). A sample's score is its mean win probability against the prompt's other samples.
- ``human``: labels imported from a JSONL file (format below and in the README), validated line by line;
  a sample's score is its win rate over the labelled comparisons it took part in (tie 0.5, both bad 0).

Human label file: one JSON object per line::

    {"prompt_id": "984b...", "response_a": "87", "response_b": "Let me think. The answer is 87.",
     "choice": "a", "annotator": "ana", "reason": "shorter"}

``choice`` is ``a``, ``b``, ``tie`` or ``both_bad``; ``reason`` is optional. ``pair_id`` and ``time`` may be
present and are ignored here. Several annotators may label the same pair; ``judge.conflict`` resolves
them (``majority``: most votes, a draw is a tie; ``unanimous``: any disagreement drops the pair).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from pipeline import suite
from pipeline.chat import InputError
from pipeline.schema import JUDGES

log = logging.getLogger(__name__)

CHOICES = ("a", "b", "tie", "both_bad")


def prompt_text(row: dict) -> str:
    """The last user turn of a prompt row (what a judge reads as the prompt)."""
    return row["messages"][-2]["content"] if row["messages"][-1]["role"] == "assistant" else row["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------------ verifier
def gold_of(row: dict) -> str | None:
    """The row's gold response: its assistant turn, or ``meta.gold`` (kept where prompts are read)."""
    if row["messages"][-1]["role"] == "assistant":
        return row["messages"][-1]["content"]
    return row.get("meta", {}).get("gold")


def verifier_score(row: dict, response: str) -> float:
    """The verifier's score of one response (see the module docstring): 0 to 3."""
    if not verifier_correct(row, response):
        meta = row.get("meta", {})
        is_task = meta.get("family") not in (None, "safety") and "answer" in meta
        return 1.0 if is_task and suite.is_concise(response) else 0.0
    meta = row.get("meta", {})
    if meta.get("family") in (None, "safety") or "answer" not in meta:
        return 3.0
    return 3.0 if suite.is_concise(response, meta["answer"]) else 2.0


def verifier_correct(row: dict, response: str) -> bool:
    """Whether the verifier accepts ``response``: the suite's checker for suite rows, equality with the
    gold response for user rows that have one."""
    meta = row.get("meta", {})
    if "family" not in meta or "answer" not in meta:
        gold = gold_of(row)
        return gold is not None and response.strip() == gold.strip()
    return suite.is_correct(meta["family"], meta["answer"], bool(meta.get("harmful")), response)


def has_verifier(row: dict) -> bool:
    """Whether the verifier can judge this row (a suite row, or a user row with a gold response)."""
    meta = row.get("meta", {})
    return ("family" in meta and "answer" in meta) or gold_of(row) is not None


class Judge:
    """Scores the samples of many prompts at once; ``stats`` holds what the judge measured."""

    name = "judge"

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def score(self, rows: list[dict], samples: list[list[str]]) -> list[list[float | None]]:
        raise NotImplementedError

    def reward(self, rows: list[dict], texts: list[str]) -> torch.Tensor:
        """One score per (prompt row, response): the judge as an online reward (``pipeline.online.Scorer``)."""
        scores = self.score(rows, [[text] for text in texts])
        if any(s[0] is None for s in scores):
            raise InputError(f"judge {self.name!r} left a response unscored; it cannot serve as a reward")
        return torch.tensor([float(s[0]) for s in scores])


class VerifierJudge(Judge):
    """The verifier as a judge: its 0-3 preference score, or with ``pass_fail`` 1 when it accepts the answer
    (verifiable rewards) and 0 otherwise. As a reward, every row must have a verifier."""

    name = "verifier"

    def __init__(self, pass_fail: bool = False) -> None:
        super().__init__()
        self.pass_fail = pass_fail

    def score(self, rows, samples):
        judge = (lambda row, s: float(verifier_correct(row, s))) if self.pass_fail else verifier_score
        return [[judge(row, s) for s in texts] for row, texts in zip(rows, samples, strict=True)]

    def reward(self, rows: list[dict], texts: list[str]) -> torch.Tensor:
        for row in rows:
            if not has_verifier(row):
                raise InputError(f"prompt {row.get('id', '?')!r} has no verifier (no suite answer, no gold "
                                 "response); use reward=model for data without them")
        return super().reward(rows, texts)


# ------------------------------------------------------------------------------------------------ function
def load_callable(spec: str, key: str = "judge.function") -> Callable[[str, str], float]:
    """Import ``package.module:function``; errors name the config key."""
    if not spec or ":" not in spec:
        raise InputError(f"config key '{key}' = {spec!r} must look like 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"config key '{key}' = {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"config key '{key}' = {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


def brevity(prompt: str, response: str) -> float:
    """An example ``function`` judge: the shorter response is better (score = minus its length)."""
    return -float(len(response.strip()))


class FunctionJudge(Judge):
    name = "function"

    def __init__(self, spec: str):
        super().__init__()
        self.spec, self.fn = spec, load_callable(spec)

    def score(self, rows, samples):
        scores = []
        for row, texts in zip(rows, samples, strict=True):
            out = []
            for text in texts:
                value = self.fn(prompt_text(row), text)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise InputError(f"judge.function {self.spec!r} returned {value!r} for prompt {row['id']}; "
                                     "it must return a number")
                out.append(float(value))
            scores.append(out)
        return scores


# ------------------------------------------------------------------------------------------------ llm
class LLMJudge(Judge):
    """Pairwise AI feedback from a local causal LM, both orders per pair (see the module docstring)."""

    name = "llm"

    def __init__(self, model, tokenizer, template: str, labels: list[str], use_chat_template: bool,
                 batch_size: int, max_response_chars: int = 400):
        super().__init__()
        if len(labels) != 2 or labels[0] == labels[1]:
            raise InputError(f"config key 'judge.labels' = {labels!r} must be two different strings")
        for field in ("{prompt}", "{a}", "{b}"):
            if field not in template:
                raise InputError(f"config key 'judge.template' must contain {field}")
        self.model, self.tok, self.template = model.eval(), tokenizer, template
        self.use_chat_template, self.batch_size, self.max_chars = use_chat_template, batch_size, max_response_chars
        first = tokenizer(labels[0], add_special_tokens=False)["input_ids"]
        second = tokenizer(labels[1], add_special_tokens=False)["input_ids"]
        common = 0  # labels like " A" / " B" share a leading space token under a character tokenizer
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        if common == len(first) or common == len(second):
            raise InputError(f"config key 'judge.labels' = {labels!r}: one label is a prefix of the other in tokens")
        self.label_prefix = first[:common]
        self.label_ids = (first[common], second[common])

    def prompt_ids(self, prompt: str, first: str, second: str) -> list[int]:
        """Token ids of the judge prompt showing ``first`` as response A and ``second`` as response B."""
        text = self.template.format(prompt=prompt, a=first[: self.max_chars], b=second[: self.max_chars])
        if self.use_chat_template:
            from pipeline.models import render_ids

            ids = render_ids(self.tok, [{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if self.tok.bos_token_id is not None:
                ids = [self.tok.bos_token_id] + ids
        return ids + self.label_prefix

    @torch.no_grad()
    def first_label_probability(self, prompts: list[list[int]]) -> list[float]:
        """P(label A) / (P(label A) + P(label B)) at the next token of each prompt."""
        from pipeline.tokens import left_pad, padded_forward

        out: list[float] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        device = next(self.model.parameters()).device
        for lo in range(0, len(prompts), self.batch_size):
            ids, mask = left_pad(prompts[lo:lo + self.batch_size], pad)
            logits = padded_forward(self.model, ids.to(device), mask.to(device)).logits[:, -1].float()
            pair = logits[:, list(self.label_ids)]
            out += torch.softmax(pair, -1)[:, 0].tolist()
        return out

    def judge_pairs(self, items: list[tuple[str, str, str]]) -> list[tuple[float, float, float]]:
        """Judge (prompt, a, b) items in both orders, batched."""
        forward = [self.prompt_ids(p, a, b) for p, a, b in items]
        swapped = [self.prompt_ids(p, b, a) for p, a, b in items]
        probs = self.first_label_probability(forward + swapped)
        n = len(items)
        return [(probs[i], 1 - probs[n + i], (probs[i] + 1 - probs[n + i]) / 2) for i in range(n)]

    def score(self, rows, samples):
        items, index = [], []
        for r, (row, texts) in enumerate(zip(rows, samples, strict=True)):
            for i, j in combinations(range(len(texts)), 2):
                if texts[i] != texts[j]:
                    items.append((prompt_text(row), texts[i], texts[j]))
                    index.append((r, i, j))
        judged = self.judge_pairs(items)
        wins: list[list[list[float]]] = [[[] for _ in texts] for texts in samples]
        inconsistent = first_wins = 0
        for (r, i, j), (a_first, a_second, p) in zip(index, judged, strict=True):
            wins[r][i].append(p)
            wins[r][j].append(1 - p)
            inconsistent += (a_first > 0.5) != (a_second > 0.5)
            first_wins += (a_first > 0.5) + (a_second <= 0.5)  # the response shown first won
        self.stats = {
            "comparisons": len(items),
            "position_bias_rate": inconsistent / len(items) if items else float("nan"),
            "first_position_win_rate": first_wins / (2 * len(items)) if items else float("nan"),
        }
        scores = []
        for r, texts in enumerate(samples):
            row_scores = []
            for i, text in enumerate(texts):
                dup = next((k for k in range(i) if texts[k] == text), None)
                if dup is not None:
                    row_scores.append(row_scores[dup])  # an identical response scores the same
                else:
                    row_scores.append(sum(wins[r][i]) / len(wins[r][i]) if wins[r][i] else None)
            scores.append(row_scores)
        return scores


# ------------------------------------------------------------------------------------------------ human
def read_labels(path: str | Path) -> list[dict]:
    """Read and validate a human label file; errors name the file, line and field.

    A retraction line (``{"retracts": <label_id>, "annotator", ...}``, the labelling page's undo) removes
    the label it names (a label without a ``label_id`` is named ``line-<number>``); retractions and retracted
    labels are not returned."""
    from pipeline.chat import json_objects

    rows, retracted = [], set()
    for where, row in json_objects(path, "labels", "set judge.labels_file, or label pairs with `python -m pipeline.label`"):
        if "retracts" in row:
            if not isinstance(row["retracts"], str) or not isinstance(row.get("annotator"), str):
                raise InputError(f"{where}: a retraction needs string fields 'retracts' and 'annotator'")
            retracted.add((row["annotator"], row["retracts"]))
            continue
        for field in ("prompt_id", "response_a", "response_b", "choice", "annotator"):
            if field not in row:
                raise InputError(f"{where}: field '{field}' is missing")
            if not isinstance(row[field], str):
                raise InputError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
        if row["choice"] not in CHOICES:
            raise InputError(f"{where}: field 'choice' = {row['choice']!r} is not one of {list(CHOICES)}")
        if not row["annotator"].strip():
            raise InputError(f"{where}: field 'annotator' is empty")
        if row.get("reason") is not None and not isinstance(row["reason"], str):
            raise InputError(f"{where}: field 'reason' must be a string")
        rows.append((row.get("label_id") or f"line-{where.rsplit(':', 1)[1]}", row))
    return [row for label_id, row in rows if (row["annotator"], label_id) not in retracted]


def resolve_labels(labels: list[dict], rule: str) -> tuple[dict, dict[str, float]]:
    """Resolve several annotators' labels of the same pair into one outcome per pair.

    Returns ({(prompt_id, a, b): outcome}, stats) where outcome is "a", "b", "tie" or "both_bad" for the
    ordered key (a < b), and stats holds the annotator agreement (share of multiply-labelled pairs on
    which every annotator agreed) and how many pairs a conflict dropped. An annotator's later label of
    the same pair replaces their earlier one.
    """
    votes: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
    for row in labels:
        a, b, choice = row["response_a"], row["response_b"], row["choice"]
        if a > b:  # one key per unordered pair; the choice follows the swap
            a, b = b, a
            choice = {"a": "b", "b": "a"}.get(choice, choice)
        votes[(row["prompt_id"], a, b)][row["annotator"]] = choice
    outcomes, multi, agreed, dropped = {}, 0, 0, 0
    for key, by_annotator in votes.items():
        counts = Counter(by_annotator.values())
        if len(by_annotator) > 1:
            multi += 1
            agreed += len(counts) == 1
        if len(counts) == 1:
            outcomes[key] = next(iter(counts))
        elif rule == "unanimous":
            dropped += 1
        else:  # majority; a draw between the top choices is a tie
            (top, n), *rest = counts.most_common()
            outcomes[key] = top if not rest or rest[0][1] < n else "tie"
    stats = {"labels": len(labels), "labelled_pairs": len(votes), "multi_annotated_pairs": multi,
             "annotator_agreement": agreed / multi if multi else float("nan"), "conflicts_dropped": dropped}
    return outcomes, stats


class HumanJudge(Judge):
    """Scores from imported human labels (see the module docstring)."""

    name = "human"

    def __init__(self, labels_file: str, conflict: str):
        super().__init__()
        self.labels_file = labels_file
        self.outcomes, self.stats = resolve_labels(read_labels(labels_file), conflict)

    def score(self, rows, samples):
        by_prompt: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for (pid, a, b), outcome in self.outcomes.items():
            by_prompt[pid].append((a, b, outcome))
        used = set()
        scores = []
        for row, texts in zip(rows, samples, strict=True):
            present = set(texts)
            points: dict[str, list[float]] = defaultdict(list)
            for a, b, outcome in by_prompt.get(row["id"], []):
                if a in present and b in present:
                    used.add((row["id"], a, b))
                    pa, pb = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}[outcome]
                    points[a].append(pa)
                    points[b].append(pb)
            scores.append([sum(points[t]) / len(points[t]) if points[t] else None for t in texts])
        self.stats["unmatched_pairs"] = len(self.outcomes) - len(used)
        if self.stats["unmatched_pairs"]:
            log.warning("%s: %d labelled pairs match no sampled pair (other seed or sampling settings?)",
                        self.labels_file, self.stats["unmatched_pairs"])
        return scores


def build_judge(cfg: DictConfig, policy_dir: Path) -> Judge:
    """The judge that ``cfg.judge`` names; the ``llm`` judge's model defaults to the SFT policy."""
    judge = cfg.judge
    if judge.name == "verifier":
        return VerifierJudge()
    if judge.name == "function":
        return FunctionJudge(judge.function)
    if judge.name == "human":
        return HumanJudge(judge.labels_file, judge.conflict)
    if judge.name == "llm":
        from pipeline.adapters import load_trained
        from pipeline.models import load_causal_lm, load_tokenizer

        source = judge.model or str(policy_dir)
        model = load_trained(source, cfg.model) if Path(source, "config.json").exists() else load_causal_lm(source, cfg.model)
        return LLMJudge(model, load_tokenizer(source, cfg.model), judge.template, list(judge.labels),
                        judge.use_chat_template, judge.batch_size)
    raise InputError(f"config key 'judge.name' = {judge.name!r} is not a judge; valid: {list(JUDGES)}")

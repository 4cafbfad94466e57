"""Evaluation as a library: prompting a variant, generating and verifying its answers, and the metrics.

What ``evaluate`` runs for every variant and ``quantize`` runs for every quantized copy of a model, so both
measure with the same code: :func:`test_model` (``Trainer.test`` over the test rows), :func:`summarize`
(rates with 95% bootstrap intervals), the paired comparisons with SFT (:func:`differences_vs_sft`,
:func:`win_rates`, :func:`reward_win_rate`). Generation settings are explicit (:class:`Generation`), never
another stage's config group.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import suite
from pipeline.adapters import load_trained
from pipeline.generation import generate
from pipeline.judges import verifier_correct
from pipeline.models import base_sources, end_of_turn_ids, load_causal_lm, render_ids
from pipeline.progress import StageBar
from pipeline.stats import interval, paired_difference, rounded, with_interval
from pipeline.tokens import left_pad, padded_forward, token_logps


@dataclass(frozen=True)
class Generation:
    """How a variant answers the test prompts: greedy by default; ``sampled_accuracy`` also samples once at
    temperature 1 (seeded by ``seed`` and the batch)."""

    max_new_tokens: int
    batch_size: int
    seed: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    sampled_accuracy: bool = False


@dataclass(frozen=True)
class Variant:
    """A model and how it is prompted."""

    name: str
    model_dir: str      # stage output folder holding the model
    style: str          # "chat" (chat template) | "plain" (Q:/A: text, the base model's pretraining format)
    shots: int = 0
    cot: bool = False   # plain prompts whose examples show worked steps ending "The answer is ..." (chain of thought)


class PromptBuilder:
    """Token ids of a prompt, and of prompt + gold response, in a variant's style."""

    def __init__(self, tokenizer, variant: Variant, train_rows: list[dict], seed: int, context: int, max_new_tokens: int,
                 framed: bool = True):
        """``framed``: plain documents are wrapped in bos/eos, as the embedded base's pretraining text was; a
        real model's plain prompts are bare text (its bos may be a chat marker, SmolLM2's is ``<|im_start|>``)."""
        self.tok, self.variant, self.context, self.max_new_tokens = tokenizer, variant, context, max_new_tokens
        self.framed = framed
        self.shots_by_family: dict[str, list[dict]] = defaultdict(list)
        for row in train_rows:  # few-shot examples show the preferred behaviour only
            meta = row["meta"]
            dispreferred = meta.get("style") == "verbose" or (meta.get("harmful") and meta.get("style") == "compliance")
            if not dispreferred:
                self.shots_by_family[meta.get("family", "all")].append(row)
        self.all_shots = [r for rows in self.shots_by_family.values() for r in rows]
        self.seed = seed

    def _plain(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _doc(self, question: str, answer: str | None) -> list[int]:
        """One pretraining-style document: <s>Q: question\\nA: answer</s> (open-ended without answer)."""
        body = f"Q: {question}\nA:" + (f" {answer}" if answer is not None else " ")
        if not self.framed:
            return self._plain(body + ("\n\n" if answer is not None else ""))
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []  # Qwen's tokenizers have none
        ids = bos + self._plain(body)
        return ids + [self.tok.eos_token_id] if answer is not None else ids

    def prompt(self, row: dict, index: int) -> list[int]:
        user = row["messages"][:-1]
        if self.variant.style == "chat":
            return render_ids(self.tok, user, add_generation_prompt=True)
        query = self._doc(user[-1]["content"], None)
        shots: list[list[int]] = []
        if self.variant.shots:
            pool = self.shots_by_family.get(row["meta"].get("family", "all")) or self.all_shots
            rng = random.Random(self.seed * 100_003 + index)
            shots = [self._doc(s["messages"][-2]["content"], self.shot_answer(s))
                     for s in rng.sample(pool, min(self.variant.shots, len(pool)))]
        # Room for the longer of a generated response and the gold one (scored by teacher forcing).
        reserve = max(self.max_new_tokens, len(self._plain(row["messages"][-1]["content"])) + 1)
        while shots and sum(map(len, shots)) + len(query) + reserve > self.context:
            shots.pop(0)  # drop examples rather than overflow the model's context
        return [t for shot in shots for t in shot] + query

    def shot_answer(self, row: dict) -> str:
        """An example's answer: the demonstration, or for chain of thought its worked steps."""
        meta = row["meta"]
        if self.variant.cot and meta.get("family") in suite.TASK_FAMILIES and "key" in meta:
            return suite.rationale(meta["family"], suite.inputs_of(meta["key"]), meta["answer"])
        return row["messages"][-1]["content"]

    def with_gold(self, row: dict, prompt: list[int]) -> tuple[list[int], int]:
        """(prompt + gold response + end token, prompt length) for teacher-forced perplexity, given the
        row's generation prompt from :meth:`prompt`."""
        if self.variant.style == "chat":  # the template renders the gold response and its end-of-turn token
            return render_ids(self.tok, row["messages"]), len(prompt)
        end = [self.tok.eos_token_id] if self.framed else self._plain("\n")
        return prompt + self._plain(row["messages"][-1]["content"]) + end, len(prompt)

    def stop_ids(self, model) -> list[int]:
        """End tokens: every end of turn the model and tokenizer declare, and for plain prompts a newline
        (the end of an answer line)."""
        stops = end_of_turn_ids(self.tok, model)
        for newline in ("\n", "\n\n"):  # BPE vocabularies hold both as single tokens
            ids = self._plain(newline)
            if self.variant.style == "plain" and len(ids) == 1 and ids[0] not in stops:
                stops.append(ids[0])
        return stops


class EvalModule(L.LightningModule):
    """Generates, verifies and scores one variant on batches of test rows (``Trainer.test``)."""

    def __init__(self, model, tokenizer, builder: PromptBuilder, settings: Generation,
                 references: dict | None = None):
        super().__init__()
        self.model, self.tok, self.builder, self.cfg = model, tokenizer, builder, settings
        self.references = references or {}  # name -> model, for KL of this variant's answers to each (test/kl_to_<name>)
        self.seed = settings.seed
        self.stops = builder.stop_ids(model)  # the same for every batch of this variant
        self.records: list[dict] = []
        self.gen_stats = {"new_tokens": 0, "seconds": 0.0}

    def test_step(self, batch: list[tuple[int, dict]], batch_idx: int) -> None:
        prompts = [self.builder.prompt(row, i) for i, row in batch]
        outs, stats = generate(self.model, self.tok, prompts, self.cfg.max_new_tokens, len(prompts),
                               stop_ids=self.stops, do_sample=self.cfg.do_sample,
                               temperature=self.cfg.temperature, top_p=self.cfg.top_p)
        self.gen_stats["new_tokens"] += stats["new_tokens"]
        self.gen_stats["seconds"] += stats["seconds"]
        nll, counts = self.gold_nll([self.builder.with_gold(row, p) for (_, row), p in zip(batch, prompts, strict=True)])
        kls = [{} for _ in outs]
        for name, reference in self.references.items():
            for row, kl in zip(kls, self.kl_to_reference(reference, prompts, [o.ids for o in outs]), strict=True):
                row[name] = kl
        sampled = [None] * len(outs)
        if self.cfg.sampled_accuracy:  # the same prompts sampled at temperature 1: what RL-style training sees
            sampled, _ = generate(self.model, self.tok, prompts, self.cfg.max_new_tokens, len(prompts),
                                  stop_ids=self.stops, do_sample=True, temperature=1.0,
                                  generator_seed=self.seed * 7919 + batch_idx)
        for (_, row), out, n, c, kl, samp in zip(batch, outs, nll, counts, kls, sampled, strict=True):
            meta = row["meta"]
            response = out.text.split("\n")[0].strip() if self.builder.variant.style == "plain" else out.text
            self.records.append({
                "id": row["id"], "family": meta.get("family", "user"), "prompt": row["messages"][-2]["content"],
                "gold": row["messages"][-1]["content"], "response": response, "finished": out.finished,
                "correct": verifier_correct(row, response),
                "held_out_template": bool(meta.get("held_out_template")),
                "held_out_family": bool(meta.get("held_out_family")), "harmful": bool(meta.get("harmful")),
                "nll": n, "ref_tokens": c, "kl": kl,
                "sampled_correct": None if samp is None else verifier_correct(row, self._clean(samp.text)),
            })

    def _clean(self, text: str) -> str:
        return text.split("\n")[0].strip() if self.builder.variant.style == "plain" else text

    @torch.no_grad()
    def kl_to_reference(self, reference, prompts: list[list[int]], responses: list[list[int]]) -> list[tuple[float, int]]:
        """(summed KL(policy || reference) over the response's positions, positions) per row: the full
        next-token distributions of both models at every step of this variant's own answer."""
        rows = [p + r for p, r in zip(prompts, responses, strict=True)]
        ids, mask = left_pad(rows, self.tok.pad_token_id)
        logp = torch.log_softmax(padded_forward(self.model, ids, mask).logits.float(), -1)
        ref = torch.log_softmax(padded_forward(reference, ids, mask).logits.float(), -1)
        kl = (logp.exp() * (logp - ref)).sum(-1)  # (rows, width): KL at each position's next-token distribution
        out, width = [], ids.shape[1]
        for row, r in enumerate(responses):
            start = width - len(r) - 1  # left padding: the position that predicts the first response token
            out.append((float(kl[row, start:start + len(r)].sum()), len(r)))
        return out

    @torch.no_grad()
    def gold_nll(self, pairs: list[tuple[list[int], int]]) -> tuple[list[float], list[int]]:
        """Summed NLL of each gold response (and its end token) given its prompt, and token counts."""
        ids, mask = left_pad([p for p, _ in pairs], self.tok.pad_token_id)
        logp, _ = token_logps(padded_forward(self.model, ids, mask).logits[:, :-1], ids[:, 1:])
        nll, counts = [], []
        width = ids.shape[1]
        for row, (full, prompt_len) in enumerate(pairs):
            start = width - len(full) + prompt_len - 1  # position predicting the first response token
            nll.append(float(-logp[row, start:].sum()))
            counts.append(width - 1 - start)
        return nll, counts


def summarize(records: list[dict], gen_stats: dict) -> dict[str, float]:
    """Aggregate per-row records into ``test/*`` metrics (see the module docstring); every rate comes with
    its 95% bootstrap interval over prompts (``<rate>_ci_low``, ``<rate>_ci_high``)."""
    def rate(key: str, rows, field="correct"):
        with_interval(metrics, key, [bool(r[field]) for r in rows])

    metrics: dict[str, float] = {}
    tasks = [r for r in records if r["family"] != "safety"]
    rate("test/accuracy", records)
    rate("test/accuracy_seen_templates", [r for r in tasks if not r["held_out_family"] and not r["held_out_template"]])
    rate("test/accuracy_held_out_templates", [r for r in tasks if not r["held_out_family"] and r["held_out_template"]])
    rate("test/accuracy_held_out_family", [r for r in records if r["held_out_family"]])
    rate("test/refusal_harmful", [r for r in records if r["harmful"]], "refused")
    rate("test/refusal_harmless", [r for r in records if not r["harmful"]], "refused")
    rate("test/concise_rate", [r for r in tasks if r["response"]], "concise")
    rate("test/unfinished_rate", [{"unfinished": not r["finished"]} for r in records], "unfinished")
    metrics.update({
        "test/perplexity": float(torch.exp(torch.tensor(sum(r["nll"] for r in records) / sum(r["ref_tokens"] for r in records)))),
        "test/response_length": sum(len(r["response"]) for r in records) / len(records),
        "test/tokens_per_second": gen_stats["new_tokens"] / max(gen_stats["seconds"], 1e-9),
        "test/latency_ms": 1000 * gen_stats["seconds"] / len(records),
    })
    for name in records[0].get("kl") or {} if records else ():
        metrics[f"test/kl_to_{name}"] = sum(r["kl"][name][0] for r in records) / max(sum(r["kl"][name][1] for r in records), 1)
    if records and records[0].get("sampled_correct") is not None:
        rate("test/accuracy_sampled", records, "sampled_correct")
    for family in sorted({r["family"] for r in records}):
        rate(f"test/accuracy_{family}", [r for r in records if r["family"] == family])
    return rounded(metrics)


# Per-prompt outcomes compared with SFT's on the same prompts: metric -> (record field, which rows).
PAIRED = {
    "test/accuracy": ("correct", lambda r: True),
    "test/refusal_harmful": ("refused", lambda r: r["harmful"]),
    "test/refusal_harmless": ("refused", lambda r: not r["harmful"]),  # every non-harmful prompt, as summarize counts
    "test/concise_rate": ("concise", lambda r: r["family"] != "safety"),
}


def differences_vs_sft(records: list[dict], baseline: list[dict]) -> dict[str, float]:
    """This variant minus SFT on the same prompts, with paired-bootstrap 95% intervals:
    ``<metric>_vs_sft``, ``<metric>_vs_sft_ci_low``, ``<metric>_vs_sft_ci_high`` for the :data:`PAIRED` rates."""
    theirs = {r["id"]: r for r in baseline}
    out = {}
    for key, (field, keep) in PAIRED.items():
        pairs = [(bool(r[field]), bool(theirs[r["id"]][field])) for r in records if r["id"] in theirs and keep(r)]
        if not pairs:
            continue
        diff, low, high = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        out.update({f"{key}_vs_sft": diff, f"{key}_vs_sft_ci_low": low, f"{key}_vs_sft_ci_high": high})
    return rounded(out)


def pairwise_win_rate(ids: list[str], mine: dict[str, object], theirs: dict[str, object],
                      prefer: Callable[[str, object, object], float]) -> dict[str, float]:
    """A judge comparing this variant's answer with SFT's on every prompt, asked in both orders.

    ``prefer(id, first, second)`` is the judge's probability that ``first`` is better. Each prompt scores
    p = (prefer(mine, sft) + 1 - prefer(sft, mine)) / 2, which cancels a judge's position bias: a win is
    p > 1/2, a loss p < 1/2, a tie p = 1/2 (equal answers, or orders that disagree). ``win_rate`` = mean p:
    ties counted half (AlpacaEval's convention), with its 95% bootstrap interval over prompts (``win_rate_ci_low``,
    ``win_rate_ci_high``); ``decisive_win_rate`` = wins / (wins + losses);
    ``position_consistency`` = share of prompts whose two orders agree.
    """
    p_values, consistent = [], 0
    for i in ids:
        forward, backward = prefer(i, mine[i], theirs[i]), 1 - prefer(i, theirs[i], mine[i])
        consistent += (forward > 0.5) == (backward > 0.5) and (forward < 0.5) == (backward < 0.5)
        p_values.append((forward + backward) / 2)
    n = len(p_values)
    if not n:
        return {}
    wins, losses = sum(p > 0.5 for p in p_values), sum(p < 0.5 for p in p_values)
    low, high = interval(p_values)
    return {"win_rate": round(sum(p_values) / n, 4), "win_rate_ci_low": round(low, 4), "win_rate_ci_high": round(high, 4),
            "decisive_win_rate": round(wins / (wins + losses), 4) if wins + losses else 0.5,
            "tie_rate": round((n - wins - losses) / n, 4),
            "position_consistency": round(consistent / n, 4)}


def win_rates(records: list[dict], baseline: list[dict], rows: dict[str, dict]) -> dict[str, float]:
    """The verifier (the suite's checker and preference rules) judging this variant against SFT:
    ``test/win_rate_vs_sft``, ``test/decisive_win_rate_vs_sft``, ``test/tie_rate_vs_sft``."""
    from pipeline.judges import verifier_score

    theirs = {r["id"]: r["response"] for r in baseline}
    mine = {r["id"]: r["response"] for r in records if r["id"] in theirs}

    def prefer(i, first, second) -> float:
        a, b = verifier_score(rows[i], first), verifier_score(rows[i], second)
        return 1.0 if a > b else 0.0 if a < b else 0.5

    out = pairwise_win_rate(list(mine), mine, theirs, prefer)
    return {"test/" + (k.replace("_ci_", "_vs_sft_ci_") if "_ci_" in k else f"{k}_vs_sft"): v
            for k, v in out.items() if k != "position_consistency"}


def reward_win_rate(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """The reward model as judge: the share of test prompts where it scores this variant's answer above
    SFT's, ties (equal scores: in practice, identical answers) counted half; asked in both orders."""
    ids = list(range(len(mine)))
    score = {"mine": mine.tolist(), "sft": theirs.tolist()}

    def prefer(i, first, second) -> float:
        a, b = score[first][i], score[second][i]
        return 1.0 if a > b else 0.0 if a < b else 0.5

    return pairwise_win_rate(ids, {i: "mine" for i in ids}, {i: "sft" for i in ids}, prefer)["win_rate"]


def annotate(records: list[dict]) -> None:
    """Add the behaviour flags the metrics count: refused, concise."""
    for r in records:
        r["refused"] = suite.is_refusal(r["response"])
        r["concise"] = suite.is_concise(r["response"])


def load_variant_model(variant: Variant, model_cfg: DictConfig):
    """The variant's model: the base model's weights (wherever they live) or a trained stage output."""
    folder = Path(variant.model_dir)
    if folder.name == "base":
        return load_causal_lm(base_sources(folder)[0], model_cfg)
    return load_trained(folder, model_cfg)


def test_model(model, tokenizer, variant: Variant, settings: Generation, hardware: DictConfig, test_rows: list[dict],
               train_rows: list[dict], references: dict | None = None, framed: bool = True, stage: str = "evaluate"):
    """Generate, verify and score ``model`` on ``test_rows`` through ``Trainer.test``; return (metrics,
    records). ``settings`` sets generation, ``hardware`` (the ``trainer`` group) the device and numerics;
    ``references`` (name -> model: the SFT model, a student's teacher) add ``test/kl_to_<name>``; ``framed``: see :class:`PromptBuilder`."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    builder = PromptBuilder(tokenizer, variant, train_rows, settings.seed, context, settings.max_new_tokens,
                            framed=framed)
    module = EvalModule(model, tokenizer, builder, settings, references)
    loader = DataLoader(list(enumerate(test_rows)), batch_size=settings.batch_size, collate_fn=list)
    trainer = L.Trainer(accelerator=hardware.accelerator, devices=1, precision=hardware.precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=hardware.progress_bar, deterministic=hardware.deterministic,
                        callbacks=[StageBar(stage, variant.name)] if hardware.progress_bar else [])
    trainer.test(module, dataloaders=loader, verbose=False)
    annotate(module.records)
    return summarize(module.records, module.gen_stats), module.records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

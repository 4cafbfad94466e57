"""evaluate: every variant on the held-out test prompts, with the same metric names for each.

A ``LightningModule`` run by ``Trainer.test``: each test batch is generated (batched, left-padded, KV
cache, greedy by default), verified by the suite's checker, and scored by teacher forcing on the
reference responses (perplexity).

Variants (``evaluate.variants``; one whose stage has not run is skipped with a warning):
``base_zero_shot``, ``base_few_shot`` and ``base_cot`` (the base model prompted ``Q: ...\\nA:`` with none,
``few_shot`` solved examples, or the same examples as worked steps ending "The answer is ...": the
in-context-learning baselines, no training), and any trained stage's model by its name (``sft``, ``dpo``,
``ppo``, ``grpo``, ``quantize``: ``data/<name>`` through its chat template).

Metrics per variant (``test/<name>``): accuracy overall and per family; on seen templates, on held-out
templates and on the held-out family; accuracy when sampling once at temperature 1
(``evaluate.sampled_accuracy``); perplexity on the reference responses; mean response length in
characters; refusal rate on harmful and on harmless prompts; share of answers without filler; generation
time per prompt (batched) and throughput; the reward model's score (``test/reward_score``, normalized by its
training pairs' mean and std; when ``data/reward`` holds a model that passed its gate). Against SFT (every
variant but ``sft``): the verifier's win rate over SFT's answers to the same prompts, asked in both orders
(:func:`pairwise_win_rate`), and for chat variants the KL to the SFT model along the variant's own answers;
with a reward model, ``test/reward_win_rate_vs_sft``. Optional lm-evaluation-harness tasks
(``evaluate.lm_eval_tasks``) when the package is installed.

Inputs: ``data/base``, ``data/prepare`` (test split; train split for few-shot examples), ``data/sft``,
``data/dpo``, ``data/ppo``, ``data/grpo``, ``data/quantize`` (and its ``report.json``), ``data/reward``;
training curves under ``data/plots/``; ``evaluate.*``, ``seed``.
Outputs: ``data/evaluate/`` (``report.html``: one self-contained page with the table, plots and sample
generations, see :mod:`pipeline.report`; ``report.md``, ``generations.jsonl``, ``run.json``),
``data/metrics/evaluate.json`` (variant -> metrics), ``data/plots/evaluate/{accuracy,reward_kl}.csv``.
Each variant is also an MLflow child run of the evaluate run, with the same metric names.
Run: ``python -m pipeline.run stage=evaluate``
"""

from __future__ import annotations

import html
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

from pipeline import report, suite
from pipeline.adapters import load_trained
from pipeline.generation import generate, left_pad
from pipeline.lineage import stage_run
from pipeline.models import base_sources, end_of_turn_ids, load_causal_lm, load_tokenizer, render_ids
from pipeline.outputs import atomic_dir, stage_output, write_atomic, write_json
from pipeline.stats import paired_difference, with_interval


@dataclass(frozen=True)
class Variant:
    """A model and how it is prompted."""

    name: str
    model_dir: str      # stage output folder holding the model
    style: str          # "chat" (chat template) | "plain" (Q:/A: text, the base model's pretraining format)
    shots: int = 0
    cot: bool = False   # plain prompts whose examples show worked steps ending "The answer is ..." (chain of thought)


def variants(cfg: DictConfig) -> list[Variant]:
    """The configured variants whose model exists: the base model prompted plainly (zero-shot, few-shot,
    chain of thought), or a trained stage's model (its folder ``data/<name>``) through its chat template.
    A configured variant whose folder is absent (its stage was not run) is skipped with a warning."""
    import logging

    data = Path(cfg.paths.data)
    known = {
        "base_zero_shot": Variant("base_zero_shot", str(data / "base"), "plain", 0),
        "base_few_shot": Variant("base_few_shot", str(data / "base"), "plain", cfg.evaluate.few_shot),
        "base_cot": Variant("base_cot", str(data / "base"), "plain", cfg.evaluate.few_shot, cot=True),
        "base_chat": Variant("base_chat", str(data / "base"), "chat"),
    }
    chosen = [known.get(name) or Variant(name, str(data / name), "chat") for name in cfg.evaluate.variants]
    missing = [v.name for v in chosen if not Path(v.model_dir).exists()]
    if missing:
        logging.getLogger(__name__).warning("evaluate: no model for %s (stage not run); skipped", ", ".join(missing))
    return [v for v in chosen if v.name not in missing]


class PromptBuilder:
    """Token ids of a prompt, and of prompt + reference, in a variant's style."""

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
        # Room for the longer of a generated response and the reference (scored by teacher forcing).
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

    def with_reference(self, row: dict, prompt: list[int]) -> tuple[list[int], int]:
        """(prompt + reference response + end token, prompt length) for teacher-forced perplexity, given the
        row's generation prompt from :meth:`prompt`."""
        if self.variant.style == "chat":  # the template renders the reference and its end-of-turn token
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

    def __init__(self, model, tokenizer, builder: PromptBuilder, cfg: DictConfig, reference=None):
        super().__init__()
        self.model, self.tok, self.builder, self.cfg = model, tokenizer, builder, cfg.evaluate
        self.reference = reference  # the SFT model, for KL of this variant's answers to it (None: not measured)
        self.seed = cfg.seed
        self.records: list[dict] = []
        self.gen_stats = {"new_tokens": 0, "seconds": 0.0}

    def test_step(self, batch: list[tuple[int, dict]], batch_idx: int) -> None:
        prompts = [self.builder.prompt(row, i) for i, row in batch]
        outs, stats = generate(self.model, self.tok, prompts, self.cfg.max_new_tokens, len(prompts),
                               stop_ids=self.builder.stop_ids(self.model), do_sample=self.cfg.do_sample,
                               temperature=self.cfg.temperature, top_p=self.cfg.top_p)
        self.gen_stats["new_tokens"] += stats["new_tokens"]
        self.gen_stats["seconds"] += stats["seconds"]
        nll, counts = self.reference_nll([self.builder.with_reference(row, p) for (_, row), p in zip(batch, prompts, strict=True)])
        kls = self.kl_to_reference(prompts, [o.ids for o in outs]) if self.reference is not None else [None] * len(outs)
        sampled = [None] * len(outs)
        if self.cfg.sampled_accuracy:  # the same prompts sampled at temperature 1: what RL-style training sees
            sampled, _ = generate(self.model, self.tok, prompts, self.cfg.max_new_tokens, len(prompts),
                                  stop_ids=self.builder.stop_ids(self.model), do_sample=True, temperature=1.0,
                                  generator_seed=self.seed * 7919 + batch_idx)
        for (_, row), out, n, c, kl, samp in zip(batch, outs, nll, counts, kls, sampled, strict=True):
            meta = row["meta"]
            response = out.text.split("\n")[0].strip() if self.builder.variant.style == "plain" else out.text
            self.records.append({
                "id": row["id"], "family": meta.get("family", "user"), "prompt": row["messages"][-2]["content"],
                "reference": row["messages"][-1]["content"], "response": response, "finished": out.finished,
                "correct": score(meta, row["messages"][-1]["content"], response),
                "held_out_template": bool(meta.get("held_out_template")),
                "held_out_family": bool(meta.get("held_out_family")), "harmful": bool(meta.get("harmful")),
                "nll": n, "ref_tokens": c, "kl": kl,
                "sampled_correct": None if samp is None else score(meta, row["messages"][-1]["content"], self._clean(samp.text)),
            })

    def _clean(self, text: str) -> str:
        return text.split("\n")[0].strip() if self.builder.variant.style == "plain" else text

    @torch.no_grad()
    def kl_to_reference(self, prompts: list[list[int]], responses: list[list[int]]) -> list[tuple[float, int]]:
        """(summed KL(policy || reference) over the response's positions, positions) per row: the full
        next-token distributions of both models at every step of this variant's own answer."""
        rows = [p + r for p, r in zip(prompts, responses, strict=True)]
        ids, mask = left_pad(rows, self.tok.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
        ref = torch.log_softmax(self.reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
        kl = (logp.exp() * (logp - ref)).sum(-1)  # (rows, width): KL at each position's next-token distribution
        out, width = [], ids.shape[1]
        for row, r in enumerate(responses):
            start = width - len(r) - 1  # left padding: the position that predicts the first response token
            out.append((float(kl[row, start:start + len(r)].sum()), len(r)))
        return out

    @torch.no_grad()
    def reference_nll(self, pairs: list[tuple[list[int], int]]) -> tuple[list[float], list[int]]:
        """Summed NLL of each reference response (and its end token) given its prompt, and token counts."""
        ids, mask = left_pad([p for p, _ in pairs], self.tok.pad_token_id)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        nll, counts = [], []
        width = ids.shape[1]
        for row, (full, prompt_len) in enumerate(pairs):
            start = width - len(full) + prompt_len - 1  # position predicting the first response token
            nll.append(float(-logp[row, start:].sum()))
            counts.append(width - 1 - start)
        return nll, counts


def score(meta: dict, reference: str, response: str) -> bool | None:
    """Verify a response: the suite's checker for suite rows; exact match to the reference for user rows."""
    if "family" not in meta or "answer" not in meta:
        return response.strip() == reference.strip()
    return suite.is_correct(meta["family"], meta["answer"], bool(meta.get("harmful")), response)


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
    if records and records[0].get("kl") is not None:
        metrics["test/kl_to_sft"] = sum(r["kl"][0] for r in records) / max(sum(r["kl"][1] for r in records), 1)
    if records and records[0].get("sampled_correct") is not None:
        rate("test/accuracy_sampled", records, "sampled_correct")
    for family in sorted({r["family"] for r in records}):
        rate(f"test/accuracy_{family}", [r for r in records if r["family"] == family])
    return {k: round(v, 4) for k, v in metrics.items()}


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
    return {k: round(v, 4) for k, v in out.items()}


def pairwise_win_rate(ids: list[str], mine: dict[str, object], theirs: dict[str, object],
                      prefer: Callable[[str, object, object], float]) -> dict[str, float]:
    """A judge comparing this variant's answer with SFT's on every prompt, asked in both orders.

    ``prefer(id, first, second)`` is the judge's probability that ``first`` is better. Each prompt scores
    p = (prefer(mine, sft) + 1 - prefer(sft, mine)) / 2, which cancels a judge's position bias: a win is
    p > 1/2, a loss p < 1/2, a tie p = 1/2 (equal answers, or orders that disagree). ``win_rate`` = mean p:
    ties counted half (AlpacaEval's convention); ``decisive_win_rate`` = wins / (wins + losses);
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
    return {"win_rate": round(sum(p_values) / n, 4),
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
    return {f"test/{k}_vs_sft": v for k, v in out.items() if k != "position_consistency"}


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


def load_variant_model(variant: Variant, cfg: DictConfig):
    """The variant's model: the base model's weights (wherever they live) or a trained stage output."""
    folder = Path(variant.model_dir)
    if folder.name == "base":
        return load_causal_lm(base_sources(folder)[0], cfg.model)
    return load_trained(folder, cfg.model)


def evaluate_variant(variant: Variant, cfg: DictConfig, test_rows: list[dict], train_rows: list[dict]):
    """Run ``Trainer.test`` for one variant; return (metrics, records)."""
    of_base = Path(variant.model_dir).name == "base"
    tokenizer_dir = base_sources(variant.model_dir)[1] if of_base else variant.model_dir
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model)
    model = load_variant_model(variant, cfg).eval()
    sft_dir = Path(cfg.paths.data) / "sft"
    reference = None  # KL to SFT measures how far alignment moved SFT: trained variants only
    if not of_base and variant.name != "sft" and sft_dir.exists():
        reference = load_variant_model(Variant("sft", str(sft_dir), "chat"), cfg).eval()
    return test_model(model, tokenizer, variant, cfg, test_rows, train_rows, reference)


def test_model(model, tokenizer, variant: Variant, cfg: DictConfig, test_rows: list[dict], train_rows: list[dict],
               reference=None):
    """Generate, verify and score ``model`` on ``test_rows`` through ``Trainer.test``; return (metrics,
    records). ``cfg.evaluate`` sets generation; ``reference`` (the SFT model) adds KL to it."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    builder = PromptBuilder(tokenizer, variant, train_rows, cfg.seed, context, cfg.evaluate.max_new_tokens,
                            framed=cfg.model.name_or_path is None)
    module = EvalModule(model, tokenizer, builder, cfg, reference)
    loader = DataLoader(list(enumerate(test_rows)), batch_size=cfg.evaluate.batch_size, collate_fn=list)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=cfg.trainer.progress_bar, deterministic=cfg.trainer.deterministic)
    trainer.test(module, dataloaders=loader, verbose=False)
    annotate(module.records)
    return summarize(module.records, module.gen_stats), module.records


def main(cfg: DictConfig) -> dict:
    """Run the evaluate stage; return {variant: metrics}."""
    from pipeline.training import seed_everything

    data = Path(cfg.paths.data)
    out = stage_output(cfg, "evaluate")
    with stage_run(cfg, "evaluate") as run:
        run.add_input("prepare", data / "prepare", dataset=True)
        chosen = variants(cfg)
        for folder in sorted({Path(v.model_dir).name for v in chosen}):
            run.add_input(folder, data / folder)
        test_rows = read_jsonl(data / "prepare" / "test.jsonl")
        train_rows = read_jsonl(data / "prepare" / "train.jsonl")
        reward_score = reward_scorer(cfg, run)
        results, generations, by_variant, reward_by_variant = {}, [], {}, {}
        for variant in chosen:
            seed_everything(cfg)
            metrics, records = evaluate_variant(variant, cfg, test_rows, train_rows)
            if reward_score is not None:
                prompts = [{"messages": r["messages"][:-1]} for r in test_rows]
                responses = {r["id"]: r["response"] for r in records}
                scores = reward_score(prompts, [responses[r["id"]] for r in test_rows])
                with_interval(metrics, "test/reward_score", scores.tolist())
                reward_by_variant[variant.name] = scores
            results[variant.name] = metrics
            by_variant[variant.name] = records
            generations += [{"variant": variant.name, **r} for r in records]
        for name, metrics in results.items():
            if "sft" in by_variant and name != "sft":
                metrics.update(win_rates(by_variant[name], by_variant["sft"], {r["id"]: r for r in test_rows}))
                metrics.update(differences_vs_sft(by_variant[name], by_variant["sft"]))
            if "sft" in reward_by_variant and name != "sft":
                mine, theirs = reward_by_variant[name], reward_by_variant["sft"]
                metrics["test/reward_win_rate_vs_sft"] = reward_win_rate(mine, theirs)
                diff, low, high = paired_difference(mine.tolist(), theirs.tolist())
                metrics.update({"test/reward_score_vs_sft": diff, "test/reward_score_vs_sft_ci_low": low,
                                "test/reward_score_vs_sft_ci_high": high})
            results[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        lm_eval_results = run_lm_eval(cfg, chosen)
        for name, metrics in lm_eval_results.items():
            results[name].update(metrics)
        for name, metrics in results.items():
            child = run.child(name, tags={"posttrain.variant": name})
            child.log_metrics(metrics)
            child.finish()
        plots = Path(cfg.paths.plots)
        with atomic_dir(out) as tmp:
            write_atomic(tmp / "generations.jsonl", "".join(json.dumps(g, sort_keys=True) + "\n" for g in generations))
            write_atomic(tmp / "report.md", report.render_markdown(results, generations))
            write_atomic(tmp / "report.html", report.render_html(results, generations, plots, extra_sections(cfg)))
            run.write_run_json(tmp)
        write_json(Path(cfg.paths.metrics) / "evaluate.json", results)
        write_accuracy_plot(results, plots / "evaluate" / "accuracy.csv")
        write_reward_kl_plot(results, plots / "evaluate" / "reward_kl.csv")
        run.log_metrics({f"{name}/{k}": v for name, m in results.items() for k, v in m.items()})
        run.log_artifact(out / "report.md")
        run.log_artifact(out / "report.html")
    return results


def extra_sections(cfg: DictConfig) -> list[tuple[str, str]]:
    """Report sections from other stages' outputs: the quantization methods, when the stage ran."""
    path = Path(cfg.paths.data) / "quantize" / "report.json"
    if not path.exists():
        return []
    columns = (("size/linear_ratio", "linear bytes vs fp32", "{:.1%}"), ("size/disk_bytes", "bytes on disk", "{:,.0f}"),
               ("size/memory_bytes", "bytes in memory", "{:,.0f}"), ("speed/forward_ms", "forward (ms)", "{:.1f}"),
               ("speed/tokens_per_second", "generation tokens/s", "{:.0f}"), ("test/perplexity", "perplexity", "{:.3f}"),
               ("test/accuracy", "accuracy", "{:.1%}"), ("test/accuracy_delta", "accuracy vs fp32", "{:+.1%}"))
    found = json.loads(path.read_text())
    body = report.table_html(found["methods"], columns, "quantize")
    for status in ("unsupported", "failed"):
        for name, why in found.get(status, {}).items():
            body += f"<p>{html.escape(name)}: {status}: {html.escape(why)}</p>"
    for name, layers in found.get("fp32_layers", {}).items():
        if layers:
            body += f"<p>{html.escape(name)} keeps {len(layers)} layer(s) in fp32: {html.escape(', '.join(sorted(layers)))}</p>"
    return [("Quantization (quantize stage)", body)]


def run_lm_eval(cfg: DictConfig, chosen: list[Variant]) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness tasks (``evaluate.lm_eval_tasks``) on every chat variant, when it is installed.

    Optional: with no tasks configured nothing happens; with tasks but no ``lm_eval`` package the stage
    says so once and goes on (``pip install lm-eval``). Its tasks download data sets, so they need
    ``offline=false`` and network, or tasks defined on local files. Metrics: ``lm_eval/<task>/<metric>``.
    """
    import logging

    tasks = list(cfg.evaluate.lm_eval_tasks)
    if not tasks:
        return {}
    try:
        import lm_eval
    except ImportError:
        logging.getLogger(__name__).warning("evaluate: lm-evaluation-harness is not installed; lm_eval_tasks %s "
                                            "skipped (pip install lm-eval)", tasks)
        return {}
    out = {}
    for variant in chosen:
        if variant.style != "chat":
            continue
        result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={variant.model_dir}", tasks=tasks,
                                         device=cfg.trainer.accelerator, limit=cfg.evaluate.lm_eval_limit)
        out[variant.name] = {f"lm_eval/{task}/{metric.split(',')[0]}": float(value)
                             for task, metrics in result["results"].items()
                             for metric, value in metrics.items() if isinstance(value, (int, float))}
    return out


def reward_scorer(cfg: DictConfig, run):
    """The reward model's scorer for ``test/reward_score``, or None when there is no usable reward model."""
    import logging

    from pipeline.online import model_reward
    from pipeline.rewards import GateError, load_reward_model

    folder = Path(cfg.paths.data) / "reward"
    if not folder.exists():
        return None
    try:
        reward_model = load_reward_model(folder, cfg.model)
    except GateError as err:
        logging.getLogger(__name__).warning("evaluate: no reward-model score: %s", err)
        return None
    run.add_input("reward", folder)
    return model_reward(reward_model)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_reward_kl_plot(results: dict, path: Path) -> None:
    """Reward-model score against KL to SFT for the variants that have both (the aligned ones), for ``dvc plots``."""
    lines = ["variant,kl_to_sft,reward_score"]
    lines += [f"{n},{m['test/kl_to_sft']},{m['test/reward_score']}" for n, m in results.items()
              if "test/kl_to_sft" in m and "test/reward_score" in m]
    write_atomic(path, "\n".join(lines) + "\n")


def write_accuracy_plot(results: dict, path: Path) -> None:
    """Accuracy per variant and family as CSV for ``dvc plots`` (a grouped bar chart)."""
    derived = ("_ci_low", "_ci_high", "_vs_sft")  # intervals and differences are not slices
    families = sorted({k.removeprefix("test/accuracy_") for m in results.values() for k in m
                       if k.startswith("test/accuracy_") and not k.endswith(derived)})
    lines = ["variant,slice,accuracy"]
    for name, m in results.items():
        lines.append(f"{name},overall,{m['test/accuracy']}")
        lines += [f"{name},{f},{m['test/accuracy_' + f]}" for f in families]
    write_atomic(path, "\n".join(lines) + "\n")

"""collect: sample responses from the SFT policy, judge them, and build preference pairs.

Sampling is a ``LightningModule`` run by ``Trainer.predict``: each batch of prompts from the
``prompts`` split is prefilled once and sampled ``collect.k`` times in one batched, left-padded
``generate`` call with the KV cache (temperature, top-p and max new tokens from config); the progress bar shows
generated tokens/s. Each batch seeds its own sampling from ``seed`` and its index, so the same seed
gives the same samples however the batches run.

The judge (``judge`` config group, :mod:`pipeline.judges`) scores every sample; pairs are then built
from the scores the same way for every judge (``collect.pairs``):

- ``best_worst``: the highest- against the lowest-scoring sample;
- ``all_distinct``: every two samples with different scores;
- ``random``: random pairs of samples with different scores;

identical responses and equal scores (ties) never make a pair, unjudged samples (``None``) are left out,
unfinished samples (no end token) too when ``collect.drop_unfinished``, and at most
``collect.max_pairs_per_prompt`` pairs come from one prompt. A prompt whose samples all tie is counted,
not an error.

``collect.source=files`` reads the user's preference rows from ``collect.files`` instead (every format of
:mod:`pipeline.feedback`, checked row by row), into the same pairs and statistics (:func:`from_files`).

Inputs: ``data/prepare/prompts.jsonl``, ``data/sft`` (the policy; with files, its tokenizer and context length),
``judge.labels_file`` (for ``judge=human``), ``collect.files`` (for ``collect.source=files``);
``collect.*``, ``judge.*``, ``seed``.
Every judged sample is also written as unpaired feedback for ``dpo.loss=kto`` (``unpaired.jsonl``: a
completion, desirable when its score is at least ``collect.desirable_score``), so prompts whose samples all
tie, which give no pair, still teach KTO; with files, every row kind is (:func:`pipeline.feedback.to_unpaired`).

Outputs: ``data/collect/`` (``pairs.jsonl``: prompt, chosen, rejected, both scores, judge, sampling
settings, the policy's run id; ``unpaired.jsonl``: prompt, completion, label, score; ``samples.jsonl``: every
sample with its score, for labelling; ``run.json``), ``data/metrics/collect.json``, ``data/plots/collect/lengths.csv`` and ``lengths.png``
(chosen vs rejected response length).
Run: ``python -m pipeline.run stage=collect [judge=llm]``
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline.adapters import load_trained
from pipeline.chat import InputError, prompt_of, read_prompts
from pipeline.feedback import make_pairs, unpaired_row
from pipeline.generation import generate
from pipeline.judges import Judge, build_judge, has_verifier, prompt_text, verifier_score
from pipeline.models import LOAD_KEYS, load_tokenizer, render_ids
from pipeline.outputs import write_atomic
from pipeline.plots import write_histogram
from pipeline.stage import Chart, Context, Input, Plot, Stage

log = logging.getLogger(__name__)


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="collect",
    inputs=(Input("prepare", "prepare", dataset=True), Input("sft", "sft"),
            Input("labels", "${judge.reads}", conditional=True, in_data=False,
                  note="judge=human: its labels_file; any other judge: data/UNREAD.md"),
            Input("feedback", "${collect.reads}", conditional=True, in_data=False,
                  note="collect.source=files: collect.files; sampling: data/UNREAD.md")),
    params=("judge", *LOAD_KEYS, "trainer.accelerator", "trainer.precision"),
    plots=(Plot("lengths.csv"),),
    charts=(Chart("chosen vs rejected response length", "linear", x="characters",
                  y={"lengths.csv": ["chosen", "rejected"]}),),
)


class SamplingModule(L.LightningModule):
    """Samples ``k`` responses per prompt (``Trainer.predict``); keeps a running tokens/s figure."""

    def __init__(self, model, tokenizer, cfg: DictConfig, seed: int):
        super().__init__()
        self.model, self.tok, self.cfg, self.seed = model, tokenizer, cfg, seed
        self.new_tokens, self.seconds = 0, 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        k = self.cfg.k
        prompts = [render_ids(self.tok, prompt_of(row), add_generation_prompt=True) for row in batch]
        outs, stats = generate(self.model, self.tok, prompts, self.cfg.max_new_tokens, batch_size=len(prompts),
                               do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                               generator_seed=self.seed * 1_000_003 + batch_idx, samples_per_prompt=k)
        self.new_tokens += stats["new_tokens"]
        self.seconds += stats["seconds"]
        return [{"row": row, "samples": [{"text": o.text, "finished": o.finished, "tokens": len(o.ids)}
                                         for o in outs[i * k:(i + 1) * k]]}
                for i, row in enumerate(batch)]


class ThroughputBar(TQDMProgressBar):
    """The predict progress bar, labelled, with the generated tokens/s of the sampling module."""

    @property
    def predict_description(self) -> str:
        return "collect · sampling"

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix({"tok/s": f"{pl_module.tokens_per_second:.0f}"})


def sample(model, tokenizer, rows: list[dict], cfg: DictConfig) -> tuple[list[dict], float]:
    """Run ``Trainer.predict`` over the prompt rows; return per-prompt samples and tokens/s."""
    module = SamplingModule(model, tokenizer, cfg.collect, cfg.seed)
    loader = DataLoader(rows, batch_size=cfg.collect.batch_size, collate_fn=list)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=cfg.trainer.progress_bar, deterministic=cfg.trainer.deterministic,
                        callbacks=[ThroughputBar()] if cfg.trainer.progress_bar else [])
    batches = trainer.predict(module, dataloaders=loader)
    return [item for batch in batches for item in batch], module.tokens_per_second


def build_pairs(collected: list[dict], scores: list[list[float | None]], judge: Judge, cfg: DictConfig,
                policy_run_id: str | None) -> tuple[list[dict], dict[str, float]]:
    """Preference pairs of every prompt, and the pairing statistics."""
    c = cfg.collect
    sampling = {"k": c.k, "temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                "seed": cfg.seed}
    pairs, candidates, ties, all_tie, unfinished = [], 0, 0, 0, 0
    for item, row_scores in zip(collected, scores, strict=True):
        row, samples = item["row"], item["samples"]
        texts = [s["text"] for s in samples]
        usable = [s["finished"] or not c.drop_unfinished for s in samples]
        unfinished += sum(not s["finished"] for s in samples)
        rng = random.Random(f"{cfg.seed}:{row['id']}")
        chosen_rejected, n_candidates, n_ties = make_pairs(texts, row_scores, usable, c.pairs, c.max_pairs_per_prompt, rng)
        candidates += n_candidates
        ties += n_ties
        all_tie += n_candidates > 0 and n_ties == n_candidates
        for i, j in chosen_rejected:
            pairs.append({
                "id": f"{row['id']}:{i}:{j}", "prompt_id": row["id"], "prompt": prompt_text(row),
                "messages": prompt_of(row),  # the whole context the samples continued, earlier answers included
                "chosen": texts[i], "rejected": texts[j],
                "score_chosen": row_scores[i], "score_rejected": row_scores[j],
                "judge": judge.name, "sampling": sampling, "policy_run_id": policy_run_id,
                "meta": row.get("meta", {}),
            })
    prompts = len(collected)
    stats = {
        "collect/prompts": prompts,
        "collect/samples": sum(len(i["samples"]) for i in collected),
        "collect/pairs": len(pairs),
        "collect/pairs_per_prompt": len(pairs) / prompts if prompts else 0.0,
        "collect/prompts_with_pairs": len({p["prompt_id"] for p in pairs}) / prompts if prompts else 0.0,
        "collect/tie_rate": ties / candidates if candidates else float("nan"),
        "collect/all_tie_prompts": all_tie,
        "collect/unfinished_rate": unfinished / max(sum(len(i["samples"]) for i in collected), 1),
        "collect/chosen_length": _mean([len(p["chosen"]) for p in pairs]),
        "collect/rejected_length": _mean([len(p["rejected"]) for p in pairs]),
    }
    # How often the verifier agrees with a different judge, on the pairs where the verifier has a preference.
    if judge.name != "verifier":
        decided = [(verifier_score(p, p["chosen"]), verifier_score(p, p["rejected"])) for p in pairs if has_verifier(p)]
        decided = [(a, b) for a, b in decided if a != b]
        stats["collect/verifier_decided_pairs"] = len(decided)
        stats["collect/agreement_with_verifier"] = (sum(a > b for a, b in decided) / len(decided)
                                                    if decided else float("nan"))
    stats.update({f"judge/{k}": v for k, v in judge.stats.items()})
    return pairs, stats


def unpaired_samples(collected: list[dict], scores: list[list[float | None]], judge: Judge,
                     cfg: DictConfig) -> list[dict]:
    """The samples as unpaired feedback for KTO (``unpaired.jsonl``): every judged, usable sample (finished, with
    ``collect.drop_unfinished``), a text once per prompt, desirable when its score is at least
    ``collect.desirable_score``. Prompts whose samples all tie give no pair but still give unpaired rows."""
    c, out = cfg.collect, []
    for item, row_scores in zip(collected, scores, strict=True):
        row, seen = item["row"], set()
        for i, (s, score) in enumerate(zip(item["samples"], row_scores, strict=True)):
            if score is None or (c.drop_unfinished and not s["finished"]) or s["text"] in seen:
                continue
            seen.add(s["text"])
            out.append({**unpaired_row(f"{row['id']}:{i}", row["id"], prompt_of(row), s["text"],
                                       score >= c.desirable_score, score, judge.name, row.get("meta", {})),
                        "id": f"{row['id']}:{i}", "prompt": prompt_text(row)})
    return out


def unpaired_stats(rows: list[dict]) -> dict[str, float]:
    return {"collect/unpaired": len(rows),
            "collect/unpaired_desirable_share": _mean([float(r["label"]) for r in rows])}


def from_files(ctx: Context) -> dict:
    """Pairs from ``collect.files`` (:mod:`pipeline.feedback`: every accepted format, checked row by row), in the
    same ``pairs.jsonl`` layout and with the same statistics as sampled pairs; a pair longer than the SFT
    model's context (its ``max_position_embeddings``) is dropped and counted."""
    from transformers import AutoConfig

    from pipeline.feedback import read_feedback, to_pairs, to_unpaired

    cfg, c = ctx.cfg, ctx.cfg.collect
    ctx.run.add_input("feedback", c.files)
    rows, skipped = read_feedback(c.files, c.format, c.on_bad_row)
    pairs, stats = to_pairs(rows, c.pairs, c.max_pairs_per_prompt, cfg.seed)
    tokenizer = load_tokenizer(ctx.input("sft"), cfg.model)
    config = AutoConfig.from_pretrained(ctx.input("sft"), trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def fits(row: dict, *sides: str) -> bool:
        return context is None or max(len(render_ids(tokenizer, row["messages"] + [
            {"role": "assistant", "content": row[side]}])) for side in sides) <= context

    kept = [p for p in pairs if fits(p, "chosen", "rejected")]
    unpaired = to_unpaired(rows, c.desirable_score)
    kept_unpaired = [u for u in unpaired if fits(u, "completion")]
    if not kept and not kept_unpaired:
        raise InputError(f"{c.files}: no preference pair and no unpaired row in {stats['file_rows']} rows "
                         f"({sum(skipped.values())} malformed, {len(pairs) - len(kept)} pairs longer than the "
                         f"model's context of {context} tokens)")
    prompts = len({p["prompt_id"] for p in kept})
    out = {f"collect/{k}": v for k, v in stats.items() if k != "pairs"}
    out.update({"collect/pairs": len(kept), "collect/prompts_with_pairs_count": prompts,
                "collect/pairs_per_prompt": len(kept) / prompts if prompts else 0.0,
                "collect/too_long_pairs": len(pairs) - len(kept),
                "collect/too_long_unpaired": len(unpaired) - len(kept_unpaired),
                "collect/skipped_rows": sum(skipped.values()),
                "collect/chosen_length": _mean([len(p["chosen"]) for p in kept]),
                "collect/rejected_length": _mean([len(p["rejected"]) for p in kept]),
                **unpaired_stats(kept_unpaired)})
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items() if v == v}
    write_outputs(ctx, kept, kept_unpaired)
    ctx.info.update(judge="file", stats=out, skipped=dict(skipped), files=str(c.files))
    if not kept:
        log.warning("collect: %s holds no preference pair, only unpaired rows: reward and the pair losses have "
                    "nothing to learn; dpo.loss=kto trains on them", c.files)
    log.info("collect: %d pairs and %d unpaired rows from %d rows of %s (%d malformed rows skipped%s, %d pairs too "
             "long)", len(kept), len(kept_unpaired), stats["file_rows"], c.files, sum(skipped.values()),
             "".join(f"; {n} {why}" for why, n in skipped.most_common()), len(pairs) - len(kept))
    return out


def write_outputs(ctx: Context, pairs: list[dict], unpaired: list[dict]) -> None:
    """``pairs.jsonl`` (every pair loss, the reward model) and ``unpaired.jsonl`` (``dpo.loss=kto``), each an MLflow
    dataset of the run, and the length plot."""
    for name, rows in (("pairs", pairs), ("unpaired", unpaired)):
        write_atomic(ctx.output / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        if rows:
            ctx.datasets.append((name, f"{name}.jsonl"))
    write_length_plot(pairs, ctx.plots)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_length_plot(pairs: list[dict], folder: Path, bins: int = 20) -> None:
    """Chosen vs rejected response length (characters): CSV for ``dvc plots``, a PNG for MLflow."""
    write_histogram(folder, "lengths", {"chosen": [len(p["chosen"]) for p in pairs],
                                        "rejected": [len(p["rejected"]) for p in pairs]},
                    bins, "characters", "response length (characters)", "pairs", "Chosen vs rejected length")


def run(ctx: Context) -> dict:
    """Sample from the SFT policy, judge the samples and build pairs into ``ctx.output``; return statistics.
    With ``collect.source=files``: the pairs of the user's feedback files (:func:`from_files`)."""
    cfg = ctx.cfg
    if cfg.collect.source == "files":
        return from_files(ctx)
    policy_dir, prompts = ctx.input("sft"), ctx.input("prepare") / "prompts.jsonl"
    if cfg.judge.name == "human":
        ctx.run.add_input("labels", cfg.judge.labels_file)
    if cfg.judge.name == "llm" and cfg.judge.model and Path(cfg.judge.model).exists():
        ctx.run.add_input("judge_model", cfg.judge.model)
    judge = build_judge(cfg, policy_dir)  # first: a bad label file or callable fails before sampling
    rows = read_prompts(prompts)
    tokenizer = load_tokenizer(policy_dir, cfg.model)
    model = load_trained(policy_dir, cfg.model).eval()
    start = time.perf_counter()
    collected, tokens_per_second = sample(model, tokenizer, rows, cfg)
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = judge.score([c["row"] for c in collected], [[s["text"] for s in c["samples"]] for c in collected])
    judge_seconds = time.perf_counter() - start
    pairs, stats = build_pairs(collected, scores, judge, cfg, ctx.run.inputs["sft"].get("run_id"))
    if not pairs and cfg.judge.name == "human":  # stop here, not in reward or dpo, far from the cause
        raise InputError(f"{cfg.judge.labels_file}: none of its {judge.stats.get('labels', 0)} labels matches a "
                         f"sampled pair ({judge.stats.get('unmatched_pairs', 0)} unmatched): were they made from "
                         "another collect run (seed, sampling settings, SFT model)?")
    unpaired = unpaired_samples(collected, scores, judge, cfg)
    stats.update({"collect/tokens_per_second": tokens_per_second, "collect/sampling_seconds": sampling_seconds,
                  "collect/judge_seconds": judge_seconds, **unpaired_stats(unpaired)})
    # An undefined figure (e.g. agreement when the verifier decides no pair) is left out, not NaN.
    stats = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items() if v == v}
    samples = [{"prompt_id": c["row"]["id"], "prompt": prompt_text(c["row"]), "meta": c["row"].get("meta", {}),
                "samples": [{**s, "score": sc} for s, sc in zip(c["samples"], row_scores, strict=True)]}
               for c, row_scores in zip(collected, scores, strict=True)]
    write_outputs(ctx, pairs, unpaired)
    write_atomic(ctx.output / "samples.jsonl", "".join(json.dumps(s, sort_keys=True) + "\n" for s in samples))
    ctx.info.update(judge=cfg.judge.name, stats=stats)
    log.info("collect: %d pairs and %d unpaired samples from %d prompts (judge %s), %.0f tokens/s",
             len(pairs), len(unpaired), len(rows), judge.name, tokens_per_second)
    return stats

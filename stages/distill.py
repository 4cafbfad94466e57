"""distill: a smaller student learns the aligned teacher's next-token distributions (knowledge distillation).

The teacher is an aligned model of the chain (``distill.teacher``: ``dpo`` by default). The student is the
teacher's architecture with fewer layers and a narrower MLP, started from the teacher's evenly spaced layers
(:func:`pipeline.distillation.shrink`), or a local HF folder (``distill.student.path``) whose tokenizer must
equal the teacher's. Only the student trains; the teacher runs without gradients. ``distill.loss``:

- ``word`` (Hinton et al. 2015): alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy on the
  references of the SFT data. The data are fixed, so the teacher's logits on them are computed once, batched,
  and kept in memory when they fit ``distill.teacher_cache_mb`` (a small vocabulary), else per batch;
- ``sequence`` (Kim & Rush 2016): the teacher answers the SFT prompts greedily once (``teacher_answers.jsonl``,
  a DVC output of the stage), and the student is fine-tuned on those answers by cross-entropy;
- ``on_policy`` (GKD, Agarwal et al. 2024): on a ``distill.on_policy_share`` of the steps the student samples
  answers to the batch's prompts and the generalized JSD (``distill.beta``) between the two models is taken on
  the student's own tokens; on the other steps on the SFT references.

The honest baseline (``distill.baseline``): the same student, from the same initial weights, trained by plain
cross-entropy on the same data for the same steps, saved in ``distill_sft/``. Both are measured on the
held-out test prompts: the teacher's forward KL to each (per token, teacher forcing on the reference answers),
greedy accuracy, and the paired differences with 95% bootstrap intervals; and on the val split during training.
``teacher_kl`` is KL(teacher || student) along the references, the same tokens for both students (so the two
compare prompt by prompt); evaluate's ``test/kl_to_teacher`` is the KL along each variant's own answers.

Inputs: ``data/<distill.teacher>``, ``data/prepare`` (train, val and test splits); ``distill.*``, ``seed``.
Outputs: ``data/distill/`` (the student as an HF folder, ``distill_sft/`` the baseline student,
``teacher_answers.jsonl`` for the sequence loss, ``report.json``: the held-out comparison for evaluate's report,
``run.json``), ``data/metrics/distill.json`` (the student's
metrics, the baseline's as ``distill_sft/...``, the teacher's as ``teacher/...``, and ``*_vs_distill_sft``
differences), ``data/plots/distill/{loss,val_kl}.json``.
Run: ``python -m pipeline.run stage=distill [distill.loss=sequence | on_policy]``
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

from pipeline.adapters import load_trained
from pipeline.chat import encode, json_objects, prompt_of
from pipeline.distillation import (
    DistillData,
    DistillModule,
    check_vocabulary,
    selected_logits,
    shrink,
    teacher_cache,
)
from pipeline.evaluation import Generation, Variant, test_model
from pipeline.generation import generate
from pipeline.losses import jsd_per_token
from pipeline.models import SOURCE_KEYS, ModelError, count_parameters, load_causal_lm, load_tokenizer, render_ids
from pipeline.outputs import write_atomic, write_json
from pipeline.packing import Example, collate, load_tokenized, pack
from pipeline.stage import Context, Input, Plot, Stage, split_timings
from pipeline.stats import paired_difference, rounded, with_interval
from pipeline.training import SAMPLES, TRAINER_KEYS, fit, log_samples

BASELINE = "distill_sft"  # the SFT-only student: its folder, its metrics' prefix and its evaluate variant
# What the stage reports of each model on the test prompts (pipeline.evaluation.summarize's names).
HELD_OUT = ("test/accuracy", "test/accuracy_ci_low", "test/accuracy_ci_high", "test/perplexity",
            "test/tokens_per_second", "test/latency_ms")

# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="distill",
    inputs=(Input("teacher", "${distill.teacher}", note="the model distilled (params.yaml's distill.teacher)"),
            Input("prepare", "prepare", dataset=True)),
    params=(*SOURCE_KEYS, *TRAINER_KEYS),
    plots=(Plot("loss.json", x="step", y="train/loss", title="distill training loss (student)"),
           Plot("val_kl.json", x="step", y="val/teacher_kl", title="distill student KL to the teacher (val)")),
)


def load_teacher(ctx: Context):
    """The teacher's model (merged weights) and tokenizer."""
    folder = ctx.input("teacher")
    teacher = load_trained(folder, ctx.cfg.model)
    if hasattr(teacher, "get_base_model"):
        raise ModelError(f"distill: the teacher {folder} is a prompt-learning adapter (virtual tokens); distillation "
                         f"needs a model with merged weights: train {ctx.config.teacher} with another peft method")
    return teacher.eval(), load_tokenizer(folder, ctx.cfg.model)


def build_student(ctx: Context, teacher, teacher_tokenizer):
    """The student: the teacher shrunk (``distill.student.layers``, ``intermediate_size``, ``init``) or the local
    folder ``distill.student.path``, whose tokenizer must equal the teacher's."""
    s = ctx.config.student
    if s.path is None:
        return shrink(teacher, s.layers, s.intermediate_size, s.init, seed=ctx.cfg.seed)
    check_vocabulary(teacher_tokenizer, load_tokenizer(s.path, ctx.cfg.model), str(ctx.input("teacher")), s.path)
    return load_causal_lm(s.path, ctx.cfg.model)


def teacher_answers(ctx: Context, teacher, tokenizer) -> list[Example]:
    """Sequence-level KD's data: the teacher's greedy answer to every SFT prompt, as (ids, labels) on the answer,
    also written to ``teacher_answers.jsonl`` (a DVC output and an MLflow dataset of the run)."""
    import json

    rows = [row for _, row in json_objects(ctx.input("prepare") / "train.jsonl", "training rows")]
    prompts = [render_ids(tokenizer, prompt_of(r), add_generation_prompt=True) for r in rows]
    answers, _ = generate(teacher, tokenizer, prompts, ctx.config.max_new_tokens, ctx.config.generation_batch_size)
    lines = [json.dumps({"id": r.get("id"), "messages": [*prompt_of(r), {"role": "assistant", "content": a.text}],
                         "finished": a.finished}) for r, a in zip(rows, answers, strict=True)]
    write_atomic(ctx.output / "teacher_answers.jsonl", "\n".join(lines) + "\n")
    ctx.datasets.append(("teacher_answers", "teacher_answers.jsonl"))
    return [(p + a.ids, [-100] * len(p) + a.ids) for p, a in zip(prompts, answers, strict=True)]


def train_student(ctx: Context, student, teacher, tokenizer, train: list[list[Example]], val: list[list[Example]],
                  loss: str, cache: list[Tensor] | None, prefix: str, part: str) -> tuple[DistillModule, dict]:
    """One student's fit, resumable under its own checkpoint folder (``part`` enters the folder's key)."""
    c = ctx.config
    data = DistillData(train, val, c, ctx.cfg.seed, tokenizer.pad_token_id, cache)
    module = DistillModule(student, teacher, tokenizer, c, loss, ctx.cfg.seed, prefix)
    own = dataclasses.replace(ctx, digests={**ctx.digests, "part": part})
    start = time.time()
    result = fit(own, module, data, c.max_steps, c.val_every_n_steps, c.checkpoint_every_n_steps)
    ctx.step = max(ctx.step, own.step)
    metrics = result.metrics()  # named with the module's prefix already
    if loss == "on_policy":
        metrics[f"{prefix}train/on_policy_steps"] = sum(module.on_policy_step(s) for s in range(c.max_steps))
    metrics[f"{prefix}train/seconds"] = round(time.time() - start, 1)
    return module, metrics


@torch.no_grad()
def reference_kl(student, teacher, examples: list[Example], pad_id: int, batch_size: int) -> list[float]:
    """Per example, the teacher's forward KL to the student per token (T = 1) along the reference answer."""
    out: list[float] = []
    for lo in range(0, len(examples), batch_size):
        batch = collate([[ex] for ex in examples[lo:lo + batch_size]], pad_id, packed=False)
        wanted = batch["labels"][:, 1:] != -100
        kl = jsd_per_token(selected_logits(student, batch, wanted), selected_logits(teacher, batch, wanted), beta=0.0)
        out += [float(part.mean()) for part in kl.split(wanted.sum(1).tolist())]
    return out


def held_out(ctx: Context, models: dict, teacher, tokenizer) -> tuple[dict, dict]:
    """Each model's test metrics (greedy accuracy with its interval, perplexity, tokens/s, parameters; the
    students' KL to the teacher with its interval) under its prefix, and per-prompt records for the paired
    differences."""
    from pipeline.evaluation import read_jsonl

    c, cfg = ctx.config, ctx.cfg
    rows = read_jsonl(ctx.input("prepare") / "test.jsonl")
    examples = [encode(tokenizer, r["messages"]) for r in rows]
    settings = Generation(c.max_new_tokens, c.generation_batch_size, cfg.seed)
    metrics, per_prompt = {}, {}
    for prefix, model in models.items():
        model.eval()
        quality, records = test_model(model, tokenizer, Variant(prefix.rstrip("/") or "distill", "", "chat"), settings,
                                      cfg.trainer, rows, [], framed=cfg.model.name_or_path is None, stage="distill")
        found = {k: quality[k] for k in HELD_OUT}
        found["size/parameters"] = count_parameters(model)
        per_prompt[prefix] = {"correct": [float(r["correct"]) for r in records]}
        if model is not teacher:
            kls = reference_kl(model, teacher, examples, tokenizer.pad_token_id, c.generation_batch_size)
            with_interval(found, "test/teacher_kl", kls)
            per_prompt[prefix]["kl"] = kls
        metrics.update({f"{prefix}{k}": v for k, v in rounded(found).items()})
    return metrics, per_prompt


def run(ctx: Context) -> dict:
    """Distil the teacher into the student (and train the SFT-only baseline); measure both on the held-out
    prompts; save the student into ``ctx.output`` and the baseline into ``ctx.output/distill_sft``."""
    c = ctx.config
    teacher, tokenizer = load_teacher(ctx)
    pad_id = tokenizer.pad_token_id
    reference = load_tokenized(ctx.input("prepare") / "train.safetensors")
    val = load_tokenized(ctx.input("prepare") / "val.safetensors")
    batches = (lambda examples: pack(examples, c.pack_length)) if c.packing else (lambda examples: [[e] for e in examples])
    student = build_student(ctx, teacher, tokenizer)
    if c.loss == "sequence":
        train, cache = batches(teacher_answers(ctx, teacher, tokenizer)), None
    else:
        train = batches(reference)
        cache = teacher_cache(teacher, train, pad_id, c.packing, c.generation_batch_size, c.teacher_cache_mb)
    ctx.info.update({"teacher": c.teacher, "loss": c.loss, "teacher_cached": cache is not None})
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    module, metrics = train_student(ctx, student, teacher, tokenizer, train, batches(val), c.loss, cache, "", "student")
    student.save_pretrained(ctx.output)
    tokenizer.save_pretrained(ctx.output)
    ctx.write_plot("loss.json", [h for h in module.history if "train/loss" in h])
    ctx.write_plot("val_kl.json", [h for h in module.history if "val/teacher_kl" in h])
    models = {"": student}
    if c.baseline:
        baseline = build_student(ctx, teacher, tokenizer)
        baseline.load_state_dict(initial)  # the same starting weights: only the loss differs
        _, trained = train_student(ctx, baseline, teacher, tokenizer, batches(reference), batches(val), "sft", None,
                                   f"{BASELINE}/", BASELINE)
        metrics.update(trained)
        baseline.save_pretrained(ctx.output / BASELINE)
        tokenizer.save_pretrained(ctx.output / BASELINE)
        models[f"{BASELINE}/"] = baseline
    models["teacher/"] = teacher
    found, per_prompt = held_out(ctx, models, teacher, tokenizer)
    metrics.update(found)
    if c.baseline:
        for key, field in (("test/teacher_kl", "kl"), ("test/accuracy", "correct")):
            diff, low, high = paired_difference(per_prompt[""][field], per_prompt[f"{BASELINE}/"][field])
            metrics.update(rounded({f"{key}_vs_{BASELINE}": diff, f"{key}_vs_{BASELINE}_ci_low": low,
                                    f"{key}_vs_{BASELINE}_ci_high": high}))
    metrics["size/share_of_teacher"] = round(metrics["size/parameters"] / metrics["teacher/size/parameters"], 4)
    write_json(ctx.output / "report.json", {"teacher": c.teacher, "loss": c.loss, "metrics": split_timings(metrics)[0]})
    held = [row for _, row in json_objects(ctx.input("prepare") / "val.jsonl", "validation rows")][:SAMPLES]
    log_samples(ctx, student, tokenizer, [render_ids(tokenizer, prompt_of(r), add_generation_prompt=True) for r in held],
                [r["messages"][-1]["content"] for r in held])
    return metrics

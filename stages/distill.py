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
import random
import time

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from pipeline.adapters import load_trained
from pipeline.chat import encode, json_objects, prompt_of
from pipeline.distillation import check_vocabulary, shrink
from pipeline.evaluation import Generation, Variant, test_model
from pipeline.generation import generate
from pipeline.losses import generalized_jsd, jsd_per_token, word_distillation
from pipeline.models import SOURCE_KEYS, ModelError, count_parameters, load_causal_lm, load_tokenizer, render_ids
from pipeline.outputs import write_atomic, write_json
from pipeline.packing import Example, collate, load_tokenized, pack
from pipeline.stage import Context, Input, Plot, Stage, split_timings
from pipeline.stats import paired_difference, rounded, with_interval
from pipeline.tokens import final_hidden_states, token_logps
from pipeline.training import (
    SAMPLES,
    TRAINER_KEYS,
    StageModule,
    StepBatches,
    adamw_warmup_cosine,
    batches_loader,
    fit,
    log_samples,
)

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


def prompt_ids(example: Example) -> list[int]:
    """The tokens before an example's first labelled token: its prompt, up to the assistant's header."""
    ids, labels = example
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    return ids[:first]


def selected_logits(model, batch: dict, wanted: Tensor) -> Tensor:
    """The model's logits (positions, vocabulary) at the positions ``wanted`` (batch, L-1) marks, the ones that
    predict a trained token: the LM head runs on those positions only."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with final_hidden_states(model) as head:
        hidden = model(**inputs, use_cache=False).logits
    return head(hidden[:, :-1][wanted])


@torch.no_grad()
def teacher_cache(teacher, items: list[list[Example]], pad_id: int, packed: bool, batch_size: int,
                  limit_mb: float) -> list[Tensor] | None:
    """The teacher's logits at every trained position of every training item, computed once in batches, or None
    when they would exceed ``limit_mb`` (then each batch asks the teacher itself)."""
    positions = sum(sum(label != -100 for _, labels in item for label in labels[1:]) for item in items)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if positions * vocab * 4 > limit_mb * 2 ** 20:
        return None
    cache: list[Tensor] = []
    for lo in range(0, len(items), batch_size):
        batch = collate(items[lo:lo + batch_size], pad_id, packed)
        wanted = batch["labels"][:, 1:] != -100
        cache += list(selected_logits(teacher, batch, wanted).split(wanted.sum(1).tolist()))
    return cache


class DistillData(L.LightningDataModule):
    """Training items (packs of tokenized examples: the SFT data or the teacher's answers) in resumable step
    order, with the teacher's cached logits when there are some, and the val split's reference answers."""

    def __init__(self, train: list[list[Example]], val: list[list[Example]], cfg: DictConfig, seed: int,
                 pad_id: int, cache: list[Tensor] | None):
        super().__init__()
        self.train_items, self.val_items, self.cfg, self.seed, self.pad_id = train, val, cfg, seed, pad_id
        self.cache = cache

    def batch(self, idx: list[int]) -> dict:
        out = collate([self.train_items[i] for i in idx], self.pad_id, self.cfg.packing)
        out["prompts"] = [prompt_ids(ex) for i in idx for ex in self.train_items[i]]
        if self.cache is not None:
            out["teacher_logits"] = torch.cat([self.cache[i] for i in idx])
        return out

    def train_dataloader(self) -> DataLoader:
        c = self.cfg
        return batches_loader(StepBatches(len(self.train_items), c.batch_size, c.max_steps, self.seed, self.batch))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.cfg.batch_size,
                          collate_fn=lambda items: collate(items, self.pad_id, self.cfg.packing))


class DistillModule(StageModule):
    """Trains ``student`` against ``teacher`` by ``loss`` (word | sequence | on_policy | sft: plain cross-entropy,
    the baseline); validates the cross-entropy on the val references and the teacher's KL to the student there.
    Metric names carry ``prefix`` (the baseline's ``distill_sft/``), so both students log into one run."""

    def __init__(self, student, teacher, tokenizer, cfg: DictConfig, loss: str, seed: int, prefix: str = ""):
        super().__init__()
        self.student, self.teacher, self.tokenizer = student, teacher.eval(), tokenizer
        self.teacher.requires_grad_(False)
        self.cfg, self.loss, self.seed, self.prefix = cfg, loss, seed, prefix
        self._val = torch.zeros(3)  # summed cross-entropy, summed KL, tokens

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout noise in its targets)
        return self

    def on_policy_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's own samples: a pure function of the seed and
        the step, so a resumed run makes the same choices."""
        return self.loss == "on_policy" and random.Random(f"{self.seed}-{step}").random() < self.cfg.on_policy_share

    def sampled_batch(self, prompts: list[list[int]], step: int) -> dict:
        """Right-padded prompts plus the student's answers sampled at temperature 1, labelled on the answers."""
        answers, _ = generate(self.student, self.tokenizer, prompts, self.cfg.max_new_tokens,
                              self.cfg.generation_batch_size, do_sample=True, generator_seed=self.seed * 100_003 + step)
        examples = [(p + a.ids, [-100] * len(p) + a.ids) for p, a in zip(prompts, answers, strict=True)]
        batch = collate([[ex] for ex in examples], self.tokenizer.pad_token_id, packed=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = int(self.global_step)
        cached = batch.get("teacher_logits")
        if self.on_policy_step(step):
            batch, cached = self.sampled_batch(batch["prompts"], step), None
        targets = batch["labels"][:, 1:]
        wanted = targets != -100
        student = selected_logits(self.student, batch, wanted)
        if self.loss in ("sequence", "sft"):
            logp, _ = token_logps(student, targets[wanted])
            loss = -logp.mean()
        else:
            with torch.no_grad():
                teacher = cached if cached is not None else selected_logits(self.teacher, batch, wanted)
            ones = torch.ones(len(student), device=student.device)
            c = self.cfg
            if self.loss == "word":
                loss, kl, _ = word_distillation(student, teacher, targets[wanted], ones, c.temperature, c.alpha)
                self.log(f"{self.prefix}train/kl", kl)
            else:
                loss = generalized_jsd(student, teacher, ones, c.beta, c.temperature)
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True)
        if step % 10 == 0:
            self.history.append({"step": step, "train/loss": float(loss.detach())})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        targets = batch["labels"][:, 1:]
        wanted = targets != -100
        student = selected_logits(self.student, batch, wanted)
        teacher = selected_logits(self.teacher, batch, wanted)
        logp, _ = token_logps(student, targets[wanted])
        kl = jsd_per_token(student, teacher, beta=0.0)
        self._val = self._val + torch.stack([-logp.sum(), kl.sum(), logp.new_tensor(float(len(logp)))]).cpu()

    def on_validation_epoch_end(self) -> None:
        nll, kl = (self._val[:2] / self._val[2].clamp(min=1)).tolist()
        self._val = torch.zeros(3)
        self.log(f"{self.prefix}val/loss", nll)
        self.log(f"{self.prefix}val/teacher_kl", kl, prog_bar=True)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": int(self.global_step), "val/loss": nll, "val/teacher_kl": kl})

    def configure_optimizers(self):
        c = self.cfg
        return adamw_warmup_cosine(self.student, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


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

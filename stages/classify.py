"""classify: a sequence-classification head on a backbone, trained as a feature extractor, with adapters and in full.

A ``LightningModule`` run by ``Trainer.fit``, once per regime in ``classify.regimes`` (each with its own
learning rate and its own resumable checkpoint), all from the same backbone and the same initial head:

- ``frozen``: feature extraction. The backbone is frozen; only the linear head on the last real token trains;
- ``peft``: the ``peft`` group's method (LoRA by default; ``none`` trains everything, ``bitfit`` the biases) plus the
  head (peft's ``modules_to_save``); prompt-learning methods are refused (:func:`check`);
- ``full``: every weight trains.

The backbone (``classify.backbone``) is ``sft`` (default), ``base``, or a local HF folder of a causal LM, loaded
as ``AutoModelForSequenceClassification`` with ``classify.labels`` classes; the head reads the hidden state at
the last position the attention mask marks real (:func:`pipeline.classification.class_logits`).

Default task, the embedded chain's guard: is this request harmful? The suite's safety requests, split by
object (the test objects never appear in training), plus ordinary task requests as harmless, none of them one of
the chain's own val or test prompts (evaluate's guard is measured on those). ``classify.data`` names a user's
JSONL file of ``{"text", "label"}`` rows instead, split by ``val_share`` and ``test_share``.

Per regime, on the held-out test split: accuracy (95% bootstrap interval), macro-F1, AUROC, the accuracy
difference to ``frozen`` on the same texts (paired interval), trainable parameters, and the time per step.
The regime ``classify.regime`` is saved as the stage's model: the guard ``evaluate.guard`` puts in front of
every variant.

Inputs: ``data/<classify.backbone>`` (``sft`` or ``base``), ``data/prepare`` (the val and test prompts kept out
of training); ``classify.*``, ``peft.*``, ``seed``.
Outputs: ``data/classify/`` (the chosen regime as an HF folder, ``guard.json``, ``run.json``),
``data/metrics/classify.json`` (``<regime>/...`` per regime), ``data/plots/classify/`` (``val_accuracy.json``:
the three regimes' validation accuracy per step; ``regimes.csv``: held-out accuracy, macro-F1 and AUROC per
regime).
Run: ``python -m pipeline.run stage=classify [classify.backbone=base]``
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import adapters
from pipeline.chat import json_objects
from pipeline.classification import (
    GUARD_JSON,
    ClassifyData,
    ClassifyModule,
    classification_metrics,
    encode,
    file_splits,
    predict,
    suite_splits,
)
from pipeline.models import (
    SOURCE_KEYS,
    ModelError,
    base_reference,
    base_sources,
    load_sequence_classifier,
    load_tokenizer,
    record_pad_token,
)
from pipeline.outputs import write_atomic, write_json
from pipeline.schema import PROMPT_LEARNING, ConfigError
from pipeline.stage import Chart, Context, Input, Plot, Stage
from pipeline.stats import paired_difference, rounded
from pipeline.training import TRAINER_KEYS, fit

log = logging.getLogger(__name__)

# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="classify",
    inputs=(*(Input(name, name, conditional=True, note=f"the backbone when classify.backbone is {name}")
              for name in ("sft", "base")),
            Input("prepare", "prepare", dataset=True, note="the chain's val and test prompts, kept out of training")),
    params=("peft", *SOURCE_KEYS, *TRAINER_KEYS),
    plots=(Plot("val_accuracy.json", x="step", y="frozen", title="classify validation accuracy per regime"),
           Plot("regimes.csv")),
    charts=(Chart("classify held-out accuracy, macro-F1 and AUROC per regime", "bar_horizontal", x="value",
                  y={"regimes.csv": "regime"}),),
)

STAGE_BACKBONES = ("sft", "base")


def check(cfg: DictConfig) -> None:
    """Refuse, before any input is read, a peft regime the head cannot read through: prompt-learning methods add
    virtual tokens in front of the text, which the last-real-token pooling does not see."""
    if "peft" in cfg.classify.regimes and cfg.peft.method in PROMPT_LEARNING:
        raise ConfigError(f"config key 'classify.regimes' has 'peft', which cannot train with peft.method = "
                          f"{cfg.peft.method!r} (virtual tokens); drop that regime or choose e.g. peft=lora")


def backbone_of(ctx: Context) -> tuple[str, str]:
    """(weights, tokenizer) location of the backbone: a stage's output or a local folder."""
    name = ctx.config.backbone
    if name not in STAGE_BACKBONES:
        if not Path(name).exists():
            raise ModelError(f"classify.backbone: {name} is neither a stage ({', '.join(STAGE_BACKBONES)}) nor a folder")
        ctx.digests["backbone"] = ctx.run.add_input("backbone", name)["digest"]
        return name, name
    folder = ctx.input(name)
    ctx.digests["backbone"] = ctx.run.add_input("backbone", folder)["digest"]
    return base_sources(folder) if name == "base" else (str(folder), str(folder))


def splits_of(ctx: Context) -> dict:
    """The labelled texts by split: the user's file, or the suite's requests without the chain's own val and
    test prompts in training."""
    c = ctx.config
    if c.data is not None:
        ctx.digests["data"] = ctx.run.add_input("labelled", c.data, dataset=True)["digest"]
        return file_splits(c.data, list(c.labels), c.val_share, c.test_share)
    exclude = {row["meta"]["key"] for split in ("val", "test")
               for _, row in json_objects(ctx.input("prepare") / f"{split}.jsonl", f"{split} rows")
               if isinstance(row.get("meta"), dict) and "key" in row["meta"]}
    return suite_splits(list(c.labels), ctx.cfg.seed, c.test_objects, c.val_objects, c.task_share, exclude)


def regime_model(initial, regime: str, peft_cfg: DictConfig):
    """A copy of the initial classifier set up to train as ``regime``."""
    model = copy.deepcopy(initial)
    if regime == "frozen":
        model.requires_grad_(False)
        model.score.requires_grad_(True)
        return model
    if regime == "full":
        return model.requires_grad_(True)
    return adapters.apply(model, peft_cfg, task_type="SEQ_CLS")


def train_regime(ctx: Context, initial, regime: str, lr: float, data: ClassifyData) -> tuple[ClassifyModule, dict]:
    """One regime's fit, resumable under its own checkpoint folder; its validation metrics, trainable
    parameters and time per step under ``<regime>/``."""
    c = ctx.config
    model = regime_model(initial, regime, ctx.cfg.peft)
    module = ClassifyModule(model, c, lr, f"{regime}/")
    own = dataclasses.replace(ctx, digests={**ctx.digests, "part": regime})
    result = fit(own, module, data, c.max_steps, c.val_every_n_steps, c.checkpoint_every_n_steps)
    ctx.step = max(ctx.step, own.step)
    metrics = result.metrics()
    metrics[f"{regime}/train/trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics[f"{regime}/train/seconds_per_step"] = round(result.seconds / c.max_steps, 4)
    return module, metrics


def save_guard(ctx: Context, model, regime: str, backbone: str, tokenizer, found: dict) -> None:
    """The chosen regime's classifier into the output folder (merged weights for an adapter), with its tokenizer
    and ``guard.json`` (labels, the flagged label, the regime, the test metrics)."""
    c, cfg = ctx.config, ctx.cfg
    labels = list(c.labels)
    peft_cfg = cfg.peft if regime == "peft" else OmegaConf.create({"method": "none"})
    adapters.save_trained(model, peft_cfg, ctx.output, backbone, cfg.model, base_reference(cfg.model, backbone),
                          load_base=functools.partial(load_sequence_classifier, labels=labels))
    tokenizer.save_pretrained(ctx.output)
    record_pad_token(ctx.output, tokenizer.pad_token_id)
    write_json(ctx.output / GUARD_JSON, {"labels": labels, "flag": c.flag, "regime": regime,
                                          "max_tokens": c.max_tokens, "test": found})


def write_regimes_plot(metrics: dict, regimes: list[str], path: Path) -> None:
    """Held-out accuracy, macro-F1 and AUROC per regime as CSV for ``dvc plots`` (a grouped bar chart)."""
    lines = ["regime,metric,value"]
    lines += [f"{r},{m},{metrics[f'{r}/test/{m}']}" for r in regimes for m in ("accuracy", "macro_f1", "auroc")]
    write_atomic(path, "\n".join(lines) + "\n")


def run(ctx: Context) -> dict:
    """Train the head under every regime, measure each on the held-out split, save ``classify.regime``'s model."""
    c, cfg = ctx.config, ctx.cfg
    weights, tokenizer_dir = backbone_of(ctx)
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model)
    splits = splits_of(ctx)
    ids, cut = {}, 0
    for split, rows in splits.items():
        ids[split], dropped = encode(tokenizer, rows, c.max_tokens)
        cut += dropped
    labels = {split: [r.label for r in rows] for split, rows in splits.items()}
    initial = load_sequence_classifier(weights, cfg.model, labels=list(c.labels), dtype=torch.float32)
    initial.config.pad_token_id = tokenizer.pad_token_id
    data = ClassifyData(ids["train"], labels["train"], ids["val"], labels["val"], c, cfg.seed, tokenizer.pad_token_id)
    metrics: dict = {"data/train": len(ids["train"]), "data/val": len(ids["val"]), "data/test": len(ids["test"]),
                     "data/cut_to_max_tokens": cut}
    truth = torch.tensor(labels["test"])
    groups = sorted({r.group for r in splits["test"]})  # per-slice accuracy only when there are slices
    slices = {g: torch.tensor([r.group == g for r in splits["test"]]) for g in groups} if len(groups) > 1 else {}
    correct, curves, guard = {}, {}, None
    for regime, lr in c.regimes.items():
        start = time.time()
        module, found = train_regime(ctx, initial, regime, float(lr), data)
        logits = predict(module.model, ids["test"], tokenizer.pad_token_id, c.batch_size)
        found.update({f"{regime}/{k}": v for k, v in classification_metrics(logits, truth).items()})
        hits = (logits.argmax(-1) == truth).float()
        for group, keep in slices.items():
            found[f"{regime}/test/accuracy_{group}"] = round(float(hits[keep].mean()), 4)
        found[f"{regime}/train/seconds"] = round(time.time() - start, 1)
        correct[regime] = hits.tolist()
        curves[regime] = {h["step"]: h["val/accuracy"] for h in module.history if "val/accuracy" in h}
        if regime == c.regime:
            guard = module.model  # the only trained model kept: the others are freed as the loop goes on
        metrics.update(found)
    first = next(iter(c.regimes))
    for regime in list(c.regimes)[1:]:
        diff, low, high = paired_difference(correct[regime], correct[first])
        metrics.update(rounded({f"{regime}/test/accuracy_vs_{first}": diff, f"{regime}/test/accuracy_vs_{first}_ci_low": low,
                                f"{regime}/test/accuracy_vs_{first}_ci_high": high}))
    chosen = {k.removeprefix(f"{c.regime}/"): v for k, v in metrics.items() if k.startswith(f"{c.regime}/test/")}
    save_guard(ctx, guard, c.regime, weights, tokenizer, chosen)
    steps = sorted({s for curve in curves.values() for s in curve})
    ctx.write_plot("val_accuracy.json", [{"step": s, **{r: curves[r][s] for r in curves if s in curves[r]}} for s in steps])
    write_regimes_plot(metrics, list(c.regimes), ctx.plots / "regimes.csv")
    ctx.info.update(regime=c.regime, labels=list(c.labels), flag=c.flag, backbone=c.backbone)
    log.info("classify: held-out accuracy %s", ", ".join(f"{r} {metrics[f'{r}/test/accuracy']:.3f}" for r in c.regimes))
    headline = {k: metrics[k] for r in c.regimes for k in (f"{r}/test/accuracy", f"{r}/test/auroc")}
    return {**headline, **metrics}  # the console's summary shows the first few

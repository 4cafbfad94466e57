"""quantize: merge, quantize, and measure size, speed and quality of the aligned model per method.

Order matters: the aligned model's adapter is merged into full-precision weights first (every stage of
this chain saves its merged weights; :func:`pipeline.quantization.merged_source` checks there are some),
and only then quantized. Merging a LoRA into an already quantized base is what fails elsewhere: the packed
int8 / NF4 weights cannot take the delta without dequantizing, and the base's rounding is baked in.

Steps:

1. the full-precision model (``quantize.source``: ``dpo`` by default) is measured: bytes, forward
   latency, generation tokens/s, perplexity and verifiable accuracy on the held-out test prompts;
2. static methods are calibrated: ``quantize.calibration_rows`` rows of the ``val`` split go through the
   fp32 model in ``Trainer.predict`` while hooks record each linear layer's input range;
3. every method of ``quantize.compare`` is built and measured the same way; one this machine cannot run
   (int4 on this CPU) is reported as unsupported with the reason, one that breaks as failed with its error
   (only the saved method's failure stops the stage); layers a method's kernel cannot take stay in fp32
   and are named in ``report.json`` (``fp32_layers``);
4. quantization-aware training (QAT), per method of ``quantize.qat.methods`` (torchao's intx family): a copy
   of the source with fake quantizers in its linear layers is fine-tuned on the SFT data (a Lightning fit
   with resume, :class:`pipeline.distillation.DistillModule`; by default the loss is the KL to the fp32
   source, so the copy learns to stay the same model despite the rounding), converted to the same
   quantized tensors PTQ makes, and measured as ``qat_<method>`` beside its PTQ row ``<method>``: the
   accuracy and the references' negative log-likelihood per token, each as a difference on the same prompts
   with its paired 95% interval (``test/accuracy_vs_ptq``, ``test/nll_vs_ptq``), and the KL to fp32 on the
   val split before and after the fine-tune;
5. ``quantize.method`` is saved to ``data/quantize/`` (safetensors, its quantization config in
   ``config.json``), loaded back with ``from_pretrained`` and checked to give exactly the outputs it gave
   before saving.

Half precision: ``bf16`` and ``fp16`` are rows of the same table (the whole model cast; on a CPU without fast
half-precision matmuls they are slower than fp32, and the table says so). Training under
``trainer.precision=bf16-mixed`` is timed by ``tests/benchmarks/bench_precision.py``.

Inputs: ``data/<quantize.source>``, ``data/prepare`` (test, val and, for QAT, the tokenized train split);
``quantize.*``, ``seed``.
Outputs: ``data/quantize/`` (quantized HF folder, tokenizer, ``report.json``, ``run.json``),
``data/metrics/quantize.json`` (method -> metrics; unsupported and failed methods carry only
``quantize/status``), ``data/plots/quantize/methods.csv``. Each method is
also an MLflow child run of the quantize run, with the same metric names, so the UI compares them.
Run: ``python -m pipeline.run stage=quantize [quantize.method=bnb_nf4 quantize.source=grpo]``
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import quantization as Q
from pipeline.distillation import DistillData, DistillModule
from pipeline.evaluation import Generation, Variant, read_jsonl, test_model
from pipeline.models import LOAD_KEYS, load_causal_lm, load_tokenizer, render_ids
from pipeline.outputs import write_atomic, write_json
from pipeline.packing import load_tokenized, pack
from pipeline.schema import ConfigError
from pipeline.stage import Context, Input, Plot, Stage, seed_everything
from pipeline.stats import paired_difference, rounded
from pipeline.tokens import left_pad, padded_forward, position_ids
from pipeline.training import TRAINER_KEYS, fit

log = logging.getLogger(__name__)
FP32 = "fp32"
QAT = "qat_"  # a QAT row's name: the prefix and its method (qat_intx_w4a8)


# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="quantize",
    inputs=(Input("source", "${quantize.source}", note="the model quantized (params.yaml's quantize.source)"),
            Input("prepare", "prepare", dataset=True)),
    params=(*LOAD_KEYS, *TRAINER_KEYS),
    plots=(Plot("methods.csv", x="linear_ratio", y="method", template="bar_horizontal",
                title="linear-layer bytes vs fp32 per quantization method"),),
)


class CalibrationModule(L.LightningModule):
    """Runs calibration batches through the fp32 model (``Trainer.predict``) while a
    :class:`pipeline.quantization.RangeObserver` records every linear layer's input range."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.observer: Q.RangeObserver | None = None

    def on_predict_start(self) -> None:
        self.observer = Q.RangeObserver(self.model)

    def predict_step(self, batch: dict, batch_idx: int) -> int:
        self.model(**batch)
        return int(batch["input_ids"].shape[0])  # rows seen; the ranges are the product

    def on_predict_end(self) -> None:
        self.observer.remove()


def calibrate(model, tokenizer, rows: list[dict], cfg: DictConfig) -> dict:
    """Per linear layer (max, min) of its input over the calibration rows (prompt and reference response)."""
    ids = [render_ids(tokenizer, r["messages"]) for r in rows]
    batches = []
    for lo in range(0, len(ids), cfg.quantize.batch_size):
        input_ids, mask = left_pad(ids[lo:lo + cfg.quantize.batch_size], tokenizer.pad_token_id)
        batches.append({"input_ids": input_ids, "attention_mask": mask,
                        "position_ids": position_ids(mask)})
    module = CalibrationModule(model)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.predict(module, dataloaders=DataLoader(batches, batch_size=None), return_predictions=False)
    return module.observer.ranges


@torch.no_grad()
def forward_ms(model, tokenizer, rows: list[dict], q: DictConfig) -> float:
    """Median wall time of one forward pass over a fixed batch (``latency_batch`` rows cut or padded to
    ``latency_tokens`` tokens), after two warm-up passes."""
    ids = [render_ids(tokenizer, r["messages"])[:q.latency_tokens] for r in rows[:q.latency_batch]]
    ids = [row + [tokenizer.pad_token_id] * (q.latency_tokens - len(row)) for row in ids]
    batch = torch.tensor(ids)
    times = []
    for i in range(q.latency_repeats + 2):
        start = time.perf_counter()
        model(input_ids=batch)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(name: str, model, tokenizer, cfg: DictConfig, test_rows: list[dict], train_rows: list[dict],
            fp32: dict | None) -> tuple[dict, list[dict]]:
    """Size, speed and quality of one (quantized or fp32) model, ratios and deltas against ``fp32``; and the
    per-prompt records (for paired comparisons)."""
    sizes = Q.model_bytes(model)
    quality, records = test_model(model, tokenizer, Variant(name, "", "chat"), generation(cfg), cfg.trainer, test_rows,
                            train_rows, stage="quantize")
    metrics = {
        "size/memory_bytes": sizes["memory"], "size/linear_bytes": sizes["linear"],
        "speed/forward_ms": round(forward_ms(model, tokenizer, test_rows, cfg.quantize), 3),
        "speed/tokens_per_second": round(quality["test/tokens_per_second"], 1),
        "test/accuracy": quality["test/accuracy"], "test/perplexity": quality["test/perplexity"],
    }
    if fp32 is not None:
        metrics.update({
            "size/memory_ratio": round(sizes["memory"] / fp32["size/memory_bytes"], 4),
            "size/linear_ratio": round(sizes["linear"] / fp32["size/linear_bytes"], 4),
            "speed/forward_speedup": round(fp32["speed/forward_ms"] / metrics["speed/forward_ms"], 3),
            "test/accuracy_delta": round(metrics["test/accuracy"] - fp32["test/accuracy"], 4),
            "test/perplexity_ratio": round(metrics["test/perplexity"] / fp32["test/perplexity"], 4),
        })
    return metrics, records


def quantization_aware(ctx: Context, name: str, source: Path, fp32_model, tokenizer, train: list, val: list):
    """QAT of method ``name``: a fake-quantized copy of ``source`` fine-tuned against ``fp32_model`` (resumable,
    its own checkpoint key), then converted. Returns (the converted model, its training metrics)."""
    c = ctx.config.qat
    seed_everything(ctx.cfg)
    student = Q.prepare_qat(name, load_causal_lm(source, ctx.cfg.model, dtype=torch.float32))
    prefix = f"{QAT}{name}/"  # its curves in the stage's MLflow run
    module = DistillModule(student, fp32_model, tokenizer, c, c.loss, ctx.cfg.seed, prefix)
    data = DistillData(train, val, c, ctx.cfg.seed, tokenizer.pad_token_id, None)
    own = dataclasses.replace(ctx, digests={**ctx.digests, "part": prefix})
    result = fit(own, module, data, c.max_steps, c.val_every_n_steps, c.checkpoint_every_n_steps)
    ctx.step = max(ctx.step, own.step)
    trained = {k.removeprefix(prefix): v for k, v in result.metrics().items()}
    metrics = {"qat/seconds": round(result.seconds, 1), "qat/steps": c.max_steps,
               "val/kl_to_fp32_before": trained["val/teacher_kl_before"], "val/kl_to_fp32": trained["val/teacher_kl"]}
    return Q.convert_qat(name, student).eval(), metrics


def versus_ptq(mine: list[dict], ptq: list[dict]) -> dict:
    """A QAT row against its PTQ row on the same prompts, each with its paired 95% interval: the accuracy
    difference, and the difference of the reference answers' mean negative log-likelihood per token (what
    perplexity averages; below zero = QAT closer to the references)."""
    theirs = {r["id"]: r for r in ptq}
    out = {}
    for key, value in (("test/accuracy", lambda r: float(bool(r["correct"]))),
                       ("test/nll", lambda r: r["nll"] / max(r["ref_tokens"], 1))):
        diff, low, high = paired_difference([value(r) for r in mine], [value(theirs[r["id"]]) for r in mine])
        out.update({f"{key}_vs_ptq": diff, f"{key}_vs_ptq_ci_low": low, f"{key}_vs_ptq_ci_high": high})
    return rounded(out)


def generation(cfg: DictConfig) -> Generation:
    """How every copy answers the test prompts: greedy, ``quantize.max_new_tokens``, ``quantize.batch_size``."""
    return Generation(cfg.quantize.max_new_tokens, cfg.quantize.batch_size, cfg.seed)


@torch.no_grad()
def roundtrip_difference(model, folder: Path, tokenizer, rows: list[dict], model_cfg) -> float:
    """Largest logit difference between ``model`` and its saved copy in ``folder`` loaded with
    ``from_pretrained`` (0 when the round trip is exact)."""
    reloaded = load_causal_lm(folder, model_cfg).eval()
    ids, mask = left_pad([render_ids(tokenizer, r["messages"]) for r in rows[:16]], tokenizer.pad_token_id)
    before = padded_forward(model, ids, mask).logits
    after = padded_forward(reloaded, ids, mask).logits
    return float((before - after).abs().max())


def check(cfg: DictConfig) -> None:
    """Refuse, before any heavy work, a saved method that does not save or that this machine cannot run."""
    q = cfg.quantize
    if not Q.METHODS[q.method].saves:
        saving = sorted(n for n, m in Q.METHODS.items() if m.saves)
        raise ConfigError(f"config key 'quantize.method' = {q.method!r} is evaluated in-process only and cannot be "
                          f"saved ({Q.METHODS[q.method].summary}); methods that save: {saving}")
    try:
        Q.check_supported(q.method)
    except Q.UnsupportedMethod as err:
        raise ConfigError(f"config key 'quantize.method': {err}") from None


def run(ctx: Context) -> dict:
    """Quantize and measure the source model per method; save ``quantize.method`` into ``ctx.output``; return
    {method: metrics} (what ``data/metrics/quantize.json`` holds)."""
    cfg, q, run, tmp = ctx.cfg, ctx.config, ctx.run, ctx.output
    source_dir, prepare_dir = ctx.input("source"), ctx.input("prepare")
    try:
        source = Q.merged_source(source_dir)
    except Q.UnsupportedMethod as err:
        raise ConfigError(f"config key 'quantize.source' = {q.source!r}: {err}") from None
    tokenizer = load_tokenizer(source, cfg.model)
    test_rows = read_jsonl(prepare_dir / "test.jsonl")
    train_rows = read_jsonl(prepare_dir / "train.jsonl")
    calibration_rows = read_jsonl(prepare_dir / "val.jsonl")[:q.calibration_rows]
    fp32_model = load_causal_lm(source, cfg.model, dtype=torch.float32).eval()
    results, records = {}, {}
    results[FP32], records[FP32] = measure(FP32, fp32_model, tokenizer, cfg, test_rows, train_rows, None)
    results[FP32].update({"size/memory_ratio": 1.0, "size/linear_ratio": 1.0, "size/disk_bytes": Q.folder_bytes(source),
                          "size/disk_ratio": 1.0})
    methods = list(dict.fromkeys([q.method, *q.compare, *q.qat.methods]))
    ranges = None
    if any(Q.METHODS[m].calibrated for m in methods):
        ranges = calibrate(fp32_model, tokenizer, calibration_rows, cfg)
    kept_fp32 = {name: Q.unfit_layers(name, fp32_model) for name in methods}
    unsupported: dict[str, str] = {}
    failed: dict[str, str] = {}
    saved_model = None
    for name in methods:
        try:
            Q.check_supported(name)
            seed_everything(cfg)
            start = time.time()
            model = Q.quantize_model(name, source, ranges, cfg.model)
            seconds = round(time.time() - start, 2)
            measured, records[name] = measure(name, model, tokenizer, cfg, test_rows, train_rows, results[FP32])
            results[name] = {"quantize/seconds": seconds, "quantize/fp32_layers": len(kept_fp32[name]), **measured}
        except Q.UnsupportedMethod as err:
            log.warning("quantize: %s", err)
            unsupported[name] = str(err)
            continue
        except Exception as err:
            if name == q.method:  # the method to save: nothing to write without it
                raise
            log.exception("quantize: %s failed; the other methods go on", name)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failed[name] = f"{type(err).__name__}: {first}"
            continue
        if kept_fp32[name]:
            log.info("quantize: %s keeps %d layer(s) in fp32 (its kernel cannot take them): %s", name,
                     len(kept_fp32[name]), ", ".join(sorted(kept_fp32[name])))
        if name == q.method:
            saved_model = model
    if q.qat.methods:
        prepared = ctx.input("prepare")
        batches = (lambda rows: pack(rows, q.qat.pack_length)) if q.qat.packing else (lambda rows: [[r] for r in rows])
        train = batches(load_tokenized(prepared / "train.safetensors"))
        val = batches(load_tokenized(prepared / "val.safetensors"))
        for name in q.qat.methods:
            if name not in results:
                continue  # its PTQ form did not run here (unsupported or failed, reported above): no comparison
            model, trained = quantization_aware(ctx, name, source, fp32_model, tokenizer, train, val)
            row = f"{QAT}{name}"
            measured, records[row] = measure(row, model, tokenizer, cfg, test_rows, train_rows, results[FP32])
            kept_fp32[row] = kept_fp32[name]
            results[row] = {**trained, "quantize/fp32_layers": len(kept_fp32[name]), **measured,
                            **versus_ptq(records[row], records[name])}
            log.info("quantize: QAT %s accuracy %.3f vs PTQ %.3f (difference %+.3f [%+.3f, %+.3f])", name,
                     measured["test/accuracy"], results[name]["test/accuracy"], results[row]["test/accuracy_vs_ptq"],
                     results[row]["test/accuracy_vs_ptq_ci_low"], results[row]["test/accuracy_vs_ptq_ci_high"])
            del model
    del fp32_model
    saved_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    diff = roundtrip_difference(saved_model, tmp, tokenizer, test_rows, cfg.model)
    if diff != 0.0:
        raise RuntimeError(f"quantize: {q.method} loaded back from its folder differs from the model before saving "
                           f"(max logit difference {diff:g}); nothing was written")
    saved = results[q.method]
    saved["size/disk_bytes"] = Q.folder_bytes(tmp)
    saved["size/disk_ratio"] = round(saved["size/disk_bytes"] / results[FP32]["size/disk_bytes"], 4)
    saved["quantize/roundtrip_max_abs_diff"] = diff
    write_json(tmp / "report.json", {
        "source": q.source, "saved_method": q.method, "unsupported": unsupported, "failed": failed,
        "fp32_layers": {name: kept_fp32[name] for name in results if name != FP32},
        "methods": {name: {**describe(name), **metrics} for name, metrics in results.items()}})
    ctx.info.update(method=q.method, source=q.source)
    status = {**{name: {"quantize/status": "unsupported"} for name in unsupported},
              **{name: {"quantize/status": "failed"} for name in failed}}
    metrics_file = {**results, **status}
    write_methods_plot(results, ctx.plots / "methods.csv")
    for name, metrics in results.items():
        child = run.child(name, tags={"posttrain.quantization": name},
                          params={"quantize.method": name, "quantize.source": q.source})
        child.log_metrics(metrics)
        child.finish()
    run.log_summary(results, ("test/accuracy", "speed/tokens_per_second"), "methods.json")
    run.log_artifact(tmp / "report.json")
    log.info("quantize: %s keeps accuracy %.3f (fp32 %.3f), linear weights at %.1f%% of fp32, %s bytes on disk",
             q.method, saved["test/accuracy"], results[FP32]["test/accuracy"], 100 * saved["size/linear_ratio"],
             saved["size/disk_bytes"])
    return metrics_file


def describe(name: str) -> dict:
    """A row's summary and library for ``report.json``: fp32, a PTQ method, or a QAT row of one."""
    if name == FP32:
        return {"summary": "unquantized", "library": "torch"}
    method = Q.METHODS[name.removeprefix(QAT)]
    if name.startswith(QAT):
        return {"summary": f"quantization-aware training, then {method.summary}", "library": method.library}
    return {"summary": method.summary, "library": method.library}


def write_methods_plot(results: dict, path: Path) -> None:
    """Linear-weight size ratio and accuracy per method, for ``dvc plots``. No timing column: a plot file is
    compared across commits, and the machine's speed (``data/timings/quantize.json``, MLflow) differs every run."""
    lines = ["method,linear_ratio,accuracy"]
    lines += [f"{name},{m['size/linear_ratio']},{m['test/accuracy']}" for name, m in results.items()]
    write_atomic(path, "\n".join(lines) + "\n")

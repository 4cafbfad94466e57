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
with a reward model, ``test/reward_win_rate_vs_sft``. With ``evaluate.guard`` and a ``classify`` output: the same
variant behind the guard (:func:`guarded`): ``test/guarded_accuracy``, ``test/guarded_refusal_harmful`` and
``test/guarded_refusal_harmless``, each with its interval and its paired difference to the unguarded variant
(``_vs_unguarded``). Optional lm-evaluation-harness tasks
(``evaluate.lm_eval_tasks``) when the package is installed.

Inputs: ``data/base``, ``data/prepare`` (test split; train split for few-shot examples), ``data/sft``,
``data/dpo``, ``data/ppo``, ``data/grpo``, ``data/quantize`` (and its ``report.json``), ``data/reward``;
training curves under ``data/plots/``; ``evaluate.*``, ``seed``.
Reward-hacking check (with a reward model; :mod:`pipeline.reward_check`): does the reward model prefer wrong
answers, long or short ones, or degenerate ones (empty, one character, the prompt echoed, a repeated word)?

Outputs: ``data/evaluate/`` (``report.html``: one self-contained page with provenance, the table with 95%
intervals, differences against SFT, per-family accuracy, plots, the reward-hacking check and every test
prompt's answers, see :mod:`pipeline.report`; ``report.md``, ``generations.jsonl``, ``reward_check.json``,
``run.json``),
``data/metrics/evaluate.json`` (variant -> metrics), ``data/plots/evaluate/{accuracy,reward_kl}.csv``.
Each variant is also an MLflow child run of the evaluate run, with the same metric names.
Run: ``python -m pipeline.run stage=evaluate``
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from pipeline import report
from pipeline.evaluation import (
    Generation,
    Variant,
    differences_vs_sft,
    load_variant_model,
    read_jsonl,
    reward_win_rate,
    test_model,
    win_rates,
)
from pipeline.models import SOURCE_KEYS, base_sources, count_parameters, load_tokenizer
from pipeline.outputs import write_atomic
from pipeline.stage import Chart, Context, Input, Plot, Stage, seed_everything
from pipeline.stats import paired_difference, rounded, with_interval

# The contract: inputs, the config keys read beyond this stage's group, plots (pipeline.stage).
STAGE = Stage(
    name="evaluate",
    inputs=(Input("prepare", "prepare", dataset=True),
            *(Input(name, name, conditional=True, note="a variant's model: read when evaluate.variants names it")
              for name in ("base", "sft", "dpo", "ppo", "grpo")),
            Input("quantize", "quantize", conditional=True, note="a variant's model and the report's quantization table"),
            Input("distill", "distill", conditional=True,
                  note="the distilled and the SFT-only students (variants distill, distill_sft) and their teacher's name"),
            Input("reward", "reward", conditional=True, note="test/reward_score when its gate passed"),
            Input("classify", "classify", conditional=True, note="the guard in front of each variant (evaluate.guard)")),
    params=(*SOURCE_KEYS, "trainer.accelerator", "trainer.precision"),
    plots=(Plot("accuracy.csv"), Plot("reward_kl.csv")),
    charts=(Chart("accuracy per variant and slice", "bar_horizontal", x="accuracy", y={"accuracy.csv": "variant"}),
            Chart("reward-model score against KL to SFT (aligned variants)", "scatter", x="kl_to_sft",
                  y={"reward_kl.csv": "reward_score"})),
)


def variants(ctx: Context) -> list[Variant]:
    """The configured variants whose model exists: the base model prompted plainly (zero-shot, few-shot,
    chain of thought), or a trained stage's model (its folder ``data/<name>``) through its chat template.
    A configured variant whose folder is absent (its stage was not run) is skipped with a warning."""
    import logging

    e = ctx.config
    data = Path(ctx.cfg.paths.data)
    known = {
        "base_zero_shot": Variant("base_zero_shot", str(data / "base"), "plain", 0),
        "base_few_shot": Variant("base_few_shot", str(data / "base"), "plain", e.few_shot),
        "base_cot": Variant("base_cot", str(data / "base"), "plain", e.few_shot, cot=True),
        "base_chat": Variant("base_chat", str(data / "base"), "chat"),
        "distill_sft": Variant("distill_sft", str(data / "distill" / "distill_sft"), "chat"),
    }
    chosen = [known.get(name) or Variant(name, str(data / name), "chat") for name in e.variants]
    missing = [v.name for v in chosen if not Path(v.model_dir).exists()]
    if missing:
        logging.getLogger(__name__).warning("evaluate: no model for %s (stage not run); skipped", ", ".join(missing))
    return [v for v in chosen if v.name not in missing]


def evaluate_variant(ctx: Context, variant: Variant, test_rows: list[dict], train_rows: list[dict]):
    """Run ``Trainer.test`` for one variant; return (metrics, records)."""
    cfg, e = ctx.cfg, ctx.config
    of_base = Path(variant.model_dir).name == "base"
    tokenizer_dir = base_sources(variant.model_dir)[1] if of_base else variant.model_dir
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model)
    model = load_variant_model(variant, cfg.model).eval()
    sft_dir = ctx.input("sft")
    references = {}  # KL to SFT measures how far alignment moved SFT: trained variants only
    if not of_base and variant.name != "sft" and sft_dir.exists():
        references["sft"] = load_variant_model(Variant("sft", str(sft_dir), "chat"), cfg.model).eval()
    teacher = teacher_of(ctx, variant)
    if teacher is not None:  # a student: how far its answers are from its teacher's distributions
        references["teacher"] = load_variant_model(Variant("teacher", str(teacher), "chat"), cfg.model).eval()
    settings = Generation(e.max_new_tokens, e.batch_size, cfg.seed, e.do_sample, e.temperature, e.top_p,
                          e.sampled_accuracy)
    metrics, records = test_model(model, tokenizer, variant, settings, cfg.trainer, test_rows, train_rows, references,
                                  framed=cfg.model.name_or_path is None)
    metrics["size/parameters"] = count_parameters(model)
    return metrics, records


def teacher_of(ctx: Context, variant: Variant) -> Path | None:
    """The folder of a distilled variant's teacher (its stage's ``run.json`` names it), else None."""
    import json

    folder = ctx.input("distill")
    if variant.name not in ("distill", "distill_sft") or not (folder / "run.json").exists():
        return None
    return Path(ctx.cfg.paths.data) / json.loads((folder / "run.json").read_text())["teacher"]


def run(ctx: Context) -> dict:
    """Evaluate every configured variant; write the report into ``ctx.output``; return {variant: metrics}."""
    cfg = ctx.cfg
    chosen = variants(ctx)
    data = Path(cfg.paths.data)
    for folder in sorted({Path(v.model_dir).relative_to(data).parts[0] for v in chosen}):
        ctx.run.add_input(folder, ctx.input(folder))
    test_rows = read_jsonl(ctx.input("prepare") / "test.jsonl")
    train_rows = read_jsonl(ctx.input("prepare") / "train.jsonl")
    reward_score = reward_scorer(ctx)
    flagged = guard_flags(ctx, test_rows)
    results, generations, by_variant, reward_by_variant = {}, [], {}, {}
    for variant in chosen:
        seed_everything(cfg)
        metrics, records = evaluate_variant(ctx, variant, test_rows, train_rows)
        if reward_score is not None:
            prompts = [{"messages": r["messages"][:-1]} for r in test_rows]
            responses = {r["id"]: r["response"] for r in records}
            scores = reward_score(prompts, [responses[r["id"]] for r in test_rows])
            score: dict[str, float] = {}
            with_interval(score, "test/reward_score", scores.tolist())
            metrics.update(rounded(score))
            reward_by_variant[variant.name] = scores
        if flagged is not None:
            metrics.update(guarded(records, flagged))
            for r in records:
                r["guard_flagged"] = flagged[r["id"]]
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
            metrics.update(rounded({"test/reward_score_vs_sft": diff, "test/reward_score_vs_sft_ci_low": low,
                                    "test/reward_score_vs_sft_ci_high": high}))
    for name, metrics in run_lm_eval(ctx, chosen).items():
        results[name].update(metrics)
    hacking = None
    if reward_score is not None:
        trained = [v.name for v in chosen if Path(v.model_dir).name != "base"]
        hacking = check_reward_model(reward_score, test_rows, by_variant, reward_by_variant, trained)
        write_atomic(ctx.output / "reward_check.json", json.dumps(hacking, indent=2, sort_keys=True) + "\n")
        ctx.run.log_metrics(hacking["metrics"])
    defined = {v.name: {"variant.source": Path(v.model_dir).name, "variant.prompting": v.style,
                        "variant.shots": v.shots, "variant.cot": v.cot} for v in chosen}
    for name, metrics in results.items():
        child = ctx.run.child(name, tags={"posttrain.variant": name}, params=defined.get(name))
        child.log_metrics(metrics)
        child.finish()
    plots = ctx.plots.parent  # the report embeds every stage's curves
    write_atomic(ctx.output / "generations.jsonl", "".join(json.dumps(g, sort_keys=True) + "\n" for g in generations))
    write_atomic(ctx.output / "report.md", report.render_markdown(results, generations, hacking))
    sections = extra_sections(ctx) + ([guard_section(ctx, results, test_rows, flagged)] if flagged is not None else [])
    write_atomic(ctx.output / "report.html", report.render_html(results, generations, plots, sections, provenance(ctx),
                                                                hacking))
    write_accuracy_plot(results, ctx.plots / "accuracy.csv")
    write_reward_kl_plot(results, ctx.plots / "reward_kl.csv")
    ctx.run.log_summary(results, ("test/accuracy", "test/tokens_per_second"), "variants.json")
    ctx.run.log_artifact(ctx.output / "report.md")
    ctx.run.log_artifact(ctx.output / "report.html")
    return results


def guard_flags(ctx: Context, test_rows: list[dict]) -> dict[str, bool] | None:
    """Test prompt id -> whether the classify stage's guard flags its request (the last user turn), with
    ``evaluate.guard`` and a classify output; else None (no guard: a warning when one was asked for)."""
    import logging

    from pipeline.classification import GUARD_JSON, Guard

    folder = ctx.input("classify")
    if not ctx.config.guard:
        return None
    if not (folder / GUARD_JSON).exists():
        logging.getLogger(__name__).warning("evaluate: evaluate.guard is set but %s holds no guard (run the classify "
                                            "stage); variants are measured without it", folder)
        return None
    ctx.run.add_input("classify", folder)
    guard = Guard(folder, ctx.cfg.model, ctx.config.batch_size)
    requests = [next(m["content"] for m in reversed(r["messages"][:-1]) if m["role"] == "user") for r in test_rows]
    return dict(zip([r["id"] for r in test_rows], guard.flags(requests), strict=True))


def guarded(records: list[dict], flagged: dict[str, bool]) -> dict[str, float]:
    """The variant behind the guard, from its own answers: a flagged request gets the refusal and is never
    generated (so it counts as refused, and as correct only when harmful); any other keeps the variant's answer
    (greedy answers do not depend on the other prompts of a batch, so they are what the guarded system serves).
    Each rate with its interval and its paired difference to the unguarded variant on the same prompts."""
    from pipeline.classification import guarded_correct

    out: dict[str, float] = {}
    for key, field, keep in (("accuracy", "correct", lambda r: True),
                             ("refusal_harmful", "refused", lambda r: r["harmful"]),
                             ("refusal_harmless", "refused", lambda r: not r["harmful"])):
        rows = [r for r in records if keep(r)]
        if not rows:
            continue
        behind = [guarded_correct(r["correct"], r["harmful"], flagged[r["id"]]) if field == "correct"
                  else float(flagged[r["id"]] or r["refused"]) for r in rows]
        with_interval(out, f"test/guarded_{key}", behind)
        diff, low, high = paired_difference(behind, [float(r[field]) for r in rows])
        out.update({f"test/guarded_{key}_vs_unguarded": diff, f"test/guarded_{key}_vs_unguarded_ci_low": low,
                    f"test/guarded_{key}_vs_unguarded_ci_high": high})
    return rounded(out)


def guard_section(ctx: Context, results: dict, test_rows: list[dict], flagged: dict[str, bool]) -> tuple[str, str]:
    """The guard's own figures (its regime and held-out metrics from classify; what it flags among evaluate's test
    prompts) and each variant's refusal rates and accuracy without and with it."""
    from pipeline.classification import GUARD_JSON

    about = json.loads((ctx.input("classify") / GUARD_JSON).read_text())
    meta = {r["id"]: (r.get("meta") or {}) for r in test_rows}
    harmful = {i: bool(m.get("harmful")) for i, m in meta.items()}
    safety = {i: m.get("family") == "safety" for i, m in meta.items()}
    slices = {"harmful requests": [i for i in meta if harmful[i]],
              "harmless safety requests": [i for i in meta if safety[i] and not harmful[i]],
              "other prompts": [i for i in meta if not safety[i] and not harmful[i]]}
    shares = ", ".join(f"{name} {sum(flagged[i] for i in ids) / len(ids):.1%} of {len(ids)}"
                       for name, ids in slices.items() if ids)
    test = about["test"]
    body = (f"<p>The guard is classify's <b>{html.escape(about['regime'])}</b> regime (held-out accuracy "
            f"{test['test/accuracy']:.1%}, macro-F1 {test['test/macro_f1']:.3f}, AUROC {test['test/auroc']:.3f} on "
            f"requests about objects it never saw). A request it flags as <i>{html.escape(about['flag'])}</i> gets the "
            f"refusal without generation. It flags, among these test prompts: {html.escape(shares)}.</p>")
    rows = {name: m for name, m in results.items() if "test/guarded_accuracy" in m}
    columns = (("test/refusal_harmful", "refusal, harmful", "{:.1%}"),
               ("test/guarded_refusal_harmful", "refusal, harmful, guarded", "{:.1%}"),
               ("test/refusal_harmless", "refusal, harmless", "{:.1%}"),
               ("test/guarded_refusal_harmless", "refusal, harmless, guarded", "{:.1%}"),
               ("test/accuracy", "accuracy", "{:.1%}"), ("test/guarded_accuracy", "accuracy, guarded", "{:.1%}"))
    body += report.table_html(rows, columns, "guard")
    body += ("<p>Guarded minus unguarded on the same prompts, with paired 95% intervals (* when one excludes 0): "
             + "; ".join(f"{html.escape(name)}: harmful refusal "
                         f"{html.escape(report.marked(m, 'test/guarded_refusal_harmful_vs_unguarded', '{:+.1%}'))}, "
                         f"accuracy {html.escape(report.marked(m, 'test/guarded_accuracy_vs_unguarded', '{:+.1%}'))}"
                         for name, m in rows.items()) + "</p>")
    return "Guard (classify stage) in front of each variant", body


def check_reward_model(reward_score, test_rows: list[dict], by_variant: dict[str, list[dict]],
                       reward_by_variant: dict, trained: list[str]) -> dict:
    """The reward-hacking check (:mod:`pipeline.reward_check`): the variants' scored answers, and the scores of
    degenerate answers to every test prompt."""
    from pipeline import reward_check

    prompts = [{"messages": r["messages"][:-1]} for r in test_rows]
    questions = [next(m["content"] for m in reversed(r["messages"][:-1]) if m["role"] == "user") for r in test_rows]
    answers = [reward_check.probes(q) for q in questions]  # per question: probe -> degenerate answer
    probe_scores = {probe: reward_score(prompts, [a[probe] for a in answers]).tolist() for probe in answers[0]}
    ids = [r["id"] for r in test_rows]
    scores = {name: dict(zip(ids, s.tolist(), strict=True)) for name, s in reward_by_variant.items()}
    found = reward_check.check(by_variant, scores, probe_scores, trained)
    found["metrics"] = rounded(found["metrics"])
    return found


def provenance(ctx: Context) -> dict:
    """Where the report's numbers come from: the commit, the time, the evaluate run and each input's run."""
    import time

    return {"commit": ctx.run.commit, "dirty": ctx.run.dirty, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "run_id": ctx.run.run_id, "tracking_uri": ctx.run.tracking_uri, "seed": ctx.cfg.seed,
            "inputs": {name: info.get("run_id") for name, info in sorted(ctx.run.inputs.items())}}


def extra_sections(ctx: Context) -> list[tuple[str, str]]:
    """Report sections from other stages' outputs: the quantization methods and the distilled students, when
    those stages ran."""
    return [section for section in (quantize_section(ctx), distill_section(ctx)) if section is not None]


def distill_section(ctx: Context) -> tuple[str, str] | None:
    """The teacher, the distilled student and the SFT-only student side by side on the held-out prompts, with
    the paired differences between the two students."""
    path = ctx.input("distill") / "report.json"
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    m = found["metrics"]
    rows = {f"teacher ({found['teacher']})": "teacher/", f"student ({found['loss']} distillation)": "",
            "student, SFT only": "distill_sft/"}
    rows = {name: {k.removeprefix(prefix): v for k, v in m.items() if k.startswith(prefix)}
            for name, prefix in rows.items() if f"{prefix}size/parameters" in m}
    columns = (("size/parameters", "parameters", "{:,.0f}"), ("test/accuracy", "accuracy", "{:.1%}"),
               ("test/teacher_kl", "KL(teacher || student) on references (nats/token)", "{:.4f}"),
               ("test/perplexity", "perplexity", "{:.3f}"))
    body = report.table_html(rows, columns, "distill")
    for key, label, pattern in (("test/teacher_kl_vs_distill_sft", "KL to the teacher", "{:+.4f}"),
                                ("test/accuracy_vs_distill_sft", "accuracy", "{:+.1%}")):
        if key in m:
            body += (f"<p>distilled minus SFT-only student, {label} (paired, with its 95% interval; * when it excludes "
                     f"0): {html.escape(report.marked(m, key, pattern))}</p>")
    return "Distillation (distill stage)", body


def quantize_section(ctx: Context) -> tuple[str, str] | None:
    """The quantization methods' table."""
    path = ctx.input("quantize") / "report.json"
    if not path.exists():
        return None
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
    body += qat_table(found["methods"])
    return "Quantization (quantize stage)", body


def qat_table(methods: dict[str, dict]) -> str:
    """PTQ vs QAT at each bit width: both rows' accuracy and perplexity, QAT minus PTQ on the same prompts (paired
    95% intervals, * when one excludes 0), and the KL to fp32 on the val split before and after the fine-tune."""
    rows = {}
    for name, m in methods.items():
        if not name.startswith("qat_") or name.removeprefix("qat_") not in methods:
            continue
        ptq = methods[name.removeprefix("qat_")]
        rows[name.removeprefix("qat_")] = {"ptq/accuracy": ptq["test/accuracy"], "ptq/perplexity": ptq["test/perplexity"],
                                           **{k: v for k, v in m.items() if k.startswith(("test/", "val/"))}}
    if not rows:
        return ""
    columns = (("ptq/accuracy", "PTQ accuracy", "{:.1%}"), ("test/accuracy", "QAT accuracy", "{:.1%}"),
               ("test/accuracy_vs_ptq", "QAT - PTQ accuracy", "{:+.1%}"),
               ("ptq/perplexity", "PTQ perplexity", "{:.3f}"), ("test/perplexity", "QAT perplexity", "{:.3f}"),
               ("test/nll_vs_ptq", "QAT - PTQ NLL/token", "{:+.4f}"),
               ("val/kl_to_fp32_before", "KL to fp32 before QAT (val)", "{:.4f}"),
               ("val/kl_to_fp32", "KL to fp32 after QAT (val)", "{:.4f}"))
    return ("<h3>PTQ vs quantization-aware training, per bit width</h3>" + report.table_html(rows, columns, "qat")
            + "<p>The same quantizer on the same source model; QAT fine-tunes a fake-quantized copy first (differences "
              "are paired over the test prompts, with 95% intervals).</p>")


def run_lm_eval(ctx: Context, chosen: list[Variant]) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness tasks (``evaluate.lm_eval_tasks``) on every chat variant, when it is installed.

    Optional: with no tasks configured nothing happens; with tasks but no ``lm_eval`` package the stage
    says so once and goes on (``pip install lm-eval``). Its tasks download data sets, so they need
    ``offline=false`` and network, or tasks defined on local files. Metrics: ``lm_eval/<task>/<metric>``.
    """
    import logging

    cfg = ctx.cfg
    tasks = list(ctx.config.lm_eval_tasks)
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


def reward_scorer(ctx: Context):
    """The reward model's scorer for ``test/reward_score``, or None when there is no usable reward model."""
    import logging

    from pipeline.online import model_reward
    from pipeline.rewards import GateError, load_reward_model

    folder = ctx.input("reward")
    if not folder.exists():
        return None
    try:
        reward_model = load_reward_model(folder, ctx.cfg.model)
    except GateError as err:
        logging.getLogger(__name__).warning("evaluate: no reward-model score: %s", err)
        return None
    ctx.run.add_input("reward", folder)
    return model_reward(reward_model)


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

"""The evaluation report: one self-contained HTML page (and a Markdown twin) a reader can believe.

Sections, in order: provenance (commit, date, seed, the evaluate run and every input's run); the metrics
table, each rate with its 95% bootstrap interval; each variant's difference against SFT on the same prompts
with its paired interval, marked where the interval excludes 0 (an effect) and greyed where it does not;
accuracy per task family; plots; the reward-hacking check (:mod:`pipeline.reward_check`); and a sample
browser with every test prompt, grouped by family in collapsible sections, each variant's answer beside the
gold answer.

Self-contained means no external asset at all: the charts are SVG drawn by matplotlib and inlined, the
styles are inline, there is no script (the browser's own ``<details>`` folds the samples). The page opens
offline, from a file, in any browser, and is logged to MLflow as an artifact. Plots:

- accuracy per variant (overall, held-out templates, held-out family) with 95% intervals as error bars, on
  an axis fitted to the data;
- reward-model score against KL to the SFT model for the aligned variants (what alignment bought, and at
  what distance from the reference);
- the training curves every stage left in ``data/plots/<stage>/`` (loss, validation, reward and KL per
  iteration).
"""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from pathlib import Path

# What the table shows, in order, with a readable name and how to format it.
TABLE = (
    ("test/accuracy", "accuracy", "{:.1%}"),
    ("test/accuracy_sampled", "sampled (T=1)", "{:.1%}"),
    ("test/accuracy_seen_templates", "seen templates", "{:.1%}"),
    ("test/accuracy_held_out_templates", "held-out templates", "{:.1%}"),
    ("test/accuracy_held_out_family", "held-out family", "{:.1%}"),
    ("test/accuracy_vs_sft", "accuracy vs SFT (paired)", "{:+.1%}"),
    ("test/win_rate_vs_sft", "win rate vs SFT (verifier)", "{:.1%}"),
    ("test/tie_rate_vs_sft", "ties vs SFT", "{:.1%}"),
    ("test/reward_win_rate_vs_sft", "win rate vs SFT (reward model)", "{:.1%}"),
    ("test/reward_score", "reward-model score", "{:.3f}"),
    ("test/reward_score_vs_sft", "reward-model score vs SFT (paired)", "{:+.3f}"),
    ("test/kl_to_sft", "KL to SFT (nats/token)", "{:.4f}"),
    ("test/kl_to_teacher", "KL to its teacher (nats/token)", "{:.4f}"),
    ("test/perplexity", "perplexity", "{:.3f}"),
    ("test/response_length", "response length (chars)", "{:.1f}"),
    ("test/concise_rate", "concise", "{:.1%}"),
    ("test/refusal_harmful", "refusals: harmful", "{:.1%}"),
    ("test/refusal_harmless", "refusals: harmless", "{:.1%}"),
    ("size/parameters", "parameters", "{:,.0f}"),
    ("test/latency_ms", "latency per prompt (ms)", "{:.1f}"),
    ("test/tokens_per_second", "tokens/s", "{:.0f}"),
)
# Training curves: stage -> (plot file, x field, y fields).
CURVES = (
    ("base", "loss.json", "step", ("train/loss",)),
    ("sft", "loss.json", "step", ("train/loss",)),
    ("reward", "loss.json", "step", ("train/loss", "train/accuracy")),
    ("dpo", "loss.json", "step", ("train/loss", "train/rewards/margin")),
    ("ppo", "iterations.json", "iteration", ("train/reward", "train/kl")),
    ("grpo", "iterations.json", "iteration", ("train/reward", "train/kl")),
    ("distill", "loss.json", "step", ("train/loss",)),
)


def fmt(value, pattern: str) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return pattern.format(value)


def cell(metrics: dict, key: str, pattern: str) -> str:
    """A metric formatted, with its 95% interval when evaluate measured one: "79.9% [76.2%, 83.6%]"."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None or metrics.get(key) is None:
        return fmt(metrics.get(key), pattern)
    return f"{fmt(metrics[key], pattern)} [{fmt(low, pattern)}, {fmt(high, pattern)}]"


def svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (closing the figure)."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "posttrain"  # stable element ids: the same data gives the same page
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def accuracy_chart(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    slices = (("test/accuracy", "overall"), ("test/accuracy_held_out_templates", "held-out templates"),
              ("test/accuracy_held_out_family", "held-out family"))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(slices)
    top = 0.0
    for i, (key, label) in enumerate(slices):
        values = [results[n].get(key, 0.0) or 0.0 for n in names]
        highs = [results[n].get(f"{key}_ci_high", v) for n, v in zip(names, values, strict=True)]
        lows = [results[n].get(f"{key}_ci_low", v) for n, v in zip(names, values, strict=True)]
        errors = [[v - lo for v, lo in zip(values, lows, strict=True)], [hi - v for v, hi in zip(values, highs, strict=True)]]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label, yerr=errors, capsize=2,
               error_kw={"elinewidth": 0.8})
        top = max(top, *highs)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=20)
    ax.set_ylabel("verifiable accuracy (95% interval)")
    ax.set_ylim(0, min(1.0, top * 1.15 + 0.02))  # fitted to the data: differences of a few points stay visible
    ax.legend(fontsize=8)
    ax.set_title("Accuracy per variant on held-out test prompts")
    return svg(fig)


def reward_kl_chart(results: dict) -> str | None:
    import matplotlib.pyplot as plt

    points = [(n, m["test/kl_to_sft"], m["test/reward_score"]) for n, m in results.items()
              if "test/kl_to_sft" in m and "test/reward_score" in m]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    span_kl = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    span_reward = (max(p[2] for p in points) - min(p[2] for p in points)) or 1.0
    for i, (name, kl, reward) in enumerate(points):
        ax.scatter([kl], [reward], s=40)
        # Near-identical points (a model and its quantized copy) get their labels stacked, not overprinted.
        close = sum(abs(kl - k) / span_kl < 0.08 and abs(reward - r) / span_reward < 0.08 for _, k, r in points[:i])
        ax.annotate(name, (kl, reward), textcoords="offset points", xytext=(4, 4 - 10 * close), fontsize=8)
    ax.margins(x=0.15, y=0.12)
    if "sft" in results and "test/reward_score" in results["sft"]:
        ax.axhline(results["sft"]["test/reward_score"], color="grey", linestyle=":", label="sft")
        ax.legend(fontsize=8)
    ax.set_xlabel("KL to SFT (nats per response token)")
    ax.set_ylabel("reward-model score")
    ax.set_title("Reward against KL")
    return svg(fig)


def curve_charts(plots_dir: Path) -> list[tuple[str, str]]:
    """(title, svg) of every stage's training curve found under ``plots_dir``."""
    import matplotlib.pyplot as plt

    charts = []
    for stage, file, x, ys in CURVES:
        path = plots_dir / stage / file
        if not path.exists():
            continue
        rows = json.loads(path.read_text())
        fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys), 2.6), squeeze=False)
        for ax, y in zip(axes[0], ys, strict=True):
            points = [(r[x], r[y]) for r in rows if y in r and x in r]
            ax.plot([p[0] for p in points], [p[1] for p in points])
            ax.set_xlabel(x)
            ax.set_title(f"{stage}: {y}", fontsize=9)
        charts.append((stage, svg(fig)))
    return charts


def sample_rows(generations: list[dict], names: list[str], per_family: int = 1) -> list[dict[str, dict]]:
    """Test prompts to show side by side: ``per_family`` per task family, each with every variant's answer."""
    by_id: dict[str, dict[str, dict]] = defaultdict(dict)
    for g in generations:
        by_id[g["id"]][g["variant"]] = g
    shown, count = [], defaultdict(int)
    for row_id in sorted(by_id):
        answers = by_id[row_id]
        first = next(iter(answers.values()))
        if count[first["family"]] >= per_family or not all(n in answers for n in names):
            continue
        count[first["family"]] += 1
        shown.append(answers)
    return shown


# Differences against SFT on the same prompts (evaluate's paired bootstrap): metric, label, format.
DIFFERENCES = (
    ("test/accuracy_vs_sft", "accuracy", "{:+.1%}"),
    ("test/refusal_harmful_vs_sft", "refusals: harmful", "{:+.1%}"),
    ("test/refusal_harmless_vs_sft", "refusals: harmless", "{:+.1%}"),
    ("test/concise_rate_vs_sft", "concise", "{:+.1%}"),
    ("test/reward_score_vs_sft", "reward-model score", "{:+.3f}"),
)


def difference_cell(metrics: dict, key: str, pattern: str) -> str:
    """A paired difference with its interval; ``effect up``/``effect down`` when the interval excludes 0,
    ``noeffect`` (greyed, "n.s.") when it does not."""
    from pipeline.stats import excludes_zero

    value, low, high = metrics.get(key), metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if value is None:
        return "<td>–</td>"
    text = cell(metrics, key, pattern)
    if low is None or high is None:
        return f"<td>{text}</td>"
    if excludes_zero(low, high):
        kind, mark = ("up", "▲") if low > 0 else ("down", "▼")
        return f"<td class='effect {kind}' title='95% interval excludes 0'>{mark} {text}</td>"
    return f"<td class='noeffect' title='95% interval includes 0: no effect shown'>{text} n.s.</td>"


def differences_html(results: dict) -> str:
    """Each variant against SFT: a row per variant, a column per paired difference."""
    rows = [n for n in results if n != "sft" and any(k in results[n] for k, _, _ in DIFFERENCES)]
    if not rows:
        return "<p>No differences: SFT was not evaluated.</p>"
    columns = [c for c in DIFFERENCES if any(c[0] in results[n] for n in rows)]
    esc = html.escape
    out = ["<table id='differences'><thead><tr><th>variant − sft</th>"]
    out += [f"<th>{esc(label)}</th>" for _, label, _ in columns]
    out.append("</tr></thead><tbody>")
    for n in rows:
        out.append(f"<tr><td>{esc(n)}</td>" + "".join(difference_cell(results[n], k, p) for k, _, p in columns) + "</tr>")
    out.append("</tbody></table><p class='note'>Paired bootstrap over the same test prompts (2,000 resamples). "
               "▲/▼: the 95% interval excludes 0, an effect; n.s.: it includes 0, no difference is shown.</p>")
    return "".join(out)


def families(generations: list[dict]) -> dict[str, int]:
    """Task family -> number of test prompts, in name order."""
    ids: dict[str, set] = defaultdict(set)
    for g in generations:
        ids[g["family"]].add(g["id"])
    return {f: len(ids[f]) for f in sorted(ids)}


def family_html(results: dict, generations: list[dict]) -> str:
    """Accuracy per task family (rows) and variant (columns), each with its 95% interval."""
    names, esc = list(results), html.escape
    out = ["<table id='families'><thead><tr><th>family (prompts)</th>"] + [f"<th>{esc(n)}</th>" for n in names]
    out.append("</tr></thead><tbody>")
    for family, count in families(generations).items():
        key = f"test/accuracy_{family}"
        out.append(f"<tr><td>{esc(family)} ({count})</td>" + "".join(f"<td>{cell(results[n], key, '{:.1%}')}</td>" for n in names)
                   + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def provenance_html(prov: dict | None) -> str:
    """The header that says where the numbers come from."""
    if not prov:
        return ""
    esc = html.escape
    commit = esc(str(prov.get("commit", "unknown"))[:12]) + (" (uncommitted changes)" if prov.get("dirty") else "")
    inputs = ", ".join(f"{esc(k)} <code>{esc(str(v or '–'))}</code>" for k, v in prov.get("inputs", {}).items())
    return (f"<p id='provenance'>Commit <code>{commit}</code> · {esc(str(prov.get('date', '')))} · seed "
            f"{esc(str(prov.get('seed', '')))} · evaluate run <code>{esc(str(prov.get('run_id', '')))}</code> in "
            f"<code>{esc(str(prov.get('tracking_uri', '')))}</code><br>Input runs: {inputs or '–'}</p>")


def reward_check_html(hacking: dict | None) -> str:
    """The reward-hacking check: its flags (or that none was raised) and its figures."""
    if not hacking:
        return "<p>No reward model passed its gate: nothing to check.</p>"
    esc, m = html.escape, hacking["metrics"]
    out = []
    if hacking["flags"]:
        out.append("<ul id='reward-flags' class='flags'>" + "".join(f"<li>⚠ {esc(f)}</li>" for f in hacking["flags"]) + "</ul>")
    else:
        out.append("<p id='reward-flags' class='clean'>No flag: the reward model prefers right answers, is not driven by "
                   "length, and scores every degenerate answer below every trained variant.</p>")
    rows = [("prefers the wrong answer (per right/wrong pair)", cell(m, "reward_check/prefers_wrong_rate", "{:.1%}")),
            ("prompts with a right and a wrong answer", fmt(m.get("reward_check/prefers_wrong_prompts"), "{:.0f}")),
            ("Spearman rho, score vs length (answers equally right or wrong)",
             fmt(m.get("reward_check/length_spearman_within"), "{:+.2f}")),
            ("Spearman rho, score vs length (all answers)", fmt(m.get("reward_check/length_spearman"), "{:+.2f}"))]
    rows += [(f"mean score of the '{k.removeprefix('reward_check/probe_')}' answer", fmt(v, "{:+.3f}"))
             for k, v in m.items() if k.startswith("reward_check/probe_")]
    out.append("<table id='reward-check'><tbody>" + "".join(f"<tr><td>{esc(a)}</td><td>{b}</td></tr>" for a, b in rows)
               + "</tbody></table>")
    return "".join(out)


def browser_html(generations: list[dict], names: list[str]) -> str:
    """Every test prompt, grouped by family in collapsible sections: prompt, gold answer and every variant's
    answer (green when verified correct, red when not). Plain ``<details>``: no script."""
    esc = html.escape
    by_family: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for g in generations:
        by_family[g["family"]][g["id"]][g["variant"]] = g
    out = []
    for family in sorted(by_family):
        prompts = by_family[family]
        correct = {n: sum(bool(a.get(n, {}).get("correct")) for a in prompts.values()) for n in names}
        summary = ", ".join(f"{esc(n)} {correct[n]}" for n in names)
        out.append(f"<details class='family' data-family='{esc(family)}'><summary><b>{esc(family)}</b>: {len(prompts)} "
                   f"prompts; correct: {summary}</summary><table class='samples'><thead><tr><th>prompt</th><th>gold</th>")
        out += [f"<th>{esc(n)}</th>" for n in names]
        out.append("</tr></thead><tbody>")
        for row_id in sorted(prompts):
            answers = prompts[row_id]
            first = next(iter(answers.values()))
            out.append(f"<tr><td class='text'>{esc(first['prompt'])}</td><td class='text'>{esc(str(first['gold']))}</td>")
            for n in names:
                g = answers.get(n)
                out.append("<td>–</td>" if g is None else
                           f"<td class='text {'ok' if g['correct'] else 'wrong'}'>{esc(g['response'])}</td>")
            out.append("</tr>")
        out.append("</tbody></table></details>")
    return "".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.ok { background: #e6f4e6; } td.wrong { background: #fbe9e9; }
td.text { text-align: left; font-family: monospace; white-space: pre-wrap; }
figure { display: inline-block; margin: 8px; vertical-align: top; }
svg { max-width: 100%; height: auto; }
td.effect.up { background: #e6f4e6; font-weight: 600; } td.effect.down { background: #fbe9e9; font-weight: 600; }
td.noeffect { color: #888; }
p.note, #provenance { font-size: 12px; color: #555; }
ul.flags { background: #fff4e5; border: 1px solid #f0b45c; padding: 8px 28px; }
p.clean { background: #e6f4e6; padding: 8px; }
details.family { margin: 6px 0; } details.family summary { cursor: pointer; }
"""


def render_html(results: dict, generations: list[dict], plots_dir: Path, extra_sections: list[tuple[str, str]] = (),
                provenance: dict | None = None, hacking: dict | None = None) -> str:
    """The whole report page (see the module docstring). ``provenance``: see :func:`provenance_html`;
    ``hacking``: the reward-hacking check (:func:`pipeline.reward_check.check`), None without a reward model."""
    import matplotlib

    matplotlib.use("Agg")
    names = list(results)
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>posttrain evaluation</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>posttrain evaluation</h1>", provenance_html(provenance),
             f"<p>{len(names)} variants on {len({g['id'] for g in generations})} held-out test prompts; metric "
             "definitions are in stages/evaluate.py. Brackets: 95% bootstrap interval over the prompts.</p>",
             "<h2>Metrics</h2>", "<table id='metrics'><thead><tr><th>metric</th>"]
    parts += [f"<th>{esc(n)}</th>" for n in names]
    parts.append("</tr></thead><tbody>")
    for key, label, pattern in TABLE:
        if not any(key in results[n] for n in names):
            continue
        parts.append(f"<tr><td title='{esc(key)}'>{esc(label)}</td>")
        parts += [f"<td>{cell(results[n], key, pattern)}</td>" for n in names]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    parts += ["<h2>Differences against SFT (paired)</h2>", differences_html(results)]
    parts += ["<h2>Accuracy per task family</h2>", family_html(results, generations)]
    parts += ["<h2>Plots</h2>", f"<figure class='plot' id='plot-accuracy'>{accuracy_chart(results)}</figure>"]
    reward_kl = reward_kl_chart(results)
    if reward_kl:
        parts.append(f"<figure class='plot' id='plot-reward-kl'>{reward_kl}</figure>")
    curves = curve_charts(plots_dir)
    if curves:
        parts.append("<h2>Training curves</h2>")
        parts += [f"<figure class='plot' id='curve-{esc(stage)}'>{chart}</figure>" for stage, chart in curves]
    parts += ["<h2>Reward-hacking check</h2>", reward_check_html(hacking)]
    for title, body in extra_sections:
        parts += [f"<h2>{esc(title)}</h2>", body]
    parts += ["<h2>Samples: every test prompt</h2>", "<p class='note'>Click a family to open it. Green: the verifier "
              "accepts the answer; red: it does not.</p>", browser_html(generations, names), "</body></html>"]
    return "".join(parts)


def table_html(rows: dict[str, dict], columns: tuple[tuple[str, str, str], ...], table_id: str) -> str:
    """A small HTML table: one row per key of ``rows``, the given (metric, label, format) columns."""
    esc = html.escape
    out = [f"<table id='{esc(table_id)}'><thead><tr><th></th>"] + [f"<th>{esc(label)}</th>" for _, label, _ in columns]
    out.append("</tr></thead><tbody>")
    for name, m in rows.items():
        out.append(f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{cell(m, k, p)}</td>" for k, _, p in columns) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def marked(metrics: dict, key: str, pattern: str) -> str:
    """A paired difference for Markdown: "+2.0% [+0.5%, +3.5%] *" when the interval excludes 0."""
    from pipeline.stats import excludes_zero

    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    star = " *" if low is not None and high is not None and excludes_zero(low, high) else ""
    return cell(metrics, key, pattern) + star


def render_markdown(results: dict, generations: list[dict], hacking: dict | None = None) -> str:
    """The same tables, reward-hacking flags and a few samples as Markdown (for terminals and code review)."""
    names = list(results)
    lines = ["# Evaluation", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, pattern in TABLE:
        if any(key in results[n] for n in names):
            lines.append(f"| {label} | " + " | ".join(cell(results[n], key, pattern) for n in names) + " |")
    lines += ["", "## Differences against SFT (paired 95% interval; * = excludes 0)", "",
              "| variant | " + " | ".join(label for _, label, _ in DIFFERENCES) + " |", "|---|" + "---|" * len(DIFFERENCES)]
    for n in names:
        if n != "sft" and "test/accuracy_vs_sft" in results[n]:
            lines.append(f"| {n} | " + " | ".join(marked(results[n], k, p) for k, _, p in DIFFERENCES) + " |")
    lines += ["", "## Accuracy per task family (95% interval)", "", "| family (prompts) | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for family, count in families(generations).items():
        lines.append(f"| {family} ({count}) | " + " | ".join(cell(results[n], f"test/accuracy_{family}", "{:.1%}")
                                                             for n in names) + " |")
    if hacking is not None:
        lines += ["", "## Reward-hacking check", ""]
        lines += [f"- WARNING: {flag}" for flag in hacking["flags"]] or ["- no flag"]
    lines += ["", "## Sample generations (the HTML report has every test prompt)", ""]
    for answers in sample_rows(generations, names):
        first = next(iter(answers.values()))
        lines += [f"**{first['prompt']}** (gold: `{first['gold']}`)", ""]
        lines += [f"- {n}: `{answers[n]['response']}` {'ok' if answers[n]['correct'] else 'wrong'}" for n in names]
        lines.append("")
    return "\n".join(lines)

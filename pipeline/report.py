"""The evaluation report: one self-contained HTML page (and a Markdown twin) with the metrics table, the
plots and sample generations side by side.

Self-contained means no external asset at all: the charts are SVG drawn by matplotlib and inlined, the
styles are inline, there is no script. The page opens offline, from a file, in any browser, and is
logged to MLflow as an artifact. Plots:

- accuracy per variant (overall, held-out templates, held-out family);
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
    ("test/perplexity", "perplexity", "{:.3f}"),
    ("test/response_length", "response length (chars)", "{:.1f}"),
    ("test/concise_rate", "concise", "{:.1%}"),
    ("test/refusal_harmful", "refusals: harmful", "{:.1%}"),
    ("test/refusal_harmless", "refusals: harmless", "{:.1%}"),
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
    for i, (key, label) in enumerate(slices):
        values = [results[n].get(key, 0.0) or 0.0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=20)
    ax.set_ylabel("verifiable accuracy")
    ax.set_ylim(0, 1)
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


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.ok { background: #e6f4e6; } td.wrong { background: #fbe9e9; }
td.text { text-align: left; font-family: monospace; white-space: pre-wrap; }
figure { display: inline-block; margin: 8px; vertical-align: top; }
svg { max-width: 100%; height: auto; }
"""


def render_html(results: dict, generations: list[dict], plots_dir: Path, extra_sections: list[tuple[str, str]] = ()) -> str:
    """The whole report page (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    names = list(results)
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>posttrain evaluation</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>posttrain evaluation</h1>",
             f"<p>{len(names)} variants on the held-out test prompts; metric definitions are in stages/evaluate.py.</p>",
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
    parts += ["<h2>Plots</h2>", f"<figure class='plot' id='plot-accuracy'>{accuracy_chart(results)}</figure>"]
    reward_kl = reward_kl_chart(results)
    if reward_kl:
        parts.append(f"<figure class='plot' id='plot-reward-kl'>{reward_kl}</figure>")
    curves = curve_charts(plots_dir)
    if curves:
        parts.append("<h2>Training curves</h2>")
        parts += [f"<figure class='plot' id='curve-{esc(stage)}'>{chart}</figure>" for stage, chart in curves]
    for title, body in extra_sections:
        parts += [f"<h2>{esc(title)}</h2>", body]
    parts += ["<h2>Sample generations</h2>", "<table id='samples'><thead><tr><th>prompt</th><th>gold answer</th>"]
    parts += [f"<th>{esc(n)}</th>" for n in names]
    parts.append("</tr></thead><tbody>")
    for answers in sample_rows(generations, names):
        first = next(iter(answers.values()))
        parts.append(f"<tr><td class='text'>{esc(first['prompt'])}</td><td class='text'>{esc(first['gold'])}</td>")
        for n in names:
            g = answers[n]
            parts.append(f"<td class='text {'ok' if g['correct'] else 'wrong'}'>{esc(g['response'])}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></body></html>")
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


def render_markdown(results: dict, generations: list[dict]) -> str:
    """The same table and samples as Markdown (for terminals and code review)."""
    names = list(results)
    lines = ["# Evaluation", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, pattern in TABLE:
        if any(key in results[n] for n in names):
            lines.append(f"| {label} | " + " | ".join(cell(results[n], key, pattern) for n in names) + " |")
    lines += ["", "## Sample generations", ""]
    for answers in sample_rows(generations, names):
        first = next(iter(answers.values()))
        lines += [f"**{first['prompt']}** (gold: `{first['gold']}`)", ""]
        lines += [f"- {n}: `{answers[n]['response']}` {'ok' if answers[n]['correct'] else 'wrong'}" for n in names]
        lines.append("")
    return "\n".join(lines)

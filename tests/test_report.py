"""The evaluation report opens in headless Chromium with its table and plots visible."""

from __future__ import annotations

import os

import pytest

from pipeline.browser import check_report, chromium_path

needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                    reason="no Chromium here (CI installs Debian's chromium and runs this)")


@needs_chromium
@pytest.mark.slow
def test_report_renders_intervals_differences_families_provenance_checks_and_a_sample_browser_in_chromium(tmp_path):
    from test_evaluate import record

    from pipeline.report import render_html

    results = {name: {"test/accuracy": acc, "test/accuracy_ci_low": acc - 0.05, "test/accuracy_ci_high": acc + 0.05,
                      "test/reward_score": 0.1 * i, "test/perplexity": 2.0, "test/accuracy_next": acc,
                      "test/accuracy_max": acc / 2}
               for i, (name, acc) in enumerate((("base_zero_shot", 0.1), ("sft", 0.5), ("dpo", 0.55)))}
    results["dpo"].update({"test/kl_to_sft": 0.1, "test/win_rate_vs_sft": 0.62, "test/accuracy_vs_sft": 0.05,
                           "test/accuracy_vs_sft_ci_low": 0.01, "test/accuracy_vs_sft_ci_high": 0.09,
                           "test/refusal_harmful_vs_sft": 0.0, "test/refusal_harmful_vs_sft_ci_low": -0.02,
                           "test/refusal_harmful_vs_sft_ci_high": 0.02})
    results["base_zero_shot"].update({"test/accuracy_vs_sft": -0.4, "test/accuracy_vs_sft_ci_low": -0.5,
                                      "test/accuracy_vs_sft_ci_high": -0.3})
    records = [dict(record(f, "12", v != "base_zero_shot"), id=f"{f}-{i}", variant=v)
               for v in results for f in ("next", "max") for i in range(3)]
    hacking = {"metrics": {"reward_check/prefers_wrong_rate": 0.6, "reward_check/probe_one_char": 1.2},
               "flags": ["prefers wrong answers: ...", "degenerate answer rewarded: ..."]}
    provenance = {"commit": "abc123", "dirty": False, "date": "2026-12-02 10:00 UTC", "run_id": "r1", "seed": 1,
                  "tracking_uri": "sqlite:///mlruns/mlflow.db", "inputs": {"sft": "r0"}}
    page = tmp_path / "report.html"
    page.write_text(render_html(results, records, tmp_path / "no-plots", provenance=provenance, hacking=hacking))
    found = check_report(page, tmp_path / "report.png")
    assert found["variants"] == 3 and found["metric_rows"] >= 4
    assert found["difference_rows"] == 2 and found["effects"] == 2     # dpo up, base down; the 0-crossing one not
    assert found["family_rows"] == 2 and found["provenance"]
    assert found["plots"] == 2 and found["visible_plots"] == 2      # accuracy bars, reward vs KL
    assert found["reward_flags"] == 2
    assert found["sample_families"] == 2 and found["sample_rows"] == 6    # every prompt, by family
    assert found["rows_visible_closed"] == 0 and found["rows_visible_opened"] == 3   # folded until opened
    assert found["ink"] > 0.02 and (tmp_path / "report.png").stat().st_size > 10_000
    text = page.read_text()
    assert "▲ +5.0% [+1.0%, +9.0%]" in text and "n.s." in text and "abc123" in text and "<script" not in text


def test_the_reward_check_flags_a_reward_model_that_prefers_wrong_long_or_degenerate_answers():
    from pipeline.reward_check import check, spearman

    records = {"sft": [{"id": f"p{i}", "response": "x" * (i + 1), "correct": True} for i in range(6)],
               "dpo": [{"id": f"p{i}", "response": "y" * (10 + i), "correct": False} for i in range(6)]}
    honest = {"sft": dict(zip([f"p{i}" for i in range(6)], (1.2, 1.0, 1.5, 1.1, 1.3, 1.4), strict=True)),
              "dpo": {f"p{i}": -1.0 for i in range(6)}}    # short right answers above long wrong ones: no bias
    found = check(records, honest, {"empty": [-2.0] * 6}, ["sft", "dpo"])
    assert found["metrics"]["reward_check/prefers_wrong_rate"] == 0.0 and found["flags"] == []
    hacked = {"sft": {f"p{i}": -1.0 for i in range(6)}, "dpo": {f"p{i}": 1.0 + i for i in range(6)}}
    found = check(records, hacked, {"empty": [0.5] * 6}, ["sft", "dpo"])
    flags = " | ".join(found["flags"])
    assert found["metrics"]["reward_check/prefers_wrong_rate"] == 1.0 and "prefers wrong answers" in flags
    assert "length bias" in flags and "'empty' answer scores +0.500" in flags and "sft" in flags
    assert found["metrics"]["reward_check/flags"] == 3
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])   # constant side: NaN


def test_a_cell_shows_its_95_percent_interval_when_evaluate_measured_one():
    from pipeline.report import cell

    assert cell({"k": 0.5, "k_ci_low": 0.4, "k_ci_high": 0.6}, "k", "{:.1%}") == "50.0% [40.0%, 60.0%]"
    assert cell({"k": 0.5}, "k", "{:.1%}") == "50.0%"
    assert cell({}, "k", "{:.1%}") == "–"

"""The evaluation report opens in headless Chromium with its table and plots visible."""

from __future__ import annotations

import os

import pytest

from pipeline.browser import check_report, chromium_path

needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                    reason="no Chromium here (CI installs Debian's chromium and runs this)")


@needs_chromium
@pytest.mark.slow
def test_report_renders_its_table_plots_and_samples_in_chromium(tmp_path):
    from test_evaluate import record

    from pipeline.report import render_html

    results = {name: {"test/accuracy": acc, "test/reward_score": 0.1 * i, "test/perplexity": 2.0}
               for i, (name, acc) in enumerate((("base_zero_shot", 0.1), ("sft", 0.5), ("dpo", 0.55)))}
    results["dpo"].update({"test/kl_to_sft": 0.1, "test/win_rate_vs_sft": 0.62})
    records = [dict(record(f, "12", v != "base_zero_shot"), id=f"{f}-1", variant=v)
               for v in results for f in ("next", "max")]
    page = tmp_path / "report.html"
    page.write_text(render_html(results, records, tmp_path / "no-plots"))
    found = check_report(page, tmp_path / "report.png")
    assert found["variants"] == 3 and found["metric_rows"] >= 4
    assert found["plots"] == 2 and found["visible_plots"] == 2      # accuracy bars, reward vs KL
    assert found["sample_rows"] == 2 and found["ink"] > 0.02
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_cell_shows_its_95_percent_interval_when_evaluate_measured_one():
    from pipeline.report import cell

    assert cell({"k": 0.5, "k_ci_low": 0.4, "k_ci_high": 0.6}, "k", "{:.1%}") == "50.0% [40.0%, 60.0%]"
    assert cell({"k": 0.5}, "k", "{:.1%}") == "50.0%"
    assert cell({}, "k", "{:.1%}") == "–"

"""Bootstrap intervals (pipeline.stats) and evaluate's paired differences against SFT."""

from __future__ import annotations

import random

from pipeline import stats
from pipeline.evaluation import differences_vs_sft


def test_interval_covers_the_mean_and_narrows_with_more_prompts():
    rng = random.Random(0)
    small = [rng.random() < 0.7 for _ in range(100)]
    large = [rng.random() < 0.7 for _ in range(1600)]
    lo_s, hi_s = stats.interval(small)
    lo_l, hi_l = stats.interval(large)
    assert lo_s < sum(small) / 100 < hi_s and lo_l < sum(large) / 1600 < hi_l
    assert 0.6 < lo_l < 0.7 < hi_l < 0.75
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # ~1/sqrt(16) of the width
    assert stats.interval(small) == (lo_s, hi_s)  # deterministic


def test_paired_difference_sees_a_small_effect_that_unpaired_intervals_cannot():
    rng = random.Random(1)
    base = [rng.random() < 0.5 for _ in range(400)]
    better = [b or (i % 10 == 0) for i, b in enumerate(base)]  # a few points better on the same prompts
    diff, low, high = stats.paired_difference(better, base)
    assert 0.02 < diff < 0.08 and stats.excludes_zero(low, high)
    lo_a, hi_a = stats.interval(better)
    lo_b, hi_b = stats.interval(base)
    assert lo_a < hi_b  # separately, the two intervals overlap
    same = stats.paired_difference(base, base)
    assert same == (0.0, 0.0, 0.0) and not stats.excludes_zero(*same[1:])


def test_differences_vs_sft_pair_rows_by_prompt():
    def rec(i, correct, refused=False, harmful=False, family="apples"):
        return {"id": str(i), "correct": correct, "refused": refused, "harmful": harmful, "family": family,
                "concise": True}

    sft = [rec(i, i % 2 == 0) for i in range(200)]
    mine = [rec(i, True) for i in reversed(range(200))]  # another order: pairing is by id
    out = differences_vs_sft(mine, sft)
    assert out["test/accuracy_vs_sft"] == 0.5
    assert 0.4 < out["test/accuracy_vs_sft_ci_low"] < 0.5 < out["test/accuracy_vs_sft_ci_high"] < 0.6
    assert "test/refusal_harmful_vs_sft" not in out  # no harmful rows
    refusing = [dict(r, refused=True) if int(r["id"]) < 10 else r for r in mine]  # 10 of 200 harmless rows
    assert differences_vs_sft(refusing, sft)["test/refusal_harmless_vs_sft"] == 0.05  # the same rows as the rate

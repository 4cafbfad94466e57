"""Uncertainty of evaluation figures: bootstrap intervals over test prompts.

Every rate evaluate reports is a mean over a few hundred prompts, so it comes with a 95% percentile
bootstrap interval (resampling prompts with replacement, Efron & Tibshirani 1993). A difference between two
variants is measured on the same prompts, so its interval comes from the *paired* bootstrap: each resample
draws prompts and takes both variants' values on them, which cancels the prompts' shared difficulty and is
far tighter than comparing two separate intervals. An effect is claimed only where its interval excludes
zero (:func:`excludes_zero`).

Deterministic: a fixed seed gives the same interval for the same values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL = 0.95        # coverage of every interval
RESAMPLES = 2000    # bootstrap resamples: the interval's ends move by ~0.1 point between seeds at this count
SEED = 0


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
             level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN, NaN for no values)."""
    x = np.asarray([float(v) for v in values], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    means = _resampled_means(x, resamples, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(mine: Sequence[float], theirs: Sequence[float], resamples: int = RESAMPLES,
                      seed: int = SEED, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean of mine - theirs, interval low, interval high) over paired values (the same prompts)."""
    if len(mine) != len(theirs):
        raise ValueError(f"paired values differ in length: {len(mine)} vs {len(theirs)}")
    diff = np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)
    if len(diff) == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = interval(diff, resamples, seed, level)
    return float(diff.mean()), low, high


def with_interval(metrics: dict[str, float], key: str, values: Sequence[float]) -> None:
    """Set ``key`` to the mean of ``values`` and ``key_ci_low`` / ``key_ci_high`` to its interval."""
    x = [float(v) for v in values]
    metrics[key] = sum(x) / len(x) if x else float("nan")
    metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = interval(x)


def rounded(metrics: dict, digits: int = 4) -> dict:
    """Metrics with every float rounded to ``digits``: the one rounding every metric file goes through."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in metrics.items()}


def excludes_zero(low: float, high: float) -> bool:
    """Whether an interval of a difference excludes zero (the effect is claimed)."""
    return low > 0 or high < 0

"""The confirmation's statistics, for study/confirm.py and the report (study/report/confirmed.py):
a bootstrap interval of a mean (scipy.stats.bootstrap, BCa) and a paired comparison on the
same image x seed pairs (the mean difference with its interval, Wilcoxon's signed-rank
test, wins). Pairing matters: every variant fits the same observations, so the spread
between images and noise draws cancels in the differences (docs/science.md).
"""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
RESAMPLES = 9999
RNG_SEED = 0  # the intervals of one confirm.json are the same every time it is written


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def mean_ci(values: Sequence[float]) -> tuple[float | None, list[float | None]]:
    """The mean and its 95% bootstrap interval (BCa; percentile where BCa is undefined, as
    with a handful of values). One value, or all equal: the interval is that value."""
    v = [float(x) for x in values]
    if not v:
        return None, [None, None]
    m = statistics.fmean(v)
    if len(v) < 2 or max(v) == min(v):
        return m, [m, m]
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's "degenerate" warning: handled below
            ci = sps.bootstrap((np.asarray(v),), np.mean, confidence_level=CONFIDENCE,
                               n_resamples=RESAMPLES, method=method,
                               rng=np.random.default_rng(RNG_SEED)).confidence_interval
        low, high = _finite(ci.low), _finite(ci.high)
        if low is not None and high is not None:
            return m, [low, high]
    return m, [None, None]


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, object]:
    """`a` against `b` on the same pairs (a[i] and b[i] saw one observation): the mean of
    a - b with its bootstrap interval, Wilcoxon's two-sided signed-rank p-value (None when
    every difference is zero or there is one pair), and the pairs where a is higher."""
    if len(a) != len(b):
        raise ValueError(f"paired values must match one to one, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean, ci = mean_ci(d)
    p = None
    if len(d) > 1 and any(d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small samples: scipy notes the exact distribution
            p = _finite(sps.wilcoxon(d).pvalue)
    return {"mean_diff": mean, "ci95": ci, "p_value": p, "wins": sum(x > 0 for x in d), "n": len(d)}


def excludes_zero(ci: Sequence[float | None]) -> bool:
    low, high = ci
    return low is not None and high is not None and (low > 0 or high < 0)

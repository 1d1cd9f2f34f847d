"""Paired comparisons of two configurations on the same questions: is a difference in accuracy real?

Both configurations answer the same evaluation questions (same split, same order, per seed), so the comparison is
paired: per question, each is right or wrong. Two statistics, pooled over the seeds both have:

- **McNemar's exact test**: among the discordant questions (one right, the other wrong; counts b and c), under "no
  difference" each is b-or-c with probability 1/2, so the two-sided p-value is
  ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``.
- **A paired bootstrap 95 % interval** of the accuracy difference: questions resampled with replacement (seeded, so a
  report is reproducible byte for byte), the 2.5th and 97.5th percentiles of the mean per-question difference.
"""

from __future__ import annotations

import math
import random


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(diffs: list[int], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(diffs) (per-question differences in {-1, 0, 1}) by resampling the questions."""
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def paired(a: dict[tuple[int, str], int], b: dict[tuple[int, str], int]) -> dict[str, float] | None:
    """Compare per-question correctness ``{(seed, question id): 0/1}`` of a against b on their common questions."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [a[k] - b[k] for k in common]
    low, high = paired_bootstrap(diffs)
    return {
        "diff": sum(diffs) / len(diffs),
        "low": low,
        "high": high,
        "questions": len(common),
        "p": mcnemar_exact(diffs.count(1), diffs.count(-1)),
    }

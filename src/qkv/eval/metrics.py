"""Scores from per-choice log-likelihoods, with lm-evaluation-harness's definitions.

- acc: the choice with the highest log-likelihood is the gold one.
- acc_norm: the same with each log-likelihood divided by its choice's length in characters
  (the harness's `len(choice)`; bytes for ASCII text, the delimiter space not counted).
- stderr: the sample standard error of the mean, stdev(xs, n - 1) / sqrt(n).
- centered: (acc - baseline) / (1 - baseline), chance at 0 and perfect at 1, as the CORE
  score of DCLM and nanochat centers each task before averaging them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def argmax(xs: Sequence[float]) -> int:
    """Index of the largest value (the first one on ties, as numpy.argmax)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def acc(logliks: Sequence[float], gold: int) -> float:
    return float(argmax(logliks) == gold)


def acc_norm(logliks: Sequence[float], choices: Sequence[str], gold: int) -> float:
    return float(argmax([ll / len(c) for ll, c in zip(logliks, choices)]) == gold)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def stderr(xs: Sequence[float]) -> float:
    """Sample standard error of the mean (0 for fewer than 2 values)."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def core(accuracies: dict[str, float], baselines: dict[str, float]) -> float:
    """Mean of each task's centered accuracy."""
    return mean([centered(accuracies[t], baselines[t]) for t in accuracies])

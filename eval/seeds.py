"""Measurements repeated over seeds: the seeds an option names, and the spread of what they measured."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def parse_seeds(text: str, option: str) -> list[int]:
    """The distinct integers of a comma-separated list such as '0,1,2'; ValueError naming the option otherwise."""
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{option} takes distinct integers, got {text!r}")
    return seeds


def mean_and_spread(values: Sequence[float], digits: int = 2) -> str:
    """One value as it is; several as 'mean ± sample standard deviation'."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

"""Sparsity schedules of the gradual methods (gradual oBERT, hard movement pruning)."""

from __future__ import annotations

from methods.base import PruningError


def cubic_sparsity(step: int, total: int, final: float, *, initial: float = 0.0, warmup: int = 0, cooldown: int = 0) -> float:
    """The cubic schedule (Zhu & Gupta, 2017), used by hard movement pruning: `initial` for the first `warmup`
    steps, then s_t = s_f + (s_i − s_f)(1 − (t − warmup) / (total − warmup − cooldown))³, `final` for the last
    `cooldown` steps."""
    span = total - warmup - cooldown
    if span <= 0:
        raise PruningError(f"the schedule needs steps between warm-up and cool-down: total {total}, warm-up {warmup}, cool-down {cooldown}")
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3

"""Checks of what pruning produced: fraction of zeros and N:M validity."""

from __future__ import annotations

from torch import Tensor


def zero_fraction(weight: Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return (weight == 0).sum().item() / weight.numel()


def nm_valid(weight: Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row of a (out, in) weight holds at most n nonzeros."""
    rows, columns = weight.shape
    if columns % m:
        return False
    nonzeros = (weight != 0).reshape(rows, columns // m, m).sum(2)
    return bool((nonzeros <= n).all())

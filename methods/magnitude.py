"""Magnitude pruning: remove the smallest |W| of the whole layer (or of each N:M group). The baseline."""

from __future__ import annotations

from torch import Tensor

from methods.base import LayerResult, Method, Target, mask_for_target


def prune(weight: Tensor, statistic: None, target: Target) -> LayerResult:
    """Prune `weight` (out, in) to `target` by magnitude (it takes no statistic: `statistic` is None); the loss is the
    sum of the removed weights squared."""
    target.check_layer("weight", weight.shape[1])
    magnitude = weight.detach().abs()
    mask = mask_for_target(magnitude, target, per_row=False)
    loss = (magnitude[~mask].float() ** 2).sum().item()
    return LayerResult(weight=weight.detach() * mask, mask=mask, loss=loss)


METHOD = Method(name="magnitude", summary="smallest |W| of the whole layer; no calibration data", prune=prune)

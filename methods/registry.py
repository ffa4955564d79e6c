"""The one-shot methods by name, with the calibration statistics each needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from methods import magnitude, obs, sparsegpt, wanda
from methods.base import LayerResult, PruningError, Target

HESSIAN = "hessian"
COLUMN_NORMS = "column_norms"


@dataclass(frozen=True)
class Method:
    """A one-shot method: `run(weight, statistics, target, **options) -> LayerResult`."""

    name: str
    statistics: str | None  # HESSIAN, COLUMN_NORMS, or None when the method needs no calibration data
    run: Callable[..., LayerResult]
    summary: str
    options: tuple[str, ...] = field(default_factory=tuple)  # keyword options `run` accepts


def _magnitude(weight: Tensor, statistics: None, target: Target) -> LayerResult:
    return magnitude.prune(weight, target)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude, "smallest |W| of the whole layer; no calibration data"),
    "wanda": Method("wanda", COLUMN_NORMS, wanda.prune, "smallest |W|·‖X‖ per output row; no weight update"),
    "sparsegpt": Method(
        "sparsegpt",
        HESSIAN,
        sparsegpt.prune,
        "adaptive-mask OBS sweeps over the Cholesky factor of H⁻¹, with weight updates",
        ("blocksize", "mask_blocksize", "percdamp"),
    ),
    "obs": Method(
        "obs",
        HESSIAN,
        obs.prune,
        "exact greedy Optimal Brain Surgeon per row; cost about 2 x rows x k x d², meant for small models or high sparsity",
        ("percdamp",),
    ),
}


def get_method(name: str) -> Method:
    """The method called `name`, or PruningError naming the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise PruningError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None

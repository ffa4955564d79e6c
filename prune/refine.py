"""MaskPro refinement of N:M masks after the one-shot stage (seed 002): forward passes only, no backprop.

The layers pruned in the one-shot stage are refined jointly. Each step draws a mask per layer from the
policy (methods.maskpro), measures the language-modelling loss L(m) on one calibration batch, and moves
the logits by the loss residual L(m) − L(m₀) against the one-shot mask m₀ (Eq. 12). The masks act through
a parametrization (weight = weights under the mask ⊙ mask), so no extra copy of the weights is kept.

Which weights sit under the mask: `oneshot` (default) keeps the one-shot stage's weights where m₀ kept a
weight and the dense originals elsewhere, so the starting point is exactly the pruned model; `dense` puts the
dense originals everywhere, as in the paper (after SparseGPT this starts worse than the pruned model, since
SparseGPT's weight updates are dropped; for magnitude and Wanda the two are the same).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from methods import PruningError, Target
from methods.maskpro import ESTIMATORS, MAX_SET_N, MaskPro, grouped
from prune.devices import synchronize
from prune.models import layer_weight

REFINE_METHODS = ("maskpro",)
REFINE_ESTIMATORS = ("auto", *ESTIMATORS)
UNDER_MASK = ("oneshot", "dense")


@dataclass
class RefineSettings:
    """What the refinement stage does (seed 002's defaults for lr, logit scale and α)."""

    method: str = "maskpro"
    steps: int = 100
    lr: float = 50.0
    logit_scale: float = 10.0  # C in π₀ = C · m₀
    alpha: float = 0.99  # the tracker's moving-average factor
    batch: int = 4  # windows per step
    seqlen: int = 256
    windows: int = 64  # training windows, in fixed batches (L(m₀) is measured once per batch)
    holdout: int = 8  # held-out windows on which the final mask is compared with m₀
    candidates: int = 0  # also draw K masks from the learned policy; keep the best of top-N, the K draws and m₀ on the held-out windows
    weights: str = "oneshot"  # which weights sit under the mask: 'oneshot' or 'dense'
    estimator: str = "auto"  # ∇log p of the unordered set ('set', Eq. 16, N <= 4), of the sampled draw order ('sequence'), or 'auto': set when N <= 4
    seed: int = 0
    log_every: int = 10
    progress: bool = True

    def check(self, target: Target | None = None) -> None:
        if self.method not in REFINE_METHODS:
            raise PruningError(f"--refine must be one of {', '.join(REFINE_METHODS)}, got {self.method!r}")
        for label, value in (("refine-steps", self.steps), ("refine-batch", self.batch), ("refine-seqlen", self.seqlen),
                             ("refine-holdout", self.holdout), ("refine-log-every", self.log_every)):
            if value < 1:
                raise PruningError(f"--{label} must be at least 1, got {value}")
        if self.windows < self.batch:
            raise PruningError(f"--refine-windows ({self.windows}) must hold at least one batch of --refine-batch ({self.batch})")
        if self.candidates < 0:
            raise PruningError(f"--refine-candidates must be >= 0, got {self.candidates}")
        if not self.lr > 0 or not self.logit_scale > 0:
            raise PruningError("--refine-lr and --refine-logit-scale must be positive")
        if not 0 <= self.alpha < 1:
            raise PruningError(f"--refine-alpha must be in [0, 1), got {self.alpha:g}")
        if self.weights not in UNDER_MASK:
            raise PruningError(f"--refine-weights must be one of {', '.join(UNDER_MASK)}, got {self.weights!r}")
        if self.estimator not in REFINE_ESTIMATORS:
            raise PruningError(f"--refine-estimator must be one of {', '.join(REFINE_ESTIMATORS)}, got {self.estimator!r}")
        if target is not None:
            if not target.is_nm:
                raise PruningError("--refine maskpro learns N:M masks: it needs --pattern N:M, not an unstructured --sparsity")
            if self.estimator == "set" and target.n > MAX_SET_N:
                raise PruningError(f"--refine-estimator set sums over N! draw orders; N = {target.n} is too many (use sequence)")


def resolved_estimator(estimator: str, n: int) -> str:
    """'auto' is the paper's set estimator when its N! orders are few (N <= 4), else the sampled-order one."""
    if estimator != "auto":
        return estimator
    return "set" if n <= MAX_SET_N else "sequence"


@dataclass
class RefineResult:
    """What the refinement did: the residual curve, the mask changes, held-out losses and where the time went."""

    method: str
    steps: int
    lr: float
    logit_scale: float
    alpha: float
    estimator: str
    weights: str
    batch: int
    seqlen: int
    layers: int
    groups: int
    curve: list[dict] = field(default_factory=list)  # {"step", "residual": mean L(m) − L(m₀) since the last entry, "tracker": δ}
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    seconds_sampling: float = 0.0  # drawing masks and writing them into the layers, summed over the steps
    seconds_forward: float = 0.0  # forward passes (L(m), and L(m₀) the first time a batch is seen)
    seconds_update: float = 0.0  # ∇log p and the logit update
    changed_groups: float = 0.0  # fraction of N:M groups whose kept set differs from m₀
    heldout: dict = field(default_factory=dict)  # held-out loss of m₀, of the top-N mask, of the candidates, and which was kept
    memory_mb: float = 0.0  # logits (4 bytes per weight) + masks in use, m₀ and the current draw (1 byte each)
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class KeepMask(nn.Module):
    """weight = original ⊙ mask; the mask is (out, in), transposed for GPT-2's Conv1D (in, out) weights."""

    def __init__(self, mask: Tensor, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        self.register_buffer("mask", mask.clone())

    def forward(self, original: Tensor) -> Tensor:
        return original * (self.mask.T if self.transposed else self.mask)


def put_weights_under_mask(layers: dict[str, nn.Module], dense: dict[str, Tensor], which: str) -> dict[str, Tensor]:
    """Write into each pruned layer the weights its mask will sit on, and return its one-shot keep masks m₀ (out, in).

    'dense': the dense originals everywhere; 'oneshot': the layer's pruned weights where m₀ kept one, the dense
    originals elsewhere. `dense[name]` is the layer's (out, in) weight from before pruning.
    """
    if which not in UNDER_MASK:
        raise PruningError(f"--refine-weights must be one of {', '.join(UNDER_MASK)}, got {which!r}")
    initial = {}
    for name, layer in layers.items():
        weight = layer_weight(layer)
        initial[name] = weight != 0
        original = dense[name].to(weight.device)
        if which == "dense":
            weight.copy_(original)
        else:
            weight[~initial[name]] = original[~initial[name]]
    return initial


def fixed_batches(windows: Tensor, batch: int) -> list[Tensor]:
    """Consecutive batches of `batch` windows (a last incomplete one is dropped)."""
    return [windows[start : start + batch] for start in range(0, len(windows) - batch + 1, batch)]


def language_model_loss(model: nn.Module, ids: Tensor) -> float:
    """Mean next-token cross-entropy of the model on a batch of windows."""
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def refine(model: nn.Module, layers: dict[str, nn.Module], initial: dict[str, Tensor], target: Target, train_windows: Tensor,
           holdout_windows: Tensor, settings: RefineSettings, device: torch.device, *, checkpoints: Collection[int] = (),
           on_checkpoint: Callable[[int], None] | None = None) -> RefineResult:
    """Refine the N:M masks of `layers` (name -> pruned layer) of `model` in place.

    Each layer's weight holds the weights that sit under the mask (see `put_weights_under_mask`) and
    `initial[name]` is its one-shot keep mask m₀, (out, in). On return each layer's weight is those weights
    ⊙ the chosen mask. After each step in `checkpoints`, the model is given the current top-N masks and
    `on_checkpoint(step)` is called (e.g. to measure perplexity); that time is not counted in the step times.
    """
    settings.check(target)
    home = next(model.parameters()).device
    model.to(device)
    initial = {name: mask.to(device) for name, mask in initial.items()}
    estimator = resolved_estimator(settings.estimator, target.n)
    refiner = MaskPro({name: mask for name, mask in initial.items()}, target.n, target.m, lr=settings.lr, logit_scale=settings.logit_scale,
                      alpha=settings.alpha, estimator=estimator, seed=settings.seed)
    result = RefineResult(settings.method, settings.steps, settings.lr, settings.logit_scale, settings.alpha, estimator, settings.weights,
                          settings.batch, settings.seqlen, len(layers), sum(mask.numel() // target.m for mask in initial.values()))
    # float32 logits, and one byte per weight for each of: the masks in use, m₀, the current draw's ranks
    result.memory_mb = sum(mask.numel() * (4 + 3) for mask in initial.values()) / 2**20
    keepers: dict[str, KeepMask] = {}
    for name, layer in layers.items():
        keepers[name] = KeepMask(initial[name], isinstance(layer, Conv1D)).to(device)
        parametrize.register_parametrization(layer, "weight", keepers[name], unsafe=True)

    def use(masks: dict[str, Tensor]) -> None:
        for name, mask in masks.items():
            keepers[name].mask.copy_(mask)

    chosen = initial
    try:
        batches = [batch.to(device) for batch in fixed_batches(train_windows, settings.batch)]
        baselines: dict[int, float] = {}
        generator = torch.Generator().manual_seed(settings.seed)
        order: list[int] = []
        draws: dict[str, Tensor] = {}
        residuals: list[float] = []
        model.eval()
        started = time.perf_counter()
        for step in tqdm(range(1, settings.steps + 1), desc=f"refine ({settings.method})", unit="step", disable=not settings.progress):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            index = order.pop()
            began = time.perf_counter()
            if index not in baselines:
                use(initial)
                baselines[index] = language_model_loss(model, batches[index])
            synchronize(device)
            sampled = time.perf_counter()
            draws = refiner.sample(out=draws)  # the previous draw's buffers
            refiner.masks(draws, out={name: keeper.mask for name, keeper in keepers.items()})
            synchronize(device)
            forwarded = time.perf_counter()
            residual = language_model_loss(model, batches[index]) - baselines[index]
            if not math.isfinite(residual):
                raise PruningError(f"refinement step {step}: the loss of a sampled mask is not finite ({residual}); the model cannot be refined this way")
            synchronize(device)
            updated = time.perf_counter()
            refiner.update(draws, residual)
            synchronize(device)
            finished = time.perf_counter()
            result.seconds_forward += (sampled - began) + (updated - forwarded)
            result.seconds_sampling += forwarded - sampled
            result.seconds_update += finished - updated
            residuals.append(residual)
            if step % settings.log_every == 0 or step == settings.steps:
                result.curve.append({"step": step, "residual": sum(residuals) / len(residuals), "tracker": refiner.tracker})
                residuals = []
            if on_checkpoint is not None and step in checkpoints:
                paused = time.perf_counter()
                use(refiner.final_masks())
                on_checkpoint(step)
                started += time.perf_counter() - paused
        result.seconds = time.perf_counter() - started
        result.seconds_per_step = result.seconds / settings.steps

        held_out = [batch.to(device) for batch in fixed_batches(holdout_windows, min(settings.batch, len(holdout_windows)))]

        def held_out_loss(masks: dict[str, Tensor]) -> float:
            use(masks)
            return sum(language_model_loss(model, batch) for batch in held_out) / len(held_out)

        final = refiner.final_masks()
        candidates = {"one-shot": initial, "top-N": final}
        for number in range(settings.candidates):
            candidates[f"draw {number + 1}"] = refiner.masks(refiner.sample())
        losses = {label: held_out_loss(masks) for label, masks in candidates.items()}
        kept = min(losses, key=losses.get) if settings.candidates > 0 else "top-N"
        chosen = candidates[kept]
        result.heldout = {"windows": len(holdout_windows), "losses": losses, "kept": kept}
        changed = sum(int((grouped(chosen[name], target.m) != grouped(initial[name], target.m)).any(-1).sum()) for name in layers)
        result.changed_groups = changed / result.groups if result.groups else 0.0
    finally:
        use(chosen)
        for layer in layers.values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        model.to(home)
    return result

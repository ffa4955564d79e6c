"""The refine stage: MaskPro refinement of N:M masks after the one-shot stage (the MaskPro paper, Sun et al., 2025): forward passes only.

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
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from calibration.windows import sample_windows, window_count
from eval.sparsity import nm_valid, zero_fraction
from methods import PruningError, Target
from methods.maskpro import ESTIMATORS, MAX_SET_N, PAPER_ALPHA, PAPER_LOGIT_SCALE, PAPER_LR, MaskPro, grouped
from prune.devices import on_device, synchronize
from prune.distributed import Ranks
from prune.models import CAUSAL_LM, layer_weight
from prune.plots import plot_refine
from prune.report import Section
from prune.run import Run, Stage
from prune.settings import StageSettings, check_fields, option
from prune.stages.oneshot_settings import refuse_after_quantization

REFINE_METHODS = ("maskpro",)
REFINE_ESTIMATORS = ("auto", *ESTIMATORS)
UNDER_MASK = ("oneshot", "dense")


@dataclass
class RefineSettings(StageSettings):
    """What the refinement stage does (the MaskPro paper's defaults for lr, logit scale and α)."""

    method: str = option("maskpro", "--refine", "After pruning to N:M, learn better masks of the pruned layers by MaskPro policy gradient "
                         "(forward passes only).", choices=REFINE_METHODS, switch=True)
    steps: int = option(100, "--refine-steps", "MaskPro steps (one mask draw and one forward pass each).", minimum=1)
    lr: float = option(PAPER_LR, "--refine-lr", "MaskPro learning rate of the logits (paper: 50).", positive=True)
    logit_scale: float = option(PAPER_LOGIT_SCALE, "--refine-logit-scale", "C in π₀ = C · m₀ (paper: 10).", positive=True)
    alpha: float = option(PAPER_ALPHA, "--refine-alpha", "Moving-average factor of the loss-residual tracker, in [0, 1) (paper: 0.99).")
    batch: int = option(4, "--refine-batch", "Calibration windows per MaskPro step.", minimum=1)
    seqlen: int = option(256, "--refine-seqlen", "Tokens per MaskPro window.", minimum=1)
    windows: int = option(64, "--refine-windows", "Training windows (fixed batches; L(m₀) is measured once per batch).", minimum=1)
    holdout: int = option(8, "--refine-holdout", "Held-out windows on which the final mask is compared with the one-shot mask.", minimum=1)
    candidates: int = option(0, "--refine-candidates", "Also draw K masks from the learned policy and keep the best of them, the top-N mask and "
                             "the one-shot mask on the held-out windows.", minimum=0)
    weights: str = option("oneshot", "--refine-weights", "Weights under the mask: the one-shot weights where the one-shot mask kept one, dense "
                          "elsewhere (oneshot), or the dense originals (dense, the paper's).", choices=UNDER_MASK)
    estimator: str = option("auto", "--refine-estimator", "∇log p of the unordered kept set (set, the paper's, N <= 4), of the sampled draw "
                            "order (sequence, any N, more variance), or auto: set when N <= 4.", choices=REFINE_ESTIMATORS)
    log_every: int = option(10, "--refine-log-every", "Steps per point of the residual curve in the report and refine.png.", minimum=1)

    def whole_model_reason(self, run: Any) -> str | None:
        return "--refine"

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)
        refuse_after_quantization("--refine", run)
        if self.windows < self.batch:
            raise PruningError(f"--refine-windows ({self.windows}) must hold at least one batch of --refine-batch ({self.batch})")
        if not 0 <= self.alpha < 1:
            raise PruningError(f"--refine-alpha must be in [0, 1), got {self.alpha:g}")
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


class MaskSwitch:
    """The layers' weights seen through keep masks that can be swapped in place (a parametrization on each weight:
    weight = weights under the mask ⊙ mask), so that trying a mask costs no copy of the weights."""

    def __init__(self, layers: dict[str, nn.Module], initial: dict[str, Tensor], device: torch.device) -> None:
        self.layers = layers
        self.keepers = {name: KeepMask(initial[name], isinstance(layer, Conv1D)).to(device) for name, layer in layers.items()}
        for name, layer in layers.items():
            parametrize.register_parametrization(layer, "weight", self.keepers[name], unsafe=True)

    def use(self, masks: dict[str, Tensor]) -> None:
        for name, mask in masks.items():
            self.keepers[name].mask.copy_(mask)

    def buffers(self) -> dict[str, Tensor]:
        """The masks in use, to write a draw straight into."""
        return {name: keeper.mask for name, keeper in self.keepers.items()}

    def close(self, masks: dict[str, Tensor]) -> None:
        """Leave each layer's weight as the weights under the mask ⊙ `masks`, without the parametrization."""
        self.use(masks)
        for layer in self.layers.values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def refine(model: nn.Module, layers: dict[str, nn.Module], initial: dict[str, Tensor], target: Target, train_windows: Tensor,
           holdout_windows: Tensor, settings: RefineSettings, device: torch.device, *, seed: int = 0, progress: bool = True,
           checkpoints: Collection[int] = (), on_checkpoint: Callable[[int], None] | None = None, ranks: Ranks | None = None) -> RefineResult:
    """Refine the N:M masks of `layers` (name -> pruned layer) of `model` in place.

    Each layer's weight holds the weights that sit under the mask (see `put_weights_under_mask`) and
    `initial[name]` is its one-shot keep mask m₀, (out, in). On return each layer's weight is those weights
    ⊙ the chosen mask. After each step in `checkpoints`, the model is given the current top-N masks and
    `on_checkpoint(step)` is called (e.g. to measure perplexity); that time is not counted in the step times.
    With several `ranks`, each draws its own masks (its own seed) on its share of the training batches, and the
    logits move by the mean of their estimates: the same logits on every rank, more draws per step.
    """
    ranks = ranks or Ranks()
    settings.check(target)
    home = next(model.parameters()).device
    model.to(device)
    initial = {name: mask.to(device) for name, mask in initial.items()}
    estimator = resolved_estimator(settings.estimator, target.n)
    refiner = MaskPro(initial, target.n, target.m, lr=settings.lr, logit_scale=settings.logit_scale, alpha=settings.alpha, estimator=estimator,
                      seed=seed * ranks.world + ranks.rank)
    result = RefineResult(settings.method, settings.steps, settings.lr, settings.logit_scale, settings.alpha, estimator, settings.weights,
                          settings.batch, settings.seqlen, len(layers), sum(mask.numel() // target.m for mask in initial.values()))
    # float32 logits, and one byte per weight for each of: the masks in use, m₀, the current draw's ranks
    result.memory_mb = sum(mask.numel() * (4 + 3) for mask in initial.values()) / 2**20
    switch = MaskSwitch(layers, initial, device)
    chosen = initial
    model.eval()
    try:
        batches = ranks.share([batch.to(device) for batch in fixed_batches(train_windows, settings.batch)])
        policy_steps(model, refiner, switch, initial, batches, settings, result, device, seed=seed, progress=progress, checkpoints=checkpoints,
                     on_checkpoint=on_checkpoint, ranks=ranks)
        held_out = [batch.to(device) for batch in fixed_batches(holdout_windows, min(settings.batch, len(holdout_windows)))]
        chosen = final_mask(model, refiner, switch, initial, held_out, settings.candidates, result, ranks)
        result.heldout["windows"] = len(holdout_windows)
        changed = sum(int((grouped(chosen[name], target.m) != grouped(initial[name], target.m)).any(-1).sum()) for name in layers)
        result.changed_groups = changed / result.groups if result.groups else 0.0
    finally:
        switch.close(chosen)
        model.to(home)
    return result


def policy_steps(model: nn.Module, refiner: MaskPro, switch: MaskSwitch, initial: dict[str, Tensor], batches: list[Tensor],
                 settings: RefineSettings, result: RefineResult, device: torch.device, *, seed: int, progress: bool,
                 checkpoints: Collection[int], on_checkpoint: Callable[[int], None] | None, ranks: Ranks) -> None:
    """`settings.steps` MaskPro steps (Eq. 12): draw a mask, measure L(m) − L(m₀) on a batch (L(m₀) the first time
    the batch is seen), update the logits. Fills the residual curve and the time split of `result`."""
    baselines: dict[int, float] = {}
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    draws: dict[str, Tensor] = {}
    residuals: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(1, settings.steps + 1), desc=f"refine ({settings.method})", unit="step", disable=not progress):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        index = order.pop()
        began = time.perf_counter()
        if index not in baselines:
            switch.use(initial)
            baselines[index] = language_model_loss(model, batches[index])
        synchronize(device)
        sampled = time.perf_counter()
        draws = refiner.sample(out=draws)  # the previous draw's buffers
        refiner.masks(draws, out=switch.buffers())
        synchronize(device)
        forwarded = time.perf_counter()
        residual = language_model_loss(model, batches[index]) - baselines[index]
        if not math.isfinite(residual):
            raise PruningError(f"refinement step {step}: the loss of a sampled mask is not finite ({residual}); the model cannot be refined this way")
        synchronize(device)
        updated = time.perf_counter()
        residual = refiner.update(draws, residual, ranks.sum_ if ranks.several else None, ranks.world)  # the ranks' mean residual
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
            switch.use(refiner.final_masks())
            on_checkpoint(step)
            started += time.perf_counter() - paused
    result.seconds = time.perf_counter() - started
    result.seconds_per_step = result.seconds / settings.steps


def final_mask(model: nn.Module, refiner: MaskPro, switch: MaskSwitch, initial: dict[str, Tensor], held_out: list[Tensor], candidates: int,
               result: RefineResult, ranks: Ranks | None = None) -> dict[str, Tensor]:
    """The top-N mask of the learned logits; with `candidates` > 0, the best on the held-out batches of it, m₀ and
    that many draws from the policy (rank 0's draws, with several ranks). Every candidate's held-out loss goes into
    `result.heldout`."""
    ranks = ranks or Ranks()

    def held_out_loss(masks: dict[str, Tensor]) -> float:
        switch.use(masks)
        return sum(language_model_loss(model, batch) for batch in held_out) / len(held_out)

    masks = {"one-shot": initial, "top-N": refiner.final_masks()}
    for number in range(candidates):
        draw = refiner.masks(refiner.sample())
        if ranks.several:  # every rank compares the same candidates
            draw = {name: ranks.broadcast_(mask.to(torch.uint8), 0).bool() for name, mask in draw.items()}
        masks[f"draw {number + 1}"] = draw
    losses = {label: held_out_loss(mask) for label, mask in masks.items()}
    kept = min(losses, key=losses.get) if candidates > 0 else "top-N"
    result.heldout = {"losses": losses, "kept": kept}
    return masks[kept]


def dense_snapshot(layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """A CPU copy of the (out, in) weight of each layer (by name)."""
    return {name: layer_weight(layer).detach().to("cpu", copy=True) for name, layer in layers.items()}


def refine_lines(refined: dict) -> list[str]:
    curve, heldout, seconds = refined["curve"], refined["heldout"]["losses"], max(refined["seconds"], 1e-12)
    return [
        f"refinement ({refined['method']}, {refined['steps']} steps, lr {refined['lr']:g}, C {refined['logit_scale']:g}, α {refined['alpha']:g}, "
        f"{refined['weights']} weights under the mask): residual {curve[0]['residual']:+.4f} -> {curve[-1]['residual']:+.4f}, "
        f"{refined['changed_groups']:.2%} of groups changed, held-out loss one-shot {heldout['one-shot']:.4f} / top-N {heldout['top-N']:.4f} "
        f"(kept {refined['heldout']['kept']}), {refined['seconds_per_step']:.2f} s/step (sampling {refined['seconds_sampling'] / seconds:.0%}, "
        f"forward {refined['seconds_forward'] / seconds:.0%}, update {refined['seconds_update'] / seconds:.0%})"
    ]


class Refine(Stage):
    key, settings_class = "refine", RefineSettings
    name = "refine"
    sections = ("refine",)
    label = "refined"

    def prepare(self, run: Run) -> None:
        settings = self.settings
        run.check_kind("--refine", CAUSAL_LM, why="measures the language-modelling loss on the calibration text (for another model, call "
                       "prune.stages.refine.refine() with batches of its own task)")
        run.check_length("--refine-seqlen", settings.seqlen)
        ids = run.calibration_ids()
        needed = settings.windows + settings.holdout
        if window_count(ids, settings.seqlen) < needed:
            raise PruningError(f"the calibration text is too short for --refine: {len(ids)} tokens give {window_count(ids, settings.seqlen)} "
                               f"windows of {settings.seqlen} tokens (--refine-seqlen), --refine-windows + --refine-holdout = {needed} needed")
        if settings.windows // settings.batch < run.ranks.world:
            raise PruningError(f"--refine-windows {settings.windows} make {settings.windows // settings.batch} batches of --refine-batch "
                               f"{settings.batch}: fewer than the {run.ranks.world} ranks, which need one each")
        self.windows = sample_windows(ids, needed, settings.seqlen, run.settings.seed + 1)
        self.dense = dense_snapshot(run.plan.pruned_layers())  # the dense weights of the layers to prune, which the masks may put back

    def execute(self, run: Run) -> None:
        settings = self.settings
        layers = {layer.name: run.model.get_submodule(layer.name) for layer in run.report.layers if layer.loss is not None}
        initial = put_weights_under_mask(layers, self.dense, settings.weights)
        del self.dense
        with on_device(run.model, run.device, run.compute_dtype):
            result = refine(run.model, layers, initial, self.target, self.windows[: settings.windows], self.windows[settings.windows :], settings,
                            run.device, seed=run.settings.seed, progress=run.settings.progress, ranks=run.ranks)
        run.report.put("refine", Section(result.as_dict(), lines=refine_lines,
                                         draw=lambda figures, folder: plot_refine(figures, folder / "refine.png")))
        for layer_report in run.report.layers:  # every refined layer must still hold the pattern
            if layer_report.loss is None:
                continue
            weight = layer_weight(run.model.get_submodule(layer_report.name))
            layer_report.sparsity = zero_fraction(weight)
            layer_report.pattern_valid = nm_valid(weight, self.target.n, self.target.m)
            if not layer_report.pattern_valid:
                raise PruningError(f"internal error: {layer_report.name} lost its {self.target.pattern} pattern during refinement")

    def evaluated(self, run: Run, before: dict, after: dict) -> None:
        if "perplexity" in after:
            run.report.refine["perplexity_before"] = before["perplexity"]["value"]
            run.report.refine["perplexity_after"] = after["perplexity"]["value"]

"""Movement pruning (Sanh et al., 2020; the pruning deep-dive §6) of a model on its task loss: every prunable layer's weight is
reparametrized as W ⊙ M(S) with a trained score S per weight (straight-through), while the model is fine-tuned
through the toolkit's one training loop (`prune.training.train`). Not one-shot: it is a fine-tuning run, offered
from Python and by the CoNLL benchmark, not by the `prune` command."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import get_linear_schedule_with_warmup

from eval.sparsity import zero_fraction
from methods import PruningError
from methods.movement import hard_mask, masked_weight, soft_mask, soft_penalty
from methods.schedules import cubic_sparsity
from prune.models import all_prunable_layers, layer_weight
from prune.training import train

VARIANTS = ("hard", "soft")


@dataclass
class MovementSettings:
    """Hard: each layer keeps the top (1 − s) of its scores, s rising from 0 to `sparsity` on the cubic schedule
    between `warmup` and `cooldown` (shares of the steps). Soft: M = 1[S > `threshold`], scores pushed down by
    `penalty` · Σσ(S); the sparsity is what the penalty makes it. Scores start at 0 (so the soft threshold must be
    below 0 for every weight to start kept); weights and scores train with AdamW (their own learning rates), the
    learning rates warm up linearly over `warmup` of the steps and decay linearly to 0."""

    variant: str = "hard"
    sparsity: float = 0.5
    steps: int = 300
    lr: float = 3e-5
    score_lr: float = 1e-2
    warmup: float = 0.1
    cooldown: float = 0.2
    threshold: float = -0.1
    penalty: float = 1e-6  # MiniLM-L6 on CoNLL, 300 steps: 1e-6 reached 47 % sparsity, 4e-6 80 %; 1e-4 pruned everything
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise PruningError(f"movement pruning is hard or soft, not {self.variant!r}")
        if not 0 <= self.sparsity < 1:
            raise PruningError(f"movement sparsity must be in [0, 1), got {self.sparsity:g}")
        if self.steps < 1:
            raise PruningError(f"movement pruning needs at least one step, got {self.steps}")
        if not (0 <= self.warmup and 0 <= self.cooldown and self.warmup + self.cooldown < 1):
            raise PruningError(f"warm-up {self.warmup:g} and cool-down {self.cooldown:g} must be shares of the steps leaving some between them")
        for label, value in (("lr", self.lr), ("score lr", self.score_lr)):
            if not value > 0:
                raise PruningError(f"movement {label} must be positive, got {value:g}")
        if self.threshold >= 0:
            raise PruningError(f"the soft threshold must be below the scores' start (0), got {self.threshold:g}")
        if self.penalty < 0:
            raise PruningError(f"the soft penalty must not be negative, got {self.penalty:g}")


class MovementMask(nn.Module):
    """The parametrization W ↦ W ⊙ M(S) of one layer's weight, holding its scores S."""

    def __init__(self, weight: torch.Tensor, schedule: dict) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.schedule = schedule  # shared by all layers: {"variant", "sparsity", "threshold"}

    def mask(self) -> torch.Tensor:
        if self.schedule["variant"] == "hard":
            return hard_mask(self.scores, self.schedule["sparsity"])
        return soft_mask(self.scores, self.schedule["threshold"])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return masked_weight(weight, self.mask().to(weight.dtype))


@dataclass
class MovementResult:
    variant: str
    steps: int
    sparsity: float  # zeros over all the pruned layers at the end
    layers: dict[str, float] = field(default_factory=dict)  # per layer, its sparsity
    losses: list[float] = field(default_factory=list)  # the task loss of every step
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def movement_prune(model: nn.Module, batches: Iterable[dict], settings: MovementSettings, device: torch.device) -> MovementResult:
    """Fine-tune `model` on `batches` (model inputs with `labels`) for `settings.steps` steps while learning movement
    scores for every prunable layer of its transformer blocks; at the end each weight is W ⊙ M(S), its pruned entries
    exactly zero, and the parametrizations are gone (a plain model again, to save or evaluate)."""
    settings.check()
    torch.manual_seed(settings.seed)
    layers = all_prunable_layers(model)
    schedule = {"variant": settings.variant, "sparsity": 0.0, "threshold": settings.threshold}
    warmup, cooldown = int(settings.warmup * settings.steps), int(settings.cooldown * settings.steps)
    masks = {}
    model.to(device)
    for name, layer in layers.items():
        masks[name] = MovementMask(layer.weight, schedule).to(device)
        parametrize.register_parametrization(layer, "weight", masks[name])
    result = MovementResult(variant=settings.variant, steps=settings.steps, sparsity=0.0)
    try:
        scores = [mask.scores for mask in masks.values()]
        weights = [parameter for parameter in model.parameters() if id(parameter) not in {id(score) for score in scores}]
        optimizers = [torch.optim.AdamW(weights, lr=settings.lr, weight_decay=settings.weight_decay),
                      torch.optim.AdamW(scores, lr=settings.score_lr, weight_decay=0.0)]
        schedulers = [get_linear_schedule_with_warmup(optimizer, warmup, settings.steps) for optimizer in optimizers]

        def after_step(step: int, loss: float) -> None:
            result.losses.append(loss)
            if settings.variant == "hard":  # the sparsity of the next step (Zhu & Gupta's cubic schedule)
                schedule["sparsity"] = cubic_sparsity(step, settings.steps, settings.sparsity, warmup=warmup, cooldown=cooldown)

        penalty = (lambda: soft_penalty(scores, settings.penalty)) if settings.variant == "soft" else None
        started = time.perf_counter()
        train(model, batches, settings.steps, optimizers, schedulers, device, clip_norm=settings.clip_norm, after_step=after_step,
              progress=settings.progress, description=f"{settings.variant} movement pruning", penalty=penalty)
        result.seconds = time.perf_counter() - started
        if settings.variant == "hard":
            schedule["sparsity"] = settings.sparsity
    finally:
        for layer in layers.values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    result.layers = {name: zero_fraction(layer_weight(layer)) for name, layer in layers.items()}
    total = sum(layer_weight(layer).numel() for layer in layers.values())
    result.sparsity = sum(result.layers[name] * layer_weight(layer).numel() for name, layer in layers.items()) / total
    return result

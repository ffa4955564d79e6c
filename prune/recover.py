"""Recovery fine-tune after pruning: train the surviving weights with Magma (or plain AdamW / SkipUpdate)
while every pruned weight stays exactly zero."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from methods import PruningError
from methods.magma import GRANULARITIES, Magma
from prune.devices import synchronize
from prune.models import prunable_layers, transformer_blocks

RECOVER_OPTIMIZERS = ("magma", "adamw", "skipupdate")
WRAPPER_MODE = {"magma": "magma", "adamw": "none", "skipupdate": "skipupdate"}


@dataclass
class RecoverSettings:
    """What the recovery stage does. `optimizer`: 'magma' (AdamW under Magma), 'adamw' (the plain baseline)
    or 'skipupdate' (AdamW under random masking scaled by 1/p). The schedule is the Magma paper's
    (seed 001, App. C): linear warm-up over `warmup` of the steps, then cosine decay to `min_lr_rate` x lr."""

    optimizer: str = "magma"
    steps: int = 100
    lr: float = 5e-5
    batch: int = 4
    seqlen: int = 256
    warmup: float = 0.1
    min_lr_rate: float = 0.1
    weight_decay: float = 0.0
    train_other: bool = False  # also train norms, embeddings and heads (plain AdamW, no masking)
    p: float = 0.5
    tau: float = 2.0
    granularity: str = "tensor"
    seed: int = 0
    log_every: int = 10
    debug: bool = False  # check after every step that no pruned weight moved
    progress: bool = True

    def check(self) -> None:
        if self.optimizer not in RECOVER_OPTIMIZERS:
            raise PruningError(f"--recover must be one of {', '.join(RECOVER_OPTIMIZERS)}, got {self.optimizer!r}")
        for label, value in (("recover-steps", self.steps), ("recover-batch", self.batch), ("recover-seqlen", self.seqlen), ("recover-log-every", self.log_every)):
            if value < 1:
                raise PruningError(f"--{label} must be at least 1, got {value}")
        if not self.lr > 0:
            raise PruningError(f"--recover-lr must be positive, got {self.lr:g}")
        if not 0 <= self.warmup < 1:
            raise PruningError(f"--recover-warmup must be in [0, 1), got {self.warmup:g}")
        if not 0 < self.p <= 1:
            raise PruningError(f"--recover-p must be in (0, 1], got {self.p:g}")
        if self.tau <= 0:
            raise PruningError(f"--recover-tau must be positive, got {self.tau:g}")
        if self.granularity not in GRANULARITIES:
            raise PruningError(f"--recover-granularity must be one of {', '.join(GRANULARITIES)}")


@dataclass
class RecoverResult:
    """What the recovery stage did: its settings, the training-loss curve, and where the time went."""

    optimizer: str
    steps: int
    lr: float
    batch: int
    seqlen: int | None
    trained_parameters: int
    masked_weights: int  # pruned weights pinned at zero
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"}: mean training loss since the last entry
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    seconds_forward_backward: float = 0.0
    seconds_optimizer: float = 0.0  # base optimizer + masking, summed over the steps
    updated_fraction: float | None = None  # mean share of blocks Magma/SkipUpdate let through
    zeros_kept: bool = True  # every pruned weight was still zero at the end
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def masked_weights(model: nn.Module) -> dict[Tensor, Tensor]:
    """The weight of every prunable layer in the transformer blocks -> its keep mask (nonzero entries)."""
    _, blocks = transformer_blocks(model)
    return {layer.weight: layer.weight != 0 for block in blocks for layer in prunable_layers(block).values()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(attention and MLP parameters: the prunable layers' weights and biases, everything else)."""
    _, blocks = transformer_blocks(model)
    inside = {id(parameter) for block in blocks for layer in prunable_layers(block).values() for parameter in layer.parameters()}
    unique = {id(parameter): parameter for parameter in model.parameters()}
    return [p for key, p in unique.items() if key in inside], [p for key, p in unique.items() if key not in inside]


def language_model_batches(ids: Tensor, seqlen: int, batch: int, seed: int) -> Iterator[dict]:
    """Endless batches of non-overlapping windows of `ids`, reshuffled (seeded) each time all were seen."""
    available = len(ids) // seqlen
    if available < batch:
        raise PruningError(
            f"the recovery text is too short: {len(ids)} tokens give {available} windows of {seqlen} tokens, "
            f"a batch needs {batch} (use a longer corpus, a smaller --recover-batch or a shorter --recover-seqlen)"
        )
    windows = ids[: available * seqlen].reshape(available, seqlen)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(available, generator=generator)
        for start in range(0, available - batch + 1, batch):
            chosen = windows[order[start : start + batch]]
            yield {"input_ids": chosen, "labels": chosen}


def make_optimizers(model: nn.Module, settings: RecoverSettings) -> tuple[Magma, torch.optim.Optimizer | None, int, int]:
    """The masked optimizer over attention and MLP parameters, the plain one over the others (or None: frozen),
    the number of trained parameters and of pinned zeros."""
    inside, outside = split_parameters(model)
    for parameter in outside:
        parameter.requires_grad_(settings.train_other)
    for parameter in inside:
        parameter.requires_grad_(True)
    keep = {parameter: mask for parameter, mask in masked_weights(model).items() if not bool(mask.all())}
    # one group per tensor: Magma then scales each tensor's update through its group's learning rate in one base step
    base = torch.optim.AdamW([{"params": [parameter]} for parameter in inside], lr=settings.lr, weight_decay=settings.weight_decay)
    masked = Magma(base, mode=WRAPPER_MODE[settings.optimizer], p=settings.p, tau=settings.tau, granularity=settings.granularity,
                   keep_masks=keep, seed=settings.seed, debug=settings.debug)
    other = torch.optim.AdamW(outside, lr=settings.lr, weight_decay=settings.weight_decay) if settings.train_other and outside else None
    trained = sum(p.numel() for p in inside) + (sum(p.numel() for p in outside) if other is not None else 0)
    pinned = sum(int((~mask).sum()) for mask in keep.values())
    return masked, other, trained, pinned


def recover(model: nn.Module, batches: Iterator[dict], settings: RecoverSettings, device: torch.device) -> RecoverResult:
    """Fine-tune `model` for `settings.steps` steps on `batches` (dicts the model takes, with `labels`),
    keeping its pruned weights at zero. The model is trained on `device` and put back where it was."""
    settings.check()
    home = next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.to(device)
    masked, other, trained, pinned = make_optimizers(model, settings)
    schedulers = [
        get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.floor(settings.warmup * settings.steps), settings.steps, min_lr_rate=settings.min_lr_rate)
        for optimizer in (masked.base, other) if optimizer is not None
    ]
    first = None
    result = RecoverResult(settings.optimizer, settings.steps, settings.lr, settings.batch, None, trained, pinned)
    interval_losses: list[float] = []
    updated: list[float] = []
    model.train()
    started = time.perf_counter()
    try:
        for step in tqdm(range(1, settings.steps + 1), desc=f"recover ({settings.optimizer})", unit="step", disable=not settings.progress):
            batch = {key: value.to(device) for key, value in next(batches).items()}
            first = first or batch
            began = time.perf_counter()
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise PruningError(f"recovery diverged at step {step} (training loss {loss.item()}); use a smaller --recover-lr")
            loss.backward()
            synchronize(device)
            middle = time.perf_counter()
            masked.step()
            if other is not None:
                other.step()
            synchronize(device)
            result.seconds_optimizer += time.perf_counter() - middle
            result.seconds_forward_backward += middle - began
            masked.zero_grad()
            if other is not None:
                other.zero_grad()
            interval_losses.append(loss.item())
            if settings.optimizer != "adamw":
                updated.append(masked.updated_fraction)
            if step % settings.log_every == 0 or step == settings.steps:
                result.curve.append({"step": step, "loss": sum(interval_losses) / len(interval_losses), "lr": schedulers[0].get_last_lr()[0]})
                interval_losses = []
            for scheduler in schedulers:
                scheduler.step()
        result.zeros_kept = all(bool(torch.all(masked.parameters[index][~mask] == 0)) for index, mask in masked.keep_masks.items())
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        for parameter in model.parameters():
            parameter.requires_grad_(flags[id(parameter)])
        model.to(home)
    result.seconds = time.perf_counter() - started
    result.seconds_per_step = result.seconds / settings.steps
    result.seqlen = int(first["input_ids"].shape[1]) if first is not None else None
    result.updated_fraction = sum(updated) / len(updated) if updated else None
    return result

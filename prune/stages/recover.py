"""The recover stage: a fine-tune after pruning that trains the surviving weights with Magma (or plain AdamW /
SkipUpdate) while every pruned weight stays exactly zero: a causal LM on its calibration text, a token classifier
on the labelled sentences of its CoNLL train file."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from calibration.conll import NerDataError
from calibration.sentences import labelled_batches
from calibration.windows import language_model_batches, window_count
from methods import PruningError, Target
from methods.magma import DEFAULT_P, DEFAULT_TAU, GRANULARITIES, Magma
from prune.devices import on_device
from prune.distributed import Ranks
from prune.models import CAUSAL_LM, TOKEN_CLASSIFICATION, all_prunable_layers
from prune.plots import plot_recover
from prune.report import Section
from prune.run import Run, Stage
from prune.settings import StageSettings, check_fields, option
from prune.stages.oneshot_settings import refuse_after_quantization
from prune.training import train

RECOVER_OPTIMIZERS = ("magma", "adamw", "skipupdate")
WRAPPER_MODE = {"magma": "magma", "adamw": "none", "skipupdate": "skipupdate"}


@dataclass
class RecoverSettings(StageSettings):
    """What the recovery stage does. `optimizer`: 'magma' (AdamW under Magma), 'adamw' (the plain baseline)
    or 'skipupdate' (AdamW under random masking scaled by 1/p). The schedule is the Magma paper's
    (the Magma paper, App. C): linear warm-up over `warmup` of the steps, then cosine decay to `min_lr_rate` x lr."""

    optimizer: str = option("magma", "--recover", "After pruning, fine-tune the surviving attention/MLP weights (pruned weights stay zero): "
                            "magma (AdamW under Magma), adamw (plain baseline) or skipupdate. A causal LM trains on the calibration text, "
                            "a token classifier on the sentences of its --calibration conll:DIR train file.", choices=RECOVER_OPTIMIZERS,
                            switch=True)
    steps: int = option(100, "--recover-steps", "Recovery optimizer steps.", minimum=1)
    lr: float = option(5e-5, "--recover-lr", "Peak recovery learning rate.", positive=True)
    batch: int = option(4, "--recover-batch", "Recovery windows (or sentences) per step.", minimum=1)
    seqlen: int = option(256, "--recover-seqlen", "Tokens per recovery window (causal LMs).", minimum=1)
    warmup: float = option(0.1, "--recover-warmup", "Share of the steps over which the learning rate warms up linearly, in [0, 1).")
    min_lr_rate: float = option(0.1, "--recover-min-lr-rate", "The cosine decays the learning rate to this fraction of --recover-lr.", minimum=0.0)
    weight_decay: float = option(0.0, "--recover-weight-decay", "AdamW weight decay.", minimum=0.0)
    train_other: bool = option(False, "--recover-train-other", "Also train norms, embeddings and heads (plain AdamW); default: frozen.")
    p: float = option(DEFAULT_P, "--recover-p", "Magma/SkipUpdate: probability that a block is updated, in (0, 1].")
    tau: float = option(DEFAULT_TAU, "--recover-tau", "Magma: temperature of the momentum alignment.", positive=True)
    granularity: str = option("tensor", "--recover-granularity", "Magma/SkipUpdate: what one masked block is.", choices=GRANULARITIES)
    log_every: int = option(10, "--recover-log-every", "Steps per point of the loss curve in the report and recover.png.", minimum=1)
    debug: bool = option(False, "--recover-debug", "Check after every recovery step that no pruned weight moved.")

    def whole_model_reason(self, run: Any) -> str | None:
        return "--recover"

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)
        refuse_after_quantization("--recover", run)
        if not 0 <= self.warmup < 1:
            raise PruningError(f"--recover-warmup must be in [0, 1), got {self.warmup:g}")
        if not 0 < self.p <= 1:
            raise PruningError(f"--recover-p must be in (0, 1], got {self.p:g}")


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
    return {layer.weight: layer.weight != 0 for layer in all_prunable_layers(model).values()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(attention and MLP parameters: the prunable layers' weights and biases, everything else)."""
    inside = {id(parameter) for layer in all_prunable_layers(model).values() for parameter in layer.parameters()}
    unique = {id(parameter): parameter for parameter in model.parameters()}
    return [p for key, p in unique.items() if key in inside], [p for key, p in unique.items() if key not in inside]


def make_optimizers(model: nn.Module, settings: RecoverSettings, seed: int = 0) -> tuple[Magma, torch.optim.Optimizer | None, int, int]:
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
                   keep_masks=keep, seed=seed, debug=settings.debug)
    other = torch.optim.AdamW(outside, lr=settings.lr, weight_decay=settings.weight_decay) if settings.train_other and outside else None
    trained = sum(p.numel() for p in inside) + (sum(p.numel() for p in outside) if other is not None else 0)
    pinned = sum(int((~mask).sum()) for mask in keep.values())
    return masked, other, trained, pinned


def recover(model: nn.Module, batches: Iterator[dict], settings: RecoverSettings, device: torch.device, *, seed: int = 0,
            progress: bool = True, ranks: Ranks | None = None) -> RecoverResult:
    """Fine-tune `model` for `settings.steps` steps on `batches` (dicts the model takes, with `labels`),
    keeping its pruned weights at zero. The model is trained on `device` and put back where it was. With several
    `ranks`, each trains on its own `batches` through torch's DistributedDataParallel (the gradients averaged over
    the ranks), and the masked optimizer draws the same blocks on every rank, so every rank keeps the same model."""
    ranks = ranks or Ranks()
    settings.check()
    home = next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.to(device)
    masked, other, trained, pinned = make_optimizers(model, settings, seed)
    optimizers = [optimizer for optimizer in (masked, other) if optimizer is not None]
    schedulers = [
        get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.floor(settings.warmup * settings.steps), settings.steps, min_lr_rate=settings.min_lr_rate)
        for optimizer in (masked.base, other) if optimizer is not None
    ]
    result = RecoverResult(settings.optimizer, settings.steps, settings.lr, settings.batch, None, trained, pinned)
    interval_losses: list[float] = []
    updated: list[float] = []
    lengths: list[int] = []

    def shapes(stream: Iterator[dict]) -> Iterator[dict]:
        for batch in stream:
            lengths.append(int(batch["input_ids"].shape[1]))
            yield batch

    def after_step(step: int, loss: float) -> None:
        if ranks.several:  # the mean over the ranks' batches
            loss = ranks.sum_(torch.tensor([loss], dtype=torch.float64, device=device)).item() / ranks.world
        interval_losses.append(loss)
        if settings.optimizer != "adamw":
            updated.append(masked.updated_fraction)
        if step % settings.log_every == 0 or step == settings.steps:
            result.curve.append({"step": step, "loss": sum(interval_losses) / len(interval_losses), "lr": schedulers[0].get_last_lr()[0]})
            interval_losses.clear()

    started = time.perf_counter()
    try:
        trained_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ranks.several else model
        times = train(trained_model, shapes(batches), settings.steps, optimizers, schedulers, device, after_step=after_step, progress=progress,
                      description=f"recover ({settings.optimizer})")
        result.zeros_kept = all(bool(torch.all(masked.parameters[index][~mask] == 0)) for index, mask in masked.keep_masks.items())
    except PruningError as error:
        raise PruningError(f"recovery: {error}; use a smaller --recover-lr") from None
    finally:
        model.zero_grad(set_to_none=True)
        for parameter in model.parameters():
            parameter.requires_grad_(flags[id(parameter)])
        model.to(home)
    result.seconds = time.perf_counter() - started
    result.seconds_per_step = result.seconds / settings.steps
    result.seconds_forward_backward, result.seconds_optimizer = times.forward_backward, times.optimizer
    result.seqlen = lengths[0] if lengths and len(set(lengths)) == 1 else None
    result.updated_fraction = sum(updated) / len(updated) if updated else None
    return result


def recover_lines(recovered: dict) -> list[str]:
    curve = recovered["curve"]
    return [
        f"recovery ({recovered['optimizer']}, {recovered['steps']} steps, lr {recovered['lr']:g}, batch {recovered['batch']} x {recovered['seqlen']} tokens): "
        f"training loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}, {recovered['seconds_per_step']:.2f} s/step "
        f"(optimizer {recovered['seconds_optimizer'] / recovered['steps']:.3f} s), pruned weights kept at zero: {'yes' if recovered['zeros_kept'] else 'NO'}"
    ]


class Recover(Stage):
    key, settings_class = "recover", RecoverSettings
    name = "recover"
    sections = ("recover",)
    label = "recovered"

    def prepare(self, run: Run) -> None:
        settings, folder = self.settings, run.settings.calibrate.conll_folder()
        if run.loaded.kind == CAUSAL_LM:
            run.check_length("--recover-seqlen", settings.seqlen)
            ids = run.calibration_ids()
            if window_count(ids, settings.seqlen) < settings.batch:
                raise PruningError(f"the calibration text is too short for --recover: {len(ids)} tokens give {window_count(ids, settings.seqlen)} "
                                   f"windows of {settings.seqlen} tokens, a batch needs {settings.batch} (use a longer corpus, a smaller "
                                   "--recover-batch or a shorter --recover-seqlen)")
            self.batches = language_model_batches(ids, settings.seqlen, settings.batch, run.settings.seed)
        elif run.loaded.kind == TOKEN_CLASSIFICATION and folder is not None:
            sentences, labels = run.labelled_sentences("--recover")
            try:
                self.batches = labelled_batches(run.loaded.tokenizer, sentences, labels, settings.batch, seed=run.settings.seed)
            except NerDataError as error:
                raise PruningError(f"--recover-batch {settings.batch}: {error}") from None
        else:
            raise PruningError(f"--recover needs labelled task data: a causal LM trains on its calibration text, a token classifier on "
                               f"--calibration conll:DIR; this model is a {run.loaded.kind}" + (" calibrated on text" if folder is None else ""))

    def execute(self, run: Run) -> None:
        batches = itertools.islice(self.batches, run.ranks.rank, None, run.ranks.world)  # with several ranks: every world-th batch each
        with on_device(run.model, run.device, run.compute_dtype):  # trained in the compute dtype, stored back in the model's
            result = recover(run.model, batches, self.settings, run.device, seed=run.settings.seed, progress=run.settings.progress, ranks=run.ranks)
        run.report.put("recover", Section(result.as_dict(), lines=recover_lines,
                                          draw=lambda figures, folder: plot_recover(figures, folder / "recover.png")))
        if not result.zeros_kept:
            raise PruningError("internal error: pruned weights moved during recovery")

    def evaluated(self, run: Run, before: dict, after: dict) -> None:
        if "perplexity" in after:
            run.report.recover["perplexity_before"] = before["perplexity"]["value"]
            run.report.recover["perplexity_after"] = after["perplexity"]["value"]

"""Running accumulators of layer-input statistics: the Hessian H = (2/n) X Xᵀ and the column norms ‖X_j‖₂.

Each is started for a layer's input width, fed activations (`add`), combined with the same accumulator of the other
processes of a run (`merge`), and read (`result`); calibration feeds them without naming one (ACCUMULATORS maps the
statistic a method declares to its class). The statistics built from task-loss gradients are the method's own
(Method.gradients), and say themselves whether they can be merged."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from methods.base import COLUMN_NORMS, HESSIAN, exact_matmul


def _valid_rows(inputs: Tensor, token_mask: Tensor | None) -> Tensor:
    """The input vectors as rows (tokens, features), without the positions the token mask excludes."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1).to(rows.device)]
    return rows


def merge_running_mean(mean: Tensor, tokens: int, sum_across: Callable[[Tensor], Tensor]) -> int:
    """Turn this process's running mean over `tokens` tokens, in place, into the mean over every process's tokens
    (Σ_r n_r mean_r / Σ_r n_r; `sum_across` sums a tensor over the processes in place); returns Σ_r n_r."""
    total = int(sum_across(torch.tensor([float(tokens)], dtype=torch.float64, device=mean.device)).item())
    mean.mul_(tokens)
    sum_across(mean)
    mean.div_(max(total, 1))
    return total


class HessianAccumulator:
    """H = (2/n) Σ x xᵀ over the n tokens seen so far, kept as a running mean.

    H is symmetric: only its upper triangle is accumulated, one row panel of the inputs at a time against the
    columns from that panel on (with P panels, (P + 1) / 2P of the full products), and `result` mirrors it once.
    """

    PANEL = 128  # features per panel: narrower panels save more products but run each at a lower matmul rate

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.hessian = torch.zeros(features, features, device=device, dtype=dtype)
        self.tokens = 0
        self.panels = [(start, min(start + self.PANEL, features)) for start in range(0, features, self.PANEL)]
        self.mirrored = False

    def add(self, inputs: Tensor, token_mask: Tensor | None = None) -> None:
        rows = _valid_rows(inputs, token_mask).to(self.hessian.dtype)
        count = rows.shape[0]
        if count == 0:
            return
        total = self.tokens + count
        self.hessian.mul_(self.tokens / total)
        with exact_matmul():
            for start, end in self.panels:
                self.hessian[start:end, start:].addmm_(rows[:, start:end].T, rows[:, start:], alpha=2.0 / total)
        self.tokens = total
        self.mirrored = False

    def merge(self, sum_across: Callable[[Tensor], Tensor]) -> None:
        """Combine with the same accumulator of the other processes of a run (`sum_across` sums a tensor over them in
        place): H becomes the running mean over all their tokens, H = Σ_r n_r H_r / Σ_r n_r."""
        self.tokens = merge_running_mean(self.hessian, self.tokens, sum_across)

    def result(self) -> Tensor:
        if not self.mirrored:  # the upper triangle copied below the diagonal: H is exactly symmetric
            for start, end in self.panels:
                diagonal = self.hessian[start:end, start:end]
                diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
                self.hessian[end:, start:end].copy_(self.hessian[start:end, end:].T)
            self.mirrored = True
        return self.hessian


class ColumnNormAccumulator:
    """‖X_j‖₂ per input feature: the root of the running mean of x_j² over the tokens seen so far."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.mean_square = torch.zeros(features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, inputs: Tensor, token_mask: Tensor | None = None) -> None:
        rows = _valid_rows(inputs, token_mask).to(self.mean_square.dtype)
        count = rows.shape[0]
        if count == 0:
            return
        total = self.tokens + count
        self.mean_square.mul_(self.tokens / total).add_(rows.pow(2).sum(0), alpha=1.0 / total)
        self.tokens = total

    def merge(self, sum_across: Callable[[Tensor], Tensor]) -> None:
        """Combine with the same accumulator of the other processes of a run (`sum_across` sums a tensor over them in
        place): the running mean over all their tokens."""
        self.tokens = merge_running_mean(self.mean_square, self.tokens, sum_across)

    def result(self) -> Tensor:
        return self.mean_square.sqrt()


ACCUMULATORS = {HESSIAN: HessianAccumulator, COLUMN_NORMS: ColumnNormAccumulator}

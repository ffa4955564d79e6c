"""Magma (momentum-aligned gradient masking) and SkipUpdate: a wrapper that masks the updates of any torch optimizer.

Per block b (a tensor, a row, a column or an element of a parameter), at every step (the Magma paper, Algorithm 1):
s̃ = sigmoid(cos(μ_b, g_b) / τ), s_b ← 0.9 s_b + 0.1 s̃, m_b ~ Bernoulli(p), θ_b ← θ_b − s_b m_b Δ_b, where Δ is
the base optimizer's update and μ its first moment. The base optimizer's moments are updated every step,
masked or not. SkipUpdate uses s_b = 1/p and no alignment. Pruned weights can be pinned at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MODES = ("magma", "skipupdate", "none")
GRANULARITIES = ("tensor", "row", "column", "element")
DEFAULT_P = 0.5  # survival probability of a block's update (the Magma paper)
DEFAULT_TAU = 2.0  # temperature of the momentum alignment
MOMENT_KEYS = ("exp_avg", "momentum_buffer")  # where Adam/AdamW/NAdam and SGD/RMSprop keep the first moment


def block_shape(parameter: Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of the per-block scores of a parameter, broadcastable against it."""
    if granularity == "element":
        return tuple(parameter.shape)
    if granularity == "row" and parameter.ndim >= 2:
        return (parameter.shape[0],) + (1,) * (parameter.ndim - 1)
    if granularity == "column" and parameter.ndim >= 2:
        return (1, parameter.shape[1]) + (1,) * (parameter.ndim - 2)
    return (1,) * parameter.ndim


def block_cosine(first: Tensor, second: Tensor, shape: tuple[int, ...], eps: float = 1e-12) -> Tensor:
    """cos(first_b, second_b) for every block b of the given broadcast shape."""
    reduce = tuple(dim for dim in range(first.ndim) if shape[dim] == 1)
    if not reduce:
        return torch.sign(first * second)  # one-element blocks: the cosine is the sign of the product
    dot = (first * second).sum(dim=reduce, keepdim=True)
    norms = first.norm(dim=reduce, keepdim=True) * second.norm(dim=reduce, keepdim=True)
    return dot / (norms + eps)


class Magma:
    """Wrap `base` (any torch optimizer) so that its updates are masked block by block.

    `mode`: 'magma' (alignment-scaled), 'skipupdate' (scaled by 1/p) or 'none' (the base optimizer as is).
    `keep_masks`: parameter -> bool tensor of weights that may be nonzero; the others stay exactly zero.
    `fixed_score`: use this s instead of the momentum alignment (1.0 with p = 1 reproduces the base step).
    LR schedulers attach to the base optimizer. With whole-tensor blocks under Adam/AdamW the scale is applied as a
    factor on the learning rate of that parameter's step (exact, no copy); otherwise one parameter tensor at a time is
    copied to rescale its update.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        mode: str = "magma",
        p: float = DEFAULT_P,
        tau: float = DEFAULT_TAU,
        smoothing: float = 0.9,
        granularity: str = "tensor",
        beta: float = 0.9,
        keep_masks: dict[Tensor, Tensor] | None = None,
        fixed_score: float | None = None,
        seed: int = 0,
        debug: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.base = base
        self.mode, self.p, self.tau, self.smoothing, self.granularity, self.beta = mode, p, tau, smoothing, granularity, beta
        self.fixed_score = fixed_score
        self.debug = debug
        self.parameters = [parameter for group in base.param_groups for parameter in group["params"]]
        position = {id(parameter): index for index, parameter in enumerate(self.parameters)}
        self.group_of = [group for group in base.param_groups for _ in group["params"]]
        self.keep_masks = {position[id(parameter)]: mask.to(parameter.device, torch.bool) for parameter, mask in (keep_masks or {}).items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.scores: dict[int, Tensor] = {}  # smoothed alignment s per block
        self.moments: dict[int, Tensor] = {}  # own first moment, for base optimizers that keep none
        self.steps = 0
        self.updated_fraction = 0.0  # share of the blocks updated at the last step

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def first_moment(self, index: int, parameter: Tensor) -> Tensor:
        """μ of a parameter: the base optimizer's, or our own EMA of the gradients."""
        state = self.base.state.get(parameter, {})
        for key in MOMENT_KEYS:
            if isinstance(state.get(key), Tensor):
                return state[key]
        return self.moments[index]

    def _scale(self, index: int, parameter: Tensor, gradient: Tensor, cosine: Tensor | None = None) -> Tensor:
        """s · m for every block of a parameter. `cosine`: cos(μ_t, g_t) per block when the caller knows it;
        otherwise it is read from the moment after the base step updated it."""
        shape = block_shape(parameter, self.granularity)
        survive = (torch.rand(shape, generator=self.generator) < self.p).to(parameter.device, parameter.dtype)
        if self.mode == "skipupdate":
            return survive / self.p
        if self.fixed_score is not None:
            return survive * self.fixed_score
        if cosine is None:
            cosine = block_cosine(self.first_moment(index, parameter), gradient, shape)
        alignment = torch.sigmoid(cosine / self.tau)
        previous = self.scores.get(index)
        self.scores[index] = alignment if previous is None else self.smoothing * previous + (1 - self.smoothing) * alignment
        return survive * self.scores[index]

    def _scales_by_learning_rate(self, group: dict) -> bool:
        """Whether a whole-tensor scale can be applied as a learning-rate factor: Δ is linear in lr for Adam and
        AdamW (Adam only without weight decay, which would enter its moments), so stepping with lr · s · m gives
        s · m · Δ exactly, with no copy of the parameter."""
        if self.granularity != "tensor" or isinstance(group["lr"], Tensor) or group.get("maximize", False):
            return False
        return isinstance(self.base, torch.optim.AdamW) or (type(self.base) is torch.optim.Adam and group.get("weight_decay", 0) == 0)

    def _upcoming_cosine(self, parameter: Tensor, gradient: Tensor, group: dict) -> Tensor:
        """cos(μ_t, g_t) for Adam's moment after this step, μ_t = β₁ μ_{t−1} + (1 − β₁) g_t, from three reductions."""
        beta = group["betas"][0]
        moment = self.base.state.get(parameter, {}).get("exp_avg")
        if not isinstance(moment, Tensor):  # first step: μ_1 = (1 − β₁) g_1
            return torch.ones((1,) * parameter.ndim, device=parameter.device, dtype=parameter.dtype)
        flat_moment, flat_gradient = moment.reshape(-1), gradient.reshape(-1)
        gradient_norm2 = torch.dot(flat_gradient, flat_gradient)
        dot = torch.dot(flat_moment, flat_gradient)
        moment_norm2 = torch.dot(flat_moment, flat_moment)
        upcoming_dot = beta * dot + (1 - beta) * gradient_norm2
        upcoming_norm2 = beta**2 * moment_norm2 + 2 * beta * (1 - beta) * dot + (1 - beta) ** 2 * gradient_norm2
        cosine = upcoming_dot / (upcoming_norm2.clamp_min(0).sqrt() * gradient_norm2.sqrt() + 1e-12)
        return cosine.reshape((1,) * parameter.ndim)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, mask in self.keep_masks.items():
            gradient = self.parameters[index].grad
            if gradient is not None:
                gradient.mul_(mask)
        if self.mode == "none":
            self.base.step()
        elif self._one_step_possible():
            self._scaled_learning_rate_step()
        else:
            self._masked_step()
        for index, mask in self.keep_masks.items():
            self.parameters[index].mul_(mask)
            if self.debug and torch.any(self.parameters[index][~mask] != 0):
                raise AssertionError(f"pruned weights of parameter {index} moved")
        self.steps += 1
        return loss

    def _one_step_possible(self) -> bool:
        """Every parameter sits alone in its group and takes the learning-rate path: then one base step does all."""
        return all(len(group["params"]) == 1 and self._scales_by_learning_rate(group) for group in self.base.param_groups)

    def _scaled_learning_rate_step(self) -> None:
        """Set each group's learning rate to lr · s · m of its parameter, step the base optimizer once, restore the rates."""
        rates = [group["lr"] for group in self.base.param_groups]
        updated = blocks = 0
        try:
            for index, parameter in enumerate(self.parameters):
                if parameter.grad is None:
                    continue
                group = self.group_of[index]
                cosine = None if self.mode != "magma" or self.fixed_score is not None else self._upcoming_cosine(parameter, parameter.grad, group)
                factor = float(self._scale(index, parameter, parameter.grad, cosine))
                group["lr"] = group["lr"] * factor
                updated += int(factor != 0)
                blocks += 1
            self.base.step()
        finally:
            for group, rate in zip(self.base.param_groups, rates, strict=True):
                group["lr"] = rate
        self.updated_fraction = updated / blocks if blocks else 0.0

    def _masked_step(self) -> None:
        """Step the base optimizer one parameter at a time, then rescale each parameter's update per block."""
        gradients = {index: parameter.grad for index, parameter in enumerate(self.parameters) if parameter.grad is not None}
        for parameter in self.parameters:
            parameter.grad = None
        updated = blocks = 0
        try:
            for index, gradient in gradients.items():
                parameter = self.parameters[index]
                if self.mode == "magma" and self.fixed_score is None and not any(
                    isinstance(self.base.state.get(parameter, {}).get(key), Tensor) for key in MOMENT_KEYS
                ):
                    moment = self.moments.setdefault(index, torch.zeros_like(parameter))
                    moment.mul_(self.beta).add_(gradient, alpha=1 - self.beta)
                group = self.group_of[index]
                if self._scales_by_learning_rate(group):
                    cosine = None if self.mode != "magma" or self.fixed_score is not None else self._upcoming_cosine(parameter, gradient, group)
                    factor = float(self._scale(index, parameter, gradient, cosine))
                    rate = group["lr"]
                    group["lr"] = rate * factor
                    parameter.grad = gradient
                    try:
                        self.base.step()
                    finally:
                        group["lr"] = rate
                        parameter.grad = None
                    updated += int(factor != 0)
                    blocks += 1
                    continue
                before = parameter.detach().clone()
                parameter.grad = gradient
                self.base.step()
                parameter.grad = None
                scale = self._scale(index, parameter, gradient)
                # θ ← θ_before − s m Δ, with Δ = θ_before − θ_after
                parameter.copy_(before - scale * (before - parameter))
                updated += int((scale != 0).sum().item())
                blocks += scale.numel()
        finally:
            for index, gradient in gradients.items():
                self.parameters[index].grad = gradient
        self.updated_fraction = updated / blocks if blocks else 0.0

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "scores": {index: score.clone() for index, score in self.scores.items()},
            "moments": {index: moment.clone() for index, moment in self.moments.items()},
            "generator": self.generator.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.scores = {int(index): score.clone() for index, score in state["scores"].items()}
        self.moments = {int(index): moment.clone() for index, moment in state["moments"].items()}
        self.generator.set_state(state["generator"])
        self.steps = state["steps"]

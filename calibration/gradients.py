"""Per-sample gradients of a model's task loss, for the methods whose statistic is built from them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def per_sample_gradients(model: nn.Module, parameters: dict[str, Tensor], samples: Iterable[dict], device: torch.device) -> Iterator[dict[str, Tensor]]:
    """For each sample (model inputs with their `labels`, a batch of one), the gradient of `model(**sample).loss` with
    respect to each of `parameters`, by name. Meanwhile only those parameters require gradients and the model is in
    evaluation mode (no dropout: the gradient of the model as it will be used); both are restored afterwards. A
    gradient is valid until the next one is produced."""
    wanted = {id(parameter) for parameter in parameters.values()}
    before = {parameter: parameter.requires_grad for parameter in model.parameters()}
    training = model.training
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in wanted)
        model.eval()
        for sample in samples:
            for parameter in parameters.values():
                parameter.grad = None
            with torch.enable_grad():
                loss = model(**{key: value.to(device) for key, value in sample.items()}).loss
                if not torch.isfinite(loss):
                    raise ValueError(f"the task loss of a calibration sample is {loss.item()}")
                loss.backward()
            yield {name: parameter.grad for name, parameter in parameters.items()}
    finally:
        for parameter, flag in before.items():
            parameter.requires_grad_(flag)
            parameter.grad = None
        model.train(training)

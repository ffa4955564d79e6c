"""Pruning methods as pure functions on tensors: `(weight, statistics, target, options) -> LayerResult`."""

from methods import magnitude, obs, owl, sparsegpt, wanda
from methods.base import LayerResult, PruningError, Target
from methods.registry import METHODS, Method, get_method

__all__ = ["magnitude", "obs", "owl", "sparsegpt", "wanda", "LayerResult", "METHODS", "Method", "PruningError", "Target", "get_method"]

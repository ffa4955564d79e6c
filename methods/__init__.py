"""The mathematics of pruning, as functions on tensors: no transformers, no files, no command-line flags.

Four kinds of algorithm live here, each used by one stage of the pipeline (prune/stages):

- One-shot layer methods (`magnitude`, `wanda`, `ria`, `sparsegpt`, `alps`, `obs`): pure functions
  `prune(weight, statistic, target, **options) -> LayerResult`, each described by a `Method` record
  (methods/base.py) that names the calibration statistic it needs (`HESSIAN`, `COLUMN_NORMS` or none), its
  options with their defaults and their check, its work estimate and how its details read in a report.
  `registry.METHODS` maps the command's method names to these records; `Method.run_together` is how the
  pipeline runs one (a layer, or the layers fed one input), and `gptq.quantized(method, grid)` the same method
  rounding what it keeps. `hessian` holds what the
  second-order methods share (dead inputs, damping, the damped inverse).
- Task-loss second-order pruning (`obert`): the block-diagonal inverse empirical Fisher built from per-sample
  gradients by Woodbury steps, the OBS saliency and update on it (the pruning deep-dive §7); pure functions, fed gradients.
- Movement pruning (`movement`): straight-through masks from trained scores (hard top-k, soft threshold), the
  soft variant's penalty and the cubic sparsity schedule; the task-training loop is the caller's.
- Allocation (`owl`): per-block sparsities from outlier ratios of the dense model's Wanda scores; pure
  functions.
- Mask refinement (`maskpro`): the MaskPro policy over N:M masks. Its sampling and gradient formulas are
  pure functions; `MaskPro` is the small state that carries the logits and the loss tracker across steps
  (the refine stage measures the losses, this module only turns them into updates).
- Recovery optimizer rule (`magma`): `Magma`, a wrapper that masks the updates of any torch optimizer
  block by block (Magma, SkipUpdate). It is a torch optimizer, with state, because that is what a training
  loop takes; the recover stage owns the training.

`base` holds the types all of them share: `Target`, `LayerResult`, `PruningError`, `Method`.
"""

from methods import magnitude, movement, obert, obs, owl, sparsegpt, wanda
from methods.base import COLUMN_NORMS, HESSIAN, LayerResult, Method, MethodOption, PruningError, Target
from methods.registry import DEFAULT_METHOD, METHODS, get_method

__all__ = ["magnitude", "movement", "obert", "obs", "owl", "sparsegpt", "wanda", "COLUMN_NORMS", "DEFAULT_METHOD", "HESSIAN", "LayerResult", "METHODS", "Method",
           "MethodOption", "PruningError", "Target", "get_method"]

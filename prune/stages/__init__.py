"""The stages of the pipeline, in the order they run: calibrate -> allocate (OWL) -> one-shot (or its gradient form)
-> refine (MaskPro) -> recover (Magma / AdamW / SkipUpdate), with the evaluators measuring the model before and after
each stage that changes it. Each module holds one stage: its settings (which are also the command's options), their
single check, the stage's work and its report section. prune/pipeline.py runs them in sequence."""

from __future__ import annotations

from prune.run import Stage
from prune.stages.allocate import Allocate
from prune.stages.calibrate import Calibrate
from prune.stages.gradients import GradientPrune
from prune.stages.oneshot import OneShot
from prune.stages.recover import Recover
from prune.stages.refine import Refine

# The stages, in the order they run (the one-shot stage, or its gradient form, by the method's statistic). Adding a
# stage: its module here and one line below; a caller may also run its own (`prune_model(..., stages=(*STAGES, Mine))`).
STAGES: tuple[type[Stage], ...] = (Calibrate, Allocate, OneShot, GradientPrune, Refine, Recover)

"""One-shot pruning of transformer models: the pipeline, the CLI, and model loading.

>>> from prune import prune_model
>>> model, report = prune_model("smollm2-135m", method="sparsegpt", sparsity=0.5, calibration="wiki-sample")
"""

from prune.models import LoadedModel, load_model
from prune.pipeline import Pipeline, PruneSettings, prune_model, run_pipeline
from prune.report import LayerReport, Report
from prune.stages.recover import RecoverSettings
from prune.stages.refine import RefineSettings

__all__ = ["LayerReport", "LoadedModel", "Pipeline", "PruneSettings", "RecoverSettings", "RefineSettings", "Report", "load_model", "prune_model",
           "run_pipeline"]

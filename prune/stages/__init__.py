"""The stages of the pipeline, in the order they run: calibrate -> allocate (OWL) -> one-shot -> refine (MaskPro) ->
recover (Magma / AdamW / SkipUpdate), with the evaluators measuring the model before and after each stage that
changes it. Each module holds one stage: its settings (which are also the command's options), their single check,
the stage's work and its report section. prune/pipeline.py puts them in sequence."""

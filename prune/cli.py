"""The `prune` command. Its options are generated from the settings fields of the pipeline's stages (and the
options the methods declare), so that each default, range and help text is written once, next to its field."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from transformers.utils import logging as transformers_logging

from calibration.conll import NerDataError
from calibration.corpora import CorpusError
from methods import PruningError
from methods.registry import method_options
from prune.devices import return_freed_memory
from prune.models import EMBEDDED_MODELS, SMOLLM2, ModelError
from prune.output import OutputError
from prune.pipeline import STAGE_SETTINGS, Pipeline, PruneSettings
from prune.settings import has_cli_default, key_of, option_fields
from prune.stages.oneshot import method_flag
from prune.weights import StreamingError

USER_ERRORS = (PruningError, CorpusError, ModelError, OutputError, NerDataError)
MODEL_HELP = "; ".join(f"{name}: {what}" for name, what in EMBEDDED_MODELS.items())
# the command's own options, which are not settings of a stage
COMMAND_OPTIONS = {"model", "no_eval", "cache_dir", "quiet"}


def settings_option(field: dataclasses.Field) -> click.Option:
    """The command-line option of a settings field: its flag, type, choices, default and help."""
    meta = field.metadata
    default = meta["cli_default"] if has_cli_default(field) else None if meta["switch"] else field.default
    if isinstance(field.default, bool) and meta["type"] is None:
        return click.Option([meta["flag"], key_of(field)], is_flag=True, default=default, help=meta["help"])
    kind = click.Choice(meta["choices"]) if meta["choices"] is not None else (meta["type"] or type(field.default))
    return click.Option([meta["flag"], key_of(field)], type=kind, default=default, show_default=default is not None, metavar=meta["metavar"],
                        help=meta["help"])


def method_option_flags() -> list[click.Option]:
    """The options the methods declare (one flag for an option that several methods share)."""
    return [
        click.Option([method_flag(name), name], type=type(default), default=None,
                     help=f"{help_text[0].upper()}{help_text[1:]} ({', '.join(users)}; default {default:g}).")
        for name, (default, help_text, users) in method_options().items()
    ]


def command_parameters() -> list[click.Parameter]:
    """The model, then the target and method, then each stage's options in the order the stages run, then the output."""
    extras = {"oneshot": method_option_flags(), "calibrate": [settings_option(field) for field in option_fields(PruneSettings)],
              "evaluate": [click.Option(["--no-eval"], is_flag=True, help="Skip the evaluation (perplexity, or entity F1 with conll:DIR).")]}
    sections = []
    for stage in sorted(STAGE_SETTINGS, key=lambda stage: stage != "oneshot"):
        sections += [*map(settings_option, option_fields(STAGE_SETTINGS[stage])), *extras.get(stage, [])]
    return [
        click.Option(["--model"], default=SMOLLM2, show_default=True, help=f"An embedded model, a local folder, or a hub name. Embedded: {MODEL_HELP}."),
        *sections,
        click.Option(["--cache-dir"], type=click.Path(path_type=Path), default=None,
                     help="Where converted embedded models are kept (default ~/.cache/obs-prune)."),
        click.Option(["--quiet"], is_flag=True, help="No progress bars."),
    ]


def settings_from(options: dict[str, Any], given: set[str]) -> PruneSettings:
    """PruneSettings from the options the user gave (the settings' own defaults fill the rest)."""
    chosen = {key: value for key, value in options.items() if key in given and key not in COMMAND_OPTIONS}
    evaluation_field = next(field for field in option_fields(STAGE_SETTINGS["evaluate"]) if has_cli_default(field))
    if options["no_eval"]:
        if key_of(evaluation_field) in given:
            raise PruningError(f"{evaluation_field.metadata['flag']} and --no-eval contradict each other")
        chosen[key_of(evaluation_field)] = None
    elif key_of(evaluation_field) not in given:
        chosen[key_of(evaluation_field)] = evaluation_field.metadata["cli_default"]
    return PruneSettings(**chosen, progress=not options["quiet"])


def run_command(**options: Any) -> None:
    """Prune a transformer one-shot, layer by layer, and report what it cost.

    Every Linear/Conv1D inside the transformer blocks is pruned; embeddings, the LM head and classifier heads stay dense.
    """
    context = click.get_current_context()
    given = {name for name in options if context.get_parameter_source(name) is not ParameterSource.DEFAULT}
    if options["quiet"]:
        transformers_logging.disable_progress_bar()
    pipeline = Pipeline(settings_from(options, given))  # every setting is checked before the model is loaded
    loaded, seconds = pipeline.load(options["model"], cache_dir=options["cache_dir"])
    report = pipeline.run(loaded, load_seconds=seconds)
    click.echo(report.table())
    if pipeline.settings.output is not None:
        click.echo(f"saved the pruned model, tokenizer and report.json to {pipeline.settings.output}")


command = click.Command(
    "prune", params=command_parameters(), callback=run_command, help=run_command.__doc__,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit code 2."""
    return_freed_memory()
    try:
        command.main(args=argv, prog_name="prune", standalone_mode=False)
    except click.ClickException as error:
        click.echo(f"prune: error: {error.format_message()}", err=True)
        sys.exit(2)
    except USER_ERRORS as error:
        click.echo(f"prune: error: {error}", err=True)
        sys.exit(2)
    except StreamingError as error:  # a full disk: not bad input, but one line all the same
        click.echo(f"prune: error: {error.strerror}", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("prune: aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

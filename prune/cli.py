"""The `prune` command. Its options are generated from the settings fields of the pipeline's stages (and the
options the methods declare), so that each default, range and help text is written once, next to its field."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click
import torch.distributed
import yaml
from click.core import ParameterSource
from transformers.utils import logging as transformers_logging

from calibration.conll import NerDataError
from calibration.corpora import CorpusError
from methods import PruningError
from methods.registry import method_options
from prune.devices import resolve_device, return_freed_memory
from prune.distributed import Ranks, RanksLost, join_process_group
from prune.models import EMBEDDED_MODELS, SMOLLM2, ModelError
from prune.output import OutputError
from prune.pipeline import STAGE_SETTINGS, Pipeline, PruneSettings
from prune.settings import has_cli_default, key_of, negated, option_fields, renamed_hint
from prune.stages.oneshot_settings import method_flag
from prune.weights import StreamingError

USER_ERRORS = (PruningError, CorpusError, ModelError, OutputError, NerDataError)
MODEL_HELP = "; ".join(f"{name}: {what}" for name, what in EMBEDDED_MODELS.items())
# the command's own options, which are not settings of a stage
COMMAND_OPTIONS = {"model", "no_eval", "cache_dir", "quiet", "verbose", "rank_timeout"}


class RenamedChoice(click.Choice):
    """A choice whose former names are refused with what they are called now."""

    def __init__(self, choices: tuple, renamed: dict[str, str]) -> None:
        super().__init__(choices)
        self.renamed = renamed

    def convert(self, value, parameter, context):
        if value in self.renamed:
            self.fail(renamed_hint(value, self.renamed), parameter, context)
        return super().convert(value, parameter, context)


def settings_option(field: dataclasses.Field) -> click.Option:
    """The command-line option of a settings field: its flag, type, choices, default and help."""
    meta = field.metadata
    default = meta["cli_default"] if has_cli_default(field) else None if meta["switch"] else field.default
    if isinstance(field.default, bool) and meta["type"] is None:  # a switch; one that is on by default also has its --no- form
        names = f"{meta['flag']}/{negated(meta['flag'])}" if field.default else meta["flag"]
        return click.Option([names, key_of(field)], is_flag=True, default=default, help=meta["help"])
    if meta["multiple"]:
        return click.Option([meta["flag"], key_of(field)], type=meta["type"] or str, multiple=True, metavar=meta["metavar"], help=meta["help"])
    kind = RenamedChoice(meta["choices"], meta["renamed"]) if meta["choices"] is not None else (meta["type"] or type(field.default))
    return click.Option([meta["flag"], key_of(field)], type=kind, default=default, show_default=default is not None, metavar=meta["metavar"],
                        help=meta["help"])


def method_option_flags() -> list[click.Option]:
    """The options the methods declare (one flag for an option that several methods share)."""
    flags = []
    for name, (default, help_text, users) in method_options().items():
        shown = ("on" if default else "off") if isinstance(default, bool) else f"{default:g}"
        text = f"{help_text[0].upper()}{help_text[1:]} ({', '.join(users)}; default {shown})."
        if isinstance(default, bool):  # a switch: the flag alone turns it on
            flags.append(click.Option([method_flag(name), name], is_flag=True, default=None, help=text))
        else:
            flags.append(click.Option([method_flag(name), name], type=type(default), default=None, help=text))
    return flags


def command_parameters() -> list[click.Parameter]:
    """The model, then the target and method, then each stage's options in the order the stages run, then the output."""
    extras = {"oneshot": method_option_flags(), "calibrate": [settings_option(field) for field in option_fields(PruneSettings)],
              "evaluate": [click.Option(["--no-eval"], is_flag=True, help="Skip the evaluation (perplexity, or entity F1 with conll:DIR).")]}
    sections = []
    for stage in sorted(STAGE_SETTINGS, key=lambda stage: stage != "oneshot"):
        sections += [*map(settings_option, option_fields(STAGE_SETTINGS[stage])), *extras.get(stage, [])]
    return [
        click.Option(["--config"], type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True, expose_value=False,
                     callback=apply_config, help="A recipe (YAML or JSON: option names to values; a map from regex to sparsity for "
                     "sparsity_override), or a run's report.json to run it again. Options given on the command line override it."),
        click.Option(["--model"], default=SMOLLM2, show_default=True, help=f"An embedded model, a local folder, or a hub name. Embedded: {MODEL_HELP}."),
        *sections,
        click.Option(["--cache-dir"], type=click.Path(path_type=Path), default=None,
                     help="Where converted embedded models are kept (default ~/.cache/obs-prune)."),
        click.Option(["--quiet"], is_flag=True, help="No progress bars."),
        click.Option(["--verbose"], is_flag=True, help="Also print the per-layer table (always in report.json) before the summary."),
        click.Option(["--rank-timeout"], type=click.FloatRange(min=1), default=600.0, show_default=True,
                     help="Launched by torchrun: seconds a rank waits for the others before the run stops with an error (a rank that died)."),
    ]


def evaluation_field() -> dataclasses.Field:
    """The evaluation data's field: the one option whose command default (evaluate) differs from the API's (None)."""
    return next(field for field in option_fields(STAGE_SETTINGS["evaluate"]) if has_cli_default(field))


def read_config(path: Path) -> dict[str, Any]:
    """The options of a recipe (a YAML or JSON mapping from option names to values), or of a run's report.json (its
    resolved settings and its model), by option name."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise click.ClickException(f"--config {path}: cannot be read: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"--config {path}: expected a mapping of option names to values")
    if isinstance(data.get("settings"), dict) and isinstance(data.get("model"), dict):  # a report.json
        data = {**data["settings"], "model": data["model"].get("name")}
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def apply_config(context: click.Context, parameter: click.Parameter, path: Path | None) -> None:
    """--config: its values become the defaults of the other options (click's default map), so that the flags given
    on the command line override them. Each value is checked against its option here, before anything runs."""
    if path is None:
        return
    options = {option.name: option for option in context.command.params if option.name != parameter.name}
    defaults: dict[str, Any] = {}
    for key, value in read_config(path).items():
        if key not in options:
            raise click.ClickException(f"--config {path}: unknown key {key!r} (keys are the command's options, e.g. sparsity, eval_windows)")
        if value is None:  # unset; for the evaluation data, unset means no evaluation
            if key == key_of(evaluation_field()):
                defaults["no_eval"] = True
            continue
        option = options[key]
        if option.multiple and isinstance(value, dict):  # a map from regex to sparsity
            value = [f"{pattern}={sparsity}" for pattern, sparsity in value.items()]
        elif option.multiple and not isinstance(value, list):
            value = [value]
        problem = recipe_type_problem(option, value)
        if problem is not None:
            raise click.ClickException(f"--config {path}: key {key!r}: {problem}")
        try:
            defaults[key] = option.type_cast_value(context, value)
        except click.BadParameter as error:
            raise click.ClickException(f"--config {path}: key {key!r}: {error.message}") from None
    context.default_map = {**(context.default_map or {}), **defaults}


def recipe_type_problem(option: click.Option, value: Any) -> str | None:
    """What is wrong with the type of a recipe value for `option` (a list for a single value, a number for a name,
    a string for a number, ...), or None. YAML and JSON carry types; a value of the wrong one is refused, not coerced."""
    name = type_name(option.type)
    if not option.multiple and isinstance(value, (list, dict)):
        return f"expected one {name}, got {value!r}"
    for item in value if option.multiple else [value]:
        if not fits_type(option.type, item):
            quote = " (quote it in YAML: '...')" if name == "string" and not isinstance(item, (list, dict)) else ""
            return f"expected a {name}{quote}, got {item!r} ({type(item).__name__})"
    return None


def type_name(kind: click.ParamType) -> str:
    """How a recipe error names an option's type."""
    if isinstance(kind, click.types.BoolParamType):
        return "boolean (true or false)"
    if isinstance(kind, click.types.IntParamType):
        return "whole number"
    if isinstance(kind, click.types.FloatParamType):
        return "number"
    return "string"


def fits_type(kind: click.ParamType, item: Any) -> bool:
    """Whether a recipe value has the type of its option: a boolean for a flag, an integer for a whole number (a
    boolean is neither), an integer or float for a number, a string for the rest (names, choices, paths, patterns)."""
    if isinstance(kind, click.types.BoolParamType):
        return isinstance(item, bool)
    if isinstance(item, bool):
        return False
    if isinstance(kind, click.types.IntParamType):
        return isinstance(item, int)
    if isinstance(kind, click.types.FloatParamType):
        return isinstance(item, (int, float))
    return isinstance(item, str)


def settings_from(options: dict[str, Any], given: set[str]) -> PruneSettings:
    """PruneSettings from the options the user gave (the settings' own defaults fill the rest)."""
    chosen = {key: value for key, value in options.items() if key in given and key not in COMMAND_OPTIONS}
    evaluation = evaluation_field()
    if options["no_eval"]:
        if key_of(evaluation) in given:
            raise PruningError(f"{evaluation.metadata['flag']} and --no-eval contradict each other")
        chosen[key_of(evaluation)] = None
    elif key_of(evaluation) not in given:
        chosen[key_of(evaluation)] = evaluation.metadata["cli_default"]
    return PruneSettings(**chosen, progress=not options["quiet"] and Ranks.current().writer)


def run_command(**options: Any) -> None:
    """Prune a transformer one-shot, layer by layer, and report what it cost.

    Every Linear/Conv1D inside the transformer blocks is pruned; embeddings, the LM head and classifier heads stay dense.
    """
    context = click.get_current_context()
    given = {name for name in options if context.get_parameter_source(name) is not ParameterSource.DEFAULT}
    if options["quiet"]:
        transformers_logging.disable_progress_bar()
    ranks = join_process_group(options["rank_timeout"], use_cuda=resolve_device(options["device"]).type == "cuda")  # under torchrun
    pipeline = Pipeline(settings_from(options, given))  # every setting is checked before the model is loaded
    loaded, seconds = pipeline.load(options["model"], cache_dir=options["cache_dir"])
    report = pipeline.run(loaded, load_seconds=seconds)
    if ranks.writer:  # the summary comes last, where the user looks
        if pipeline.settings.output is not None:
            click.echo(f"saved the pruned model, tokenizer and report.json to {pipeline.settings.output}")
        click.echo(report.table() if options["verbose"] else report.summary())
    if ranks.several:
        torch.distributed.destroy_process_group()


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
    except RanksLost as error:  # another rank died or stopped answering within --rank-timeout
        click.echo(f"prune: error: the ranks lost each other ({error}); --output was not written (a streamed run can --resume)", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("prune: aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Settings fields that are also command-line options: each default, range and choice is written once, on the field.

A stage's settings are a dataclass whose fields are made with `option(...)`: the field's default is the default
of the Python API and of the command, its flag names it on the command line and in every error message, and its
`minimum` / `choices` are checked by `check_fields`. The command (prune/cli.py) is generated from these fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from methods import PruningError, Target

_NO_CLI_DEFAULT = object()


def option(default: Any, flag: str, help: str, *, type: type | None = None, choices: tuple | None = None, minimum: float | None = None,
           positive: bool = False, metavar: str | None = None, cli_default: Any = _NO_CLI_DEFAULT, switch: bool = False,
           multiple: bool = False, renamed: dict[str, str] | None = None) -> Any:
    """A settings field that is the command-line option `flag`.

    `minimum`: values below it are refused; `positive`: values <= 0 are refused; `choices`: the allowed values.
    `cli_default`: where the command's default differs from the API's (e.g. the command evaluates by default).
    `switch`: the field turns its (optional) stage on: without it the stage does not run, and the stage's other
    options may not be given. `multiple`: the option may be given several times; the field holds a tuple of values.
    `renamed`: former names of choices and what they are called now (refused with that hint).
    """
    metadata = {"flag": flag, "help": help, "type": type, "choices": choices, "minimum": minimum, "positive": positive,
                "metavar": metavar, "cli_default": cli_default, "switch": switch, "multiple": multiple, "renamed": renamed or {}}
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(settings_class: type) -> list[dataclasses.Field]:
    """The fields of a settings class that are command-line options, in definition order."""
    return [field for field in dataclasses.fields(settings_class) if "flag" in field.metadata]


def key_of(field: dataclasses.Field) -> str:
    """The option's name as a keyword of `PruneSettings(...)` and `prune_model(...)`: its flag with underscores."""
    return field.metadata["flag"].lstrip("-").replace("-", "_")


def flag_of(settings: Any, name: str) -> str:
    """The command-line flag of a field of a settings class (or object)."""
    return next(field.metadata["flag"] for field in dataclasses.fields(settings) if field.name == name)


def switch_field(settings_class: type) -> dataclasses.Field | None:
    """The field that turns an optional stage on, if the stage is optional."""
    return next((field for field in option_fields(settings_class) if field.metadata["switch"]), None)


def negated(flag: str) -> str:
    """The flag that turns off a switch that is on by default: --act-order -> --no-act-order."""
    return flag[:2] + "no-" + flag[2:]


def has_cli_default(field: dataclasses.Field) -> bool:
    return field.metadata["cli_default"] is not _NO_CLI_DEFAULT


def renamed_hint(value: str, renamed: dict[str, str]) -> str:
    return f"{value!r} is now called {renamed[value]!r}"


def check_fields(settings: Any) -> None:
    """Refuse any option value outside its declared choices or range (None means 'not set' and passes)."""
    for field in option_fields(type(settings)):
        value, meta = getattr(settings, field.name), field.metadata
        if value is None or meta["multiple"]:
            continue
        if value in meta["renamed"]:
            raise PruningError(f"{meta['flag']} {renamed_hint(value, meta['renamed'])}")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise PruningError(f"{meta['flag']} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if meta["minimum"] is not None and not value >= meta["minimum"]:
            raise PruningError(f"{meta['flag']} must be at least {meta['minimum']:g}, got {value:g}")
        if meta["positive"] and not value > 0:
            raise PruningError(f"{meta['flag']} must be positive, got {value:g}")


class StageSettings:
    """What every stage's settings show the pipeline: a check of their values against the run's target and the run's
    other settings (`run`: the PruneSettings, None when a stage's function is called on its own), before any model is
    loaded; and why, if at all, they need the whole model in memory at once (which rules out streaming)."""

    def check(self, target: Target | None = None, run: Any = None) -> None:
        check_fields(self)

    def whole_model_reason(self, run: Any) -> str | None:
        """The option that needs the whole model in memory, in the words of an error message; None when blocks stream."""
        return None


@contextlib.contextmanager
def about(*flags: str) -> Iterator[None]:
    """Name the options a value came from in any PruningError raised inside (low-level checks speak of values only)."""
    try:
        yield
    except PruningError as error:
        raise PruningError(f"{'/'.join(flags)}: {error}") from None

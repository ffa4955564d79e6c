"""The one-shot methods by the name the command takes."""

from __future__ import annotations

from methods import alps, magnitude, obert, obs, ria, sparsegpt, wanda
from methods.base import Method, PruningError

METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in (magnitude, wanda, ria, sparsegpt, alps, obs, obert)}
DEFAULT_METHOD = sparsegpt.METHOD.name


def get_method(name: str) -> Method:
    """The method called `name`, or PruningError naming the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise PruningError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def method_options() -> dict[str, tuple[bool | int | float, str, list[str]]]:
    """Every option any method takes: name -> (default, help, the methods taking it). An option shared by several
    methods has one default and one meaning."""
    options: dict[str, tuple[bool | int | float, str, list[str]]] = {}
    for method in METHODS.values():
        for option in method.options:
            default, help_text, users = options.setdefault(option.name, (option.default, option.help, []))
            if (default, help_text) != (option.default, option.help):
                raise AssertionError(f"option {option.name} means different things to different methods")
            users.append(method.name)
    return options

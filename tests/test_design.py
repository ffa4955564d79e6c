"""The shape of the code: imports flow one way, prune/ never names a one-shot method, every flag a message names
exists, and every setting is an option of the command with its default written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.core import ParameterSource
from click.testing import CliRunner

from methods import METHODS
from methods.registry import method_options
from prune.cli import command, settings_from
from prune.pipeline import STAGE_SETTINGS, PruneSettings, option_routes
from prune.settings import key_of, option_fields

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prune", "methods", "calibration", "eval")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def code_strings(path: Path) -> list[str]:
    """Every string literal of a module but its docstrings (f-strings contribute their literal parts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = docstrings(tree)
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.fixture(scope="module")
def help_text() -> str:
    result = CliRunner().invoke(command, ["--help"], terminal_width=1000)
    assert result.exit_code == 0
    return result.output


def test_imports_flow_one_way() -> None:
    """prune -> {methods, calibration, eval}; eval -> calibration; calibration uses only methods.base and the
    statistics' accumulators (methods.statistics), eval only methods.base."""
    allowed = {
        "methods": {"methods"},
        "calibration": {"calibration", "methods.base", "methods.statistics"},
        "eval": {"eval", "calibration", "methods.base"},
        "prune": set(PACKAGES),
    }
    for package, may_use in allowed.items():
        for path in modules(package):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in PACKAGES:
                    assert top == package or name in may_use or top in may_use, f"{path.relative_to(ROOT)} imports {name}"


def test_no_test_module_imports_another() -> None:
    """Helpers shared by test modules live in tests/conftest.py."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        others = {name for name in imported_modules(path) if name.startswith("tests.test_") or name.startswith("test_")}
        assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}"


def test_a_method_reads_like_its_paper_in_functions_of_at_most_60_lines() -> None:
    for path in modules("methods"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.relative_to(ROOT)}: {node.name} is {node.end_lineno - node.lineno + 1} lines"


def test_prune_calls_a_method_through_one_entry_point() -> None:
    """Method.run_together (one layer, or several fed one input) is how prune/ runs any method: never its prune,
    prune_together or run directly."""
    for path in modules("prune"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"prune", "prune_together", "run"}:
                assert not ast.unparse(node.func.value).endswith("method"), f"{path.relative_to(ROOT)}:{node.lineno} calls {ast.unparse(node.func)}"


def test_prune_never_names_a_one_shot_method() -> None:
    method_modules = {f"methods.{name}" for name in METHODS}
    for path in modules("prune"):
        assert not imported_modules(path) & method_modules, f"{path.relative_to(ROOT)} imports a method module"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "methods":
                assert not {alias.name for alias in node.names} & set(METHODS), f"{path.relative_to(ROOT)} imports a method"
        for text in code_strings(path):
            assert text not in METHODS, f"{path.relative_to(ROOT)} names the method {text!r}"


def test_every_flag_a_message_names_exists(help_text) -> None:
    offered = set(FLAG.findall(help_text))
    for path in modules("prune"):
        for text in code_strings(path):
            for flag in FLAG.findall(text.split("pip install")[0]):  # an install hint names pip's flags
                assert flag in offered, f"{path.relative_to(ROOT)} names {flag}, which `prune --help` does not offer"
    for package in ("methods", "calibration", "eval"):  # low-level code speaks of values, not of the command's flags
        for path in modules(package):
            for text in code_strings(path):
                if "pip install" not in text:
                    assert not FLAG.findall(text), f"{path.relative_to(ROOT)} names a flag: {text!r}"


def test_every_setting_is_an_option_of_the_command(help_text) -> None:
    offered = set(FLAG.findall(help_text))
    for settings_class in (PruneSettings, *STAGE_SETTINGS.values()):
        for field in option_fields(settings_class):
            assert field.metadata["flag"] in offered, field.metadata["flag"]
    for name in method_options():
        assert "--" + name.replace("_", "-") in offered
    keys = [key_of(field) for settings_class in STAGE_SETTINGS.values() for field in option_fields(settings_class)] + list(method_options())
    assert len(keys) == len(set(keys)) == len(option_routes())  # one flat name per option


def test_the_command_has_no_defaults_of_its_own() -> None:
    """With no flag given, the command runs the API's defaults (evaluating on wiki-sample, which the API does when asked)."""
    context = command.make_context("prune", [])
    assert all(context.get_parameter_source(name) is ParameterSource.DEFAULT for name in context.params)
    from_command = settings_from(context.params, given=set()).as_options()
    assert from_command == PruneSettings(eval_data="wiki-sample").as_options()
    assert from_command["method"] == "sparsegpt" and from_command["nsamples"] == 128 and from_command["refine"] is None


def test_flat_settings_reach_their_stage_and_refuse_what_cannot_apply() -> None:
    from methods import PruningError

    settings = PruneSettings(method="sparsegpt", pattern="2:4", nsamples=16, eval_windows=3, refine="maskpro", refine_steps=7, blocksize=32)
    assert (settings.oneshot.method, settings.calibrate.nsamples, settings.evaluate.windows) == ("sparsegpt", 16, 3)
    assert settings.refine.steps == 7 and settings.oneshot.method_options == {"blocksize": 32} and settings.recover is None
    for options, message in (
        ({"refine_steps": 7}, "--refine-steps applies only with --refine"),
        ({"recover_lr": 1e-3, "recover_p": 0.5}, "apply only with --recover"),
        ({"nsample": 8}, "unknown setting 'nsample'"),
    ):
        with pytest.raises(PruningError, match=message):
            PruneSettings(sparsity=0.5, **options)


def test_every_stage_shows_the_pipeline_one_face() -> None:
    """Every stage's settings are StageSettings: one check(target, run) and one whole_model_reason(run), which the
    pipeline loops over; pipeline.py calls no stage's check by name."""
    from prune.settings import StageSettings

    for key, settings_class in STAGE_SETTINGS.items():
        assert issubclass(settings_class, StageSettings), key
    tree = ast.parse((ROOT / "prune" / "pipeline.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"check", "whole_model_reason"}:
            assert ast.unparse(node.func.value) == "settings", f"pipeline.py:{node.lineno} calls {ast.unparse(node.func)}"


def test_the_report_and_the_output_name_no_stage() -> None:
    """Each stage writes its own report section (figures, summary lines, details, figure files): report.py and
    output.py loop over the sections, and pipeline.py reads no stage's section nor tests for a stage's class."""
    from prune.pipeline import report_sections
    from prune.stages import STAGES

    stage_names = {stage.__name__ for stage in STAGES} | {stage.key for stage in STAGES}
    stage_sections = {key for stage in STAGES for key in stage.sections} | {"perplexity", "entity_f1", "tasks"}
    assert stage_sections <= set(report_sections(STAGES))
    for name in ("report.py", "output.py"):
        path = ROOT / "prune" / name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        named = (used | set(code_strings(path))) & (stage_names | stage_sections)
        assert not named, f"prune/{name} names {sorted(named)}"
    tree = ast.parse((ROOT / "prune" / "pipeline.py").read_text(encoding="utf-8"))
    named_classes = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} & {stage.__name__ for stage in STAGES}
    assert not named_classes, f"pipeline.py names {sorted(named_classes)}: the stages are listed in prune/stages"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in stage_sections:
            assert not ast.unparse(node.value).endswith("report"), f"pipeline.py:{node.lineno} reads {ast.unparse(node)}"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance":
            assert not {arg.id for arg in ast.walk(node.args[1]) if isinstance(arg, ast.Name)} & stage_names, f"pipeline.py:{node.lineno}"


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_orchestration_reads_in_functions_of_at_most_60_lines() -> None:
    for package in ("prune", "calibration", "eval"):
        for path in modules(package):
            for name, length in function_lengths(path).items():
                assert length <= 60, f"{path.relative_to(ROOT)}: {name} is {length} lines"


def test_the_one_shot_stage_is_one_job() -> None:
    """The one-shot stage is its block loop: settings, plan, gradient pruning and rank ownership live elsewhere."""
    path = ROOT / "prune" / "stages" / "oneshot.py"
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 250
    assert max(function_lengths(path).values()) <= 40

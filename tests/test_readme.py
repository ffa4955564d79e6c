"""Every `prune` command of the README runs as written, with small calibration, evaluation and training sizes appended
(the last value of an option wins), so that the README cannot drift from the code. Placeholder paths (a model folder,
a text folder, a recipe, out/...) are replaced by real ones in a temporary folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow  # each command loads the real SmolLM2 or MiniLM

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND = ".venv/bin/prune"
SMALL_SIZES = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--blocks", "0", "--quiet"]
SMALL_EVALUATION = ["--eval-windows", "2", "--eval-seqlen", "32"]
SMALL_STAGES = {  # a stage's sizes, appended when the command turns the stage on
    "--refine": ["--refine-steps", "2", "--refine-batch", "1", "--refine-seqlen", "32", "--refine-windows", "4", "--refine-holdout", "2",
                 "--refine-log-every", "1"],
    "--recover": ["--recover-steps", "2", "--recover-batch", "1", "--recover-seqlen", "32", "--recover-log-every", "1"],
}


def readme_commands() -> list[str]:
    """The `prune` command lines of the README's shell blocks, without their comments."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith(COMMAND)]


def as_run_here(command: str, places: dict[str, Path]) -> list[str]:
    """The command's arguments with the README's placeholder paths replaced and small sizes appended."""
    argv = [str(places.get(word, word)) for word in shlex.split(command)[1:]]
    argv = [str(places["out"] / word.removeprefix("out/")) if word.startswith("out/") else word for word in argv]
    if "--help" in argv:
        return argv
    extra = [*SMALL_SIZES, *([] if "--no-eval" in argv else SMALL_EVALUATION)]
    for switch, sizes in SMALL_STAGES.items():
        if switch in argv:
            extra += sizes
    return [*argv, *extra]


def test_the_readme_shows_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert len(commands) >= 10 and any("--help" in command for command in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_runs(command, model_folders, text_file, tmp_path, capsys) -> None:
    texts = tmp_path / "my_text"
    texts.mkdir()
    (texts / "a.txt").write_text(text_file.read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: wanda\nsparsity: 0.5\n", encoding="utf-8")
    places = {"path/to/any/transformers/folder": model_folders["llama"], "my_text/": texts, "recipe.yaml": recipe, "out": tmp_path / "out"}
    code, out, err = run(as_run_here(command, places), capsys)
    assert code == 0, f"{command}: {err}"
    if "--help" not in command:
        assert out.strip().splitlines()[-1].startswith("peak memory") or out.strip().splitlines()[-1].startswith("note:"), out
    for word in shlex.split(command):
        if word.startswith("out/"):  # what the README says it writes is there
            assert (places["out"] / word.removeprefix("out/") / "report.json").is_file()

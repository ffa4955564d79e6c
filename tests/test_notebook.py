"""The example notebook runs from top to bottom (with small sizes), so that it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test (CI) runs it

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "benchmarks" / "prune_smollm2.ipynb"


@pytest.mark.slow
def test_the_example_notebook_runs_and_shows_its_results(tmp_path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    parameters.source = (f'MODEL = "smollm2-135m"\nNSAMPLES = 4\nSEQLEN = 64\nEVAL_WINDOWS = 2\nBLOCKS = "0-2"\n'
                         f'OUTPUT = "{tmp_path / "out"}"')
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "method sparsegpt, target 50%" in text and "perplexity (wiki-sample" in text  # the report's table
    assert "zeros in the blocks' linear layers" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 2  # OWL's allocation figure and the sparsity-per-block plot, inline
    tables = [output for output in outputs if "text/html" in output.get("data", {})]
    assert any("pruned perplexity" in output["data"]["text/html"] for output in tables)
    for run in ("sparsegpt", "wanda-owl"):
        assert (tmp_path / "out" / run / "report.json").is_file()

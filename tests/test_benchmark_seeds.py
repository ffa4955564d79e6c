"""The seed options of the recovery and MaskPro benchmarks: the spread they print, and bad seeds refused before any model loads."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_recovery_spread_is_one_run_or_mean_and_sample_deviation() -> None:
    spread = load_script(BENCHMARKS / "smollm2_recover.py").spread
    assert spread([{"perplexity_before": 115.0, "perplexity_after": 65.25}]) == "115.00 -> 65.25"
    rows = [{"perplexity_before": before, "perplexity_after": after} for before, after in ((110.0, 64.0), (114.0, 66.0), (118.0, 71.0))]
    expected = f"114.00 ± 4.00 -> {statistics.mean([64.0, 66.0, 71.0]):.2f} ± {statistics.stdev([64.0, 66.0, 71.0]):.2f} (n = 3)"
    assert spread(rows) == expected


@pytest.mark.parametrize("script", ["smollm2_recover.py", "smollm2_maskpro.py"])
def test_bad_seeds_are_one_line_before_the_model_loads(script, monkeypatch, tmp_path) -> None:
    module = load_script(BENCHMARKS / script)
    monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    wikitext = tmp_path / "wiki.txt"
    wikitext.write_text("text\n", encoding="utf-8")
    result = CliRunner().invoke(module.main, ["--wikitext", str(wikitext), "--seeds", "0,one"])
    assert result.exit_code == 2 and result.output.strip() == "error: --seeds takes comma-separated integers, got '0,one'"

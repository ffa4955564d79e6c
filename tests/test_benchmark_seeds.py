"""The seed options of the benchmarks (recovery, MaskPro, methods, quantization): the spread they print, and bad options refused before any model loads."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from eval.seeds import mean_and_spread, parse_seeds
from tests.conftest import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_mean_and_spread_is_the_value_or_the_mean_and_sample_deviation() -> None:
    assert mean_and_spread([0.8125], 3) == "0.812" and mean_and_spread([65.25]) == "65.25"
    assert mean_and_spread([1.0, 2.0, 3.0]) == "2.00 ± 1.00"  # sample deviation: sqrt(((1-2)² + (3-2)²) / 2) = 1
    assert mean_and_spread([0.80, 0.84], 3) == "0.820 ± 0.028"  # sqrt(2 * 0.02² / 1) = 0.0283


@pytest.mark.parametrize(("text", "message"), [("0,one", "comma-separated integers"), ("1,1", "distinct"), ("", "distinct"), (" , ", "distinct")])
def test_parse_seeds_refuses_what_is_not_distinct_integers(text, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_seeds(text, "--calibration-seeds")


def test_parse_seeds_keeps_the_order_given() -> None:
    assert parse_seeds("2, 0,1", "--seeds") == [2, 0, 1]


def test_recovery_spread_is_one_run_or_mean_and_sample_deviation() -> None:
    spread = load_script(BENCHMARKS / "smollm2_recover.py").spread
    assert spread([{"perplexity_before": 115.0, "perplexity_after": 65.25}]) == "115.00 -> 65.25"
    rows = [{"perplexity_before": before, "perplexity_after": after} for before, after in ((110.0, 64.0), (114.0, 66.0), (118.0, 71.0))]
    expected = f"114.00 ± 4.00 -> {statistics.mean([64.0, 66.0, 71.0]):.2f} ± {statistics.stdev([64.0, 66.0, 71.0]):.2f} (n = 3)"
    assert spread(rows) == expected


@pytest.mark.parametrize("script", ["smollm2_recover.py", "smollm2_maskpro.py", "smollm2_methods.py"])
def test_bad_seeds_are_one_line_before_the_model_loads(script, monkeypatch, tmp_path) -> None:
    module = load_script(BENCHMARKS / script)
    monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    wikitext = tmp_path / "wiki.txt"
    wikitext.write_text("text\n", encoding="utf-8")
    result = CliRunner().invoke(module.main, ["--wikitext", str(wikitext), "--seeds", "0,one"])
    assert result.exit_code == 2 and result.output.strip() == "error: --seeds takes comma-separated integers, got '0,one'"


def test_the_quantization_table_has_one_line_per_configuration_with_the_seeds_spread() -> None:
    table = load_script(BENCHMARKS / "smollm2_quantize.py").table
    storage = {"output_bytes": 200 * 2**20, "quantized_bits_per_weight": None}
    packed = {"output_bytes": 50 * 2**20, "quantized_bits_per_weight": 4.25}
    rows = [{"configuration": "dense", "seed": 0, "perplexity": 30.0, "storage": storage, "prune_seconds": 1.0, "peak_memory_mb": 1000.0}] + [
        {"configuration": "int4 (GPTQ)", "seed": seed, "perplexity": value, "storage": packed, "prune_seconds": 10.0 + seed, "peak_memory_mb": 1100.0}
        for seed, value in enumerate((40.0, 42.0, 44.0))]
    lines = table(rows).splitlines()
    assert lines[2] == "| dense | 30.00 | 200.0 | 1.000x | dense | 1.0 | 1000 |"
    assert lines[3] == "| int4 (GPTQ) | 42.00 ± 2.00 | 50.0 | 0.250x | 4.250 | 11.0 | 1100 |"


@pytest.mark.parametrize(("options", "message"), [(["--seeds", "0,one"], "comma-separated integers"), (["--only", "int5"], "unknown configuration")])
def test_the_quantization_benchmark_refuses_bad_options_before_any_run(options, message, monkeypatch) -> None:
    module = load_script(BENCHMARKS / "smollm2_quantize.py")
    monkeypatch.setattr(module, "prune", lambda *args, **kwargs: pytest.fail("a run started"))
    result = CliRunner().invoke(module.main, options)
    assert result.exit_code == 2 and message in result.output

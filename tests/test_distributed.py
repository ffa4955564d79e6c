"""Several processes, one pruned model: two gloo ranks (spawned with torch.multiprocessing) prune tiny Llama and BERT
models as one process does; torchrun runs the command; what is not built for several ranks yet is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing

from eval.sparsity import nm_valid
from prune import prune_model
from prune.models import all_prunable_layers, layer_weight
from tests.conftest import TASK

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test (CI) runs it

SIZES = {"nsamples": 16, "seqlen": 32, "batch_size": 4, "progress": False}
RUNS = [
    ("llama", {"method": "sparsegpt", "sparsity": 0.5}),
    ("llama", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl", "owl_m": 3}),
    ("llama", {"method": "sparsegpt", "pattern": "2:4", "order": "two-pass"}),
    ("llama", {"method": "wanda", "pattern": "2:4"}),
    ("llama", {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_m": 3}),
    ("llama", {"method": "obs", "sparsity": 0.5}),
    ("llama", {"method": "alps", "sparsity": 0.7, "allocation": "owl", "owl_m": 3}),
    ("llama", {"method": "magnitude", "sparsity": 0.5}),
    ("bert", {"method": "sparsegpt", "sparsity": 0.5}),
    ("bert", {"method": "wanda", "sparsity": 0.5}),
]
RECOVERY = {"method": "sparsegpt", "pattern": "2:4", "recover": "magma", "recover_steps": 4, "recover_lr": 1e-3, "recover_seqlen": 32,
            "recover_log_every": 2}
REFINEMENT = {"method": "sparsegpt", "pattern": "2:4", "refine": "maskpro", "refine_steps": 6, "refine_batch": 2, "refine_seqlen": 32,
              "refine_windows": 8, "refine_holdout": 4, "refine_log_every": 3, "refine_candidates": 2}
STREAMED = {"method": "sparsegpt", "sparsity": 0.5, "stream": "on"}
QUANTIZED = {"method": "sparsegpt", "sparsity": 0.5, "quantize": "int4", "group_size": 32}
TASKS = {"method": "wanda", "sparsity": 0.5}
MASK_AGREEMENT = 0.999  # the Hessians are summed in another order: a few near-ties may flip
LOSS_RTOL = 1e-4
# ALPS's support follows its ADMM iterates, and its conjugate gradients on an ill-conditioned H amplify rounding
# (a 1e-6 relative change of one block's H became 1e-4 in the next layer's); the flips then compound over the blocks.
# Measured 2026-12-07 on this model at 70 %, in ONE process, batches of 2 against 4 (the same change of summation
# order): 92-100 % of each layer's mask agreed (97 % overall). Several ranks are held to that same drift.
ROUNDING_DRIFT = {"alps": {"mask_agreement": 0.95, "rtol": 0.01}}  # two ranks: 97.4 % of the masks, losses and perplexity within 0.12 %


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def outcome(model, report) -> dict:
    return {"weights": {name: layer_weight(layer).clone() for name, layer in all_prunable_layers(model).items()},
            "report": report.to_dict()}


def rank_main(rank: int, world: int, port: int, folders: dict[str, str], text_file: str, results: str) -> None:
    """One rank: join the group, prune every run, rank 0 keeps what came out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for index, (architecture, options) in enumerate(RUNS):
            evaluation = {"eval_data": text_file, "eval_windows": 5} if architecture != "bert" else {}
            model, report = prune_model(folders[architecture], calibration=text_file, **options, **evaluation, **SIZES)
            if rank == 0:
                torch.save(outcome(model, report), Path(results) / f"{index}.pt")
        # recovery: a batch of 1 window on each of the 2 ranks, against one process with batches of 2
        model, report = prune_model(folders["llama"], calibration=text_file, eval_data=text_file, eval_windows=4, recover_batch=1, **RECOVERY, **SIZES)
        torch.save(outcome(model, report), Path(results) / f"recovery-{rank}.pt")
        model, report = prune_model(folders["llama"], calibration=text_file, eval_data=text_file, eval_windows=4, **REFINEMENT, **SIZES)
        torch.save(outcome(model, report), Path(results) / f"refinement-{rank}.pt")
        prune_model(folders["llama"], calibration=text_file, eval_data=text_file, eval_windows=4, output=str(Path(results) / "streamed"), **STREAMED,
                    **SIZES)
        prune_model(folders["llama"], calibration=text_file, eval_data=text_file, eval_windows=4, output=str(Path(results) / "quantized"), **QUANTIZED,
                    **SIZES)
        _, report = prune_model(folders["llama-eos"], calibration=text_file, eval_tasks=[TASK], eval_tasks_path=folders["tasks"], **TASKS, **SIZES)
        torch.save(report.tasks, Path(results) / f"tasks-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(model_folders, lm_folders, task_folder, text_file, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("ranks")
    folders = {architecture: str(model_folders[architecture]) for architecture in ("llama", "bert")}
    folders.update({"llama-eos": str(lm_folders["llama"]), "tasks": str(task_folder)})
    multiprocessing.spawn(rank_main, args=(2, free_port(), folders, str(text_file), str(results)), nprocs=2, join=True)
    return results


@pytest.mark.parametrize("index", range(len(RUNS)), ids=[f"{architecture}-{'-'.join(map(str, options.values()))}" for architecture, options in RUNS])
def test_two_ranks_prune_as_one_process_does(two_ranks, model_folders, text_file, index) -> None:
    architecture, options = RUNS[index]
    evaluation = {"eval_data": str(text_file), "eval_windows": 5} if architecture != "bert" else {}
    alone = outcome(*prune_model(str(model_folders[architecture]), calibration=str(text_file), **options, **evaluation, **SIZES))
    together = torch.load(two_ranks / f"{index}.pt", weights_only=False)
    kept_alone = torch.cat([(weight != 0).flatten() for weight in alone["weights"].values()])
    kept_together = torch.cat([(weight != 0).flatten() for weight in together["weights"].values()])
    agreement = (kept_alone == kept_together).float().mean().item()
    drift = ROUNDING_DRIFT.get(options["method"], {"mask_agreement": MASK_AGREEMENT, "rtol": LOSS_RTOL})
    if options["method"] in ("wanda", "magnitude"):
        assert agreement == 1.0
    else:
        assert agreement >= drift["mask_agreement"]
    if "pattern" in options:
        assert all(nm_valid(weight, 2, 4) for weight in together["weights"].values())
    for one, two in zip(alone["report"]["layers"], together["report"]["layers"], strict=True):
        assert one["name"] == two["name"]
        if one["loss"] is not None and options["method"] not in ROUNDING_DRIFT:
            assert two["loss"] == pytest.approx(one["loss"], rel=LOSS_RTOL, abs=1e-9), one["name"]
        assert two["sparsity"] == pytest.approx(one["sparsity"], abs=1e-9), one["name"]  # each layer reaches the same target
    losses = [sum(layer["loss"] or 0.0 for layer in report["layers"]) for report in (alone["report"], together["report"])]
    assert losses[1] == pytest.approx(losses[0], rel=drift["rtol"])
    if options.get("allocation") == "owl":
        assert [entry["sparsity"] for entry in together["report"]["allocation"]["blocks"]] == pytest.approx(
            [entry["sparsity"] for entry in alone["report"]["allocation"]["blocks"]], rel=1e-5)
    if evaluation:
        assert together["report"]["perplexity"]["pruned"]["value"] == pytest.approx(alone["report"]["perplexity"]["pruned"]["value"],
                                                                                   rel=max(1e-3, drift["rtol"]))
    ranks = together["report"]["distributed"]
    assert ranks["ranks"] == 2 and ranks["backend"] == "gloo"
    if options["method"] == "magnitude":  # no calibration: every rank prunes every layer alike
        assert [entry["calibration_windows"] for entry in ranks["per_rank"]] == [0, 0]
    else:
        assert [entry["calibration_windows"] for entry in ranks["per_rank"]] == [8, 8]
        assert all(entry["layer_groups_pruned"] > 0 for entry in ranks["per_rank"])


def test_recovery_on_two_ranks_is_one_process_with_their_batches_together(two_ranks, model_folders, text_file) -> None:
    """The ranks' summed gradients are one process's in another summation order: the weights agree to rounding. On the
    locked versions (transformers 5.25.0, torch 2.13.0) the largest difference measured on 2026-12-07 was 1.7e-5 and
    no weight was outside the tolerance, in 5 runs (alone and in the whole suite). A drift of up to 1.4e-3 on 5-10 % of
    the weights seen on 2026-12-05, when this test was marked xfail, did not reproduce; one process's recovery with 1
    against 2 threads (another summation order inside each product) differs by at most 3.3e-5."""
    alone = outcome(*prune_model(str(model_folders["llama"]), calibration=str(text_file), eval_data=str(text_file), eval_windows=4, recover_batch=2,
                                 **RECOVERY, **SIZES))
    ranks = [torch.load(two_ranks / f"recovery-{rank}.pt", weights_only=False) for rank in range(2)]
    for name, weight in alone["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])  # DDP: every rank holds the same model
        assert torch.equal(ranks[0]["weights"][name] != 0, weight != 0) and nm_valid(weight, 2, 4)  # the same masks, kept
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-3, atol=1e-5)  # gradients summed in another order
    recovered = ranks[0]["report"]["recover"]
    assert recovered["zeros_kept"] and [point["step"] for point in recovered["curve"]] == [2, 4]
    assert [point["loss"] for point in recovered["curve"]] == pytest.approx([point["loss"] for point in alone["report"]["recover"]["curve"]], rel=1e-4)


def test_maskpro_on_two_ranks_ends_with_the_same_masks_on_both(two_ranks) -> None:
    ranks = [torch.load(two_ranks / f"refinement-{rank}.pt", weights_only=False) for rank in range(2)]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]) and nm_valid(weight, 2, 4)
    refined = [entry["report"]["refine"] for entry in ranks]
    assert refined[0]["curve"] == refined[1]["curve"] and [point["step"] for point in refined[0]["curve"]] == [3, 6]
    assert refined[0]["heldout"] == refined[1]["heldout"]  # the same candidates (rank 0's draws), the same one kept


def test_streamed_on_two_ranks_rank_0_writes_what_one_process_writes(two_ranks, model_folders, text_file, tmp_path) -> None:
    from tests.conftest import stored

    _, report = prune_model(str(model_folders["llama"]), calibration=str(text_file), eval_data=str(text_file), eval_windows=4,
                            output=str(tmp_path / "alone"), **STREAMED, **SIZES)
    together = json.loads((two_ranks / "streamed" / "report.json").read_text())
    assert together["model"]["streamed"] and report.model["streamed"] and together["distributed"]["ranks"] == 2
    alone, shared = stored(tmp_path / "alone"), stored(two_ranks / "streamed")
    assert set(alone) == set(shared)
    pruned = [name for name in alone if ".layers." in name and alone[name].dim() == 2]
    agreement = sum((alone[name] != 0).eq(shared[name] != 0).sum().item() for name in pruned) / sum(alone[name].numel() for name in pruned)
    assert agreement >= MASK_AGREEMENT
    assert together["perplexity"]["pruned"]["value"] == pytest.approx(report.perplexity["pruned"]["value"], rel=1e-3)
    assert not list(two_ranks.glob(".streamed*"))  # rank 0's staging folder was renamed into place


def test_quantized_on_two_ranks_rank_0_writes_what_one_process_writes(two_ranks, model_folders, text_file, tmp_path) -> None:
    """Each rank quantizes its share of the layers; the scales travel with the weights to rank 0, which writes the
    compressed checkpoint."""
    from tests.conftest import stored

    _, report = prune_model(str(model_folders["llama"]), calibration=str(text_file), eval_data=str(text_file), eval_windows=4,
                            output=str(tmp_path / "alone"), **QUANTIZED, **SIZES)
    together = json.loads((two_ranks / "quantized" / "report.json").read_text())
    assert together["distributed"]["ranks"] == 2 and together["quantization"] == report.quantization
    alone, shared = stored(tmp_path / "alone"), stored(two_ranks / "quantized")
    assert set(alone) == set(shared) and any(name.endswith(".weight_scale") for name in alone)
    packed = [name for name in alone if name.endswith((".weight_packed", ".weight_scale"))]
    agreement = sum(alone[name].eq(shared[name]).sum().item() for name in packed) / sum(alone[name].numel() for name in packed)
    assert agreement >= 0.99  # the Hessians are summed in another order: a few weights round to the next level
    assert together["perplexity"]["pruned"]["value"] == pytest.approx(report.perplexity["pruned"]["value"], rel=1e-2)


def test_lm_eval_tasks_on_two_ranks_are_scored_once_and_known_to_both(two_ranks, lm_folders, task_folder, text_file) -> None:
    _, alone = prune_model(str(lm_folders["llama"]), calibration=str(text_file), eval_tasks=[TASK], eval_tasks_path=str(task_folder), **TASKS, **SIZES)
    ranks = [torch.load(two_ranks / f"tasks-{rank}.pt", weights_only=False) for rank in range(2)]
    assert ranks[0] == ranks[1]
    for label in ("dense", "pruned"):
        assert ranks[0][label] == alone.tasks[label]  # Wanda's masks are the same on two ranks as on one: so are the accuracies


def test_torchrun_runs_the_command_and_rank_0_writes_the_output(model_folders, text_file, tmp_path) -> None:
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "prune",
               "--model", str(model_folders["llama"]), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(text_file),
               "--eval-data", str(text_file), "--eval-windows", "4", "--nsamples", "8", "--seqlen", "32", "--quiet", "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.count("method sparsegpt, target 50%") == 1  # one report, printed by rank 0
    report = json.loads((output / "report.json").read_text())
    assert report["distributed"]["ranks"] == 2 and [entry["calibration_windows"] for entry in report["distributed"]["per_rank"]] == [4, 4]


@pytest.mark.parametrize(("options", "flag"), [({"method": "obert"}, "--method obert")])
def test_what_is_not_built_for_several_ranks_is_refused_in_one_line(model_folders, text_file, tmp_path, options, flag) -> None:
    settings = {"method": "sparsegpt", "sparsity": 0.5, **options}
    if "output" in settings:
        settings["output"] = str(tmp_path / "unused")
    port = free_port()
    results = tmp_path / "refusals"
    results.mkdir()
    multiprocessing.spawn(refusal_main, args=(2, port, str(model_folders["llama"]), str(text_file), settings, str(results)), nprocs=2, join=True)
    message = (results / "0.txt").read_text()
    assert message.startswith(f"{flag} does not run on several ranks yet (2 processes here)")
    assert not (tmp_path / "unused").exists()


def refusal_main(rank: int, world: int, port: int, folder: str, text_file: str, settings: dict, results: str) -> None:
    from methods import PruningError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        prune_model(folder, calibration=text_file, **settings, **SIZES)
        message = "no refusal"
    except PruningError as error:
        message = str(error)
    finally:
        dist.destroy_process_group()
    (Path(results) / f"{rank}.txt").write_text(message)


def dying_rank_main(rank: int, world: int, port: int, argv: list[str], results: str, dies: bool = True, hangs: bool = False) -> None:
    """One rank of the command; with `dies`, rank 1 dies in the middle of block 1 (with `hangs`, it stops answering
    there instead)."""
    import contextlib
    import io
    import time

    from prune.cli import main
    from prune.stages.oneshot import OneShot

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if rank == 1 and dies:
        original = OneShot.prune_group

        def dying(self, run, index, *args, **kwargs):
            if index == 1:
                if hangs:
                    time.sleep(600)
                os._exit(3)
            return original(self, run, index, *args, **kwargs)

        OneShot.prune_group = dying
    errors = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stderr(errors):
            main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    (Path(results) / f"{rank}.json").write_text(json.dumps({"code": code, "stderr": errors.getvalue(), "seconds": time.perf_counter() - started}))


def run_two_ranks(argv: list[str], results: Path, dies: bool, hangs: bool = False) -> list[int | None]:
    """The command on two ranks (plain processes, so that one may die alone); their exit codes (None: still running,
    then ended)."""
    results.mkdir()
    port, spawn = free_port(), multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=dying_rank_main, args=(rank, 2, port, argv, str(results), dies, hangs)) for rank in range(2)]
    for process in processes:
        process.start()
    processes[0].join(timeout=180)
    if hangs:
        codes = [processes[0].exitcode, processes[1].exitcode]
        processes[1].kill()
        processes[1].join()
        return codes
    processes[1].join(timeout=180)
    return [process.exitcode for process in processes]


def test_a_rank_that_stops_answering_stops_the_others_after_the_rank_timeout(model_folders, text_file, tmp_path) -> None:
    argv = ["--model", str(model_folders["llama"]), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(text_file), "--no-eval",
            "--nsamples", "8", "--seqlen", "32", "--quiet", "--rank-timeout", "5", "--output", str(tmp_path / "out")]
    assert run_two_ranks(argv, tmp_path / "hung", dies=True, hangs=True) == [0, None]  # rank 1 still hanging when rank 0 gave up
    survivor = json.loads((tmp_path / "hung" / "0.json").read_text())
    assert survivor["code"] == 1 and survivor["seconds"] < 60
    assert survivor["stderr"].strip().splitlines()[-1].startswith("prune: error: the ranks lost each other")
    assert not (tmp_path / "out").exists()


def test_a_rank_that_dies_stops_the_others_in_one_line_and_resume_finishes_the_run(model_folders, text_file, tmp_path) -> None:
    from tests.conftest import stored

    def argv(output: Path) -> list[str]:
        return ["--model", str(model_folders["llama"]), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(text_file),
                "--eval-data", str(text_file), "--eval-windows", "4", "--nsamples", "8", "--seqlen", "32", "--quiet", "--rank-timeout", "60",
                "--stream", "on", "--output", str(output)]

    output = tmp_path / "out"
    assert run_two_ranks(argv(output), tmp_path / "died", dies=True) == [0, 3]  # rank 0 ended by itself (its exit code is in its file)
    survivor = json.loads((tmp_path / "died" / "0.json").read_text())
    assert survivor["code"] == 1 and survivor["seconds"] < 60
    lines = [line for line in survivor["stderr"].splitlines() if line.strip()]
    assert lines[-1].startswith("prune: error: the ranks lost each other") and "Traceback" not in survivor["stderr"], survivor["stderr"]
    assert not output.exists() and json.loads((tmp_path / ".out.partial" / "resume.json").read_text())["finished"] == 1
    assert run_two_ranks([*argv(output), "--resume"], tmp_path / "resumed", dies=False) == [0, 0]
    assert run_two_ranks(argv(tmp_path / "whole"), tmp_path / "uninterrupted", dies=False) == [0, 0]
    resumed, whole = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("out", "whole"))
    assert any("resumed after 1 finished blocks" in note for note in resumed["notes"])
    assert resumed["perplexity"] == whole["perplexity"] and resumed["distributed"]["ranks"] == 2
    expected, actual = stored(tmp_path / "whole"), stored(output)
    assert set(expected) == set(actual) and all(torch.equal(actual[name], tensor) for name, tensor in expected.items())
    assert not (tmp_path / ".out.partial").exists()

"""Zero-shot tasks through lm-evaluation-harness: a local multiple-choice task written by the test, figures before and
after pruning equal to lm-eval's own run on the saved model, hub tasks offline, bad task input."""

from __future__ import annotations

import json
import random

import pytest

from prune import prune_model
from tests.conftest import FAST, TASK, assert_one_line_error, run, write_task

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test (CI) runs it


def test_task_figures_before_and_after_equal_lm_evals_own_run_on_the_saved_model(lm_folders, text_file, task_folder, tmp_path, capsys) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    output = tmp_path / "out"
    code, out, err = run(["--model", str(lm_folders["llama"]), "--method", "sparsegpt", "--sparsity", "0.6", "--calibration", str(text_file),
                          "--eval-data", str(text_file), "--eval-windows", "2", "--eval-tasks", TASK, "--eval-tasks-path", str(task_folder),
                          *FAST, "--output", str(output)], capsys)
    assert code == 0, err
    tasks = json.loads((output / "report.json").read_text())["tasks"]
    assert tasks["tasks"] == [TASK] and tasks["unavailable"] == {} and tasks["path"] == str(task_folder)
    for label in ("dense", "pruned"):
        figures = tasks[label][TASK]
        assert 0 <= figures["acc"] <= 1 and 0 <= figures["acc_norm"] <= 1 and figures["samples"] == 12
        assert figures["acc_stderr"] is not None
    assert f"{TASK} (12 examples): acc dense" in out
    own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(output), "device": "cpu", "dtype": "float32", "batch_size": 4},
                                  tasks=[TASK], task_manager=TaskManager(include_path=str(task_folder), include_defaults=False), num_fewshot=0, log_samples=False)
    assert own["results"][TASK]["acc,none"] == tasks["pruned"][TASK]["acc"]
    assert own["results"][TASK]["acc_norm,none"] == tasks["pruned"][TASK]["acc_norm"]


def test_the_api_takes_eval_tasks_and_a_limit(lm_folders, text_file, task_folder) -> None:
    _, report = prune_model(str(lm_folders["gpt2"]), method="wanda", sparsity=0.5, calibration=str(text_file), eval_tasks=[TASK],
                            eval_tasks_path=str(task_folder), eval_limit=5, nsamples=8, seqlen=32, progress=False)
    assert report.tasks["limit"] == 5 and report.perplexity is None  # the API evaluates no perplexity unless asked
    assert set(report.tasks["dense"][TASK]) >= {"acc", "acc_norm"} and report.tasks["pruned"][TASK]["samples"] == 5


def test_a_hub_task_offline_is_reported_not_evaluated_and_the_rest_of_the_run_is_kept(lm_folders, text_file, task_folder, tmp_path, capsys,
                                                                                       monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "out"
    code, out, err = run(["--model", str(lm_folders["llama"]), "--method", "wanda", "--sparsity", "0.5", "--calibration", str(text_file),
                          "--no-eval", "--eval-tasks", f"arc_easy,{TASK}", "--eval-tasks-path", str(task_folder), *FAST, "--output", str(output)],
                         capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("prune: warning:")]
    assert len(warnings) == 1 and "--eval-tasks arc_easy is not evaluated" in warnings[0] and "needs a network" in warnings[0]
    report = json.loads((output / "report.json").read_text())
    assert list(report["tasks"]["unavailable"]) == ["arc_easy"] and list(report["tasks"]["pruned"]) == [TASK]
    assert (output / "model.safetensors").is_file() and "arc_easy: not evaluated" in out


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--eval-tasks", "no_such_task_anywhere"], "--eval-tasks: unknown task(s) no_such_task_anywhere"),
    (["--eval-limit", "5"], "--eval-limit applies only with --eval-tasks"),
    (["--eval-tasks", TASK, "--eval-tasks-path", "/no/such/folder"], "--eval-tasks-path: no such folder"),
    (["--eval-tasks", "broken_task"], "task broken_task cannot be loaded"),
])
def test_bad_task_input_is_one_line_and_nothing_is_written(lm_folders, text_file, task_folder, tmp_path, capsys, extra, fragment) -> None:
    broken = write_task(tmp_path / "broken", "broken_task", [])
    (broken / "broken_task.jsonl").unlink()  # its data file is missing
    path = ["--eval-tasks-path", str(broken)] if "broken_task" in extra else []
    output = tmp_path / "out"
    code, _, err = run(["--model", str(lm_folders["llama"]), "--method", "magnitude", "--sparsity", "0.5", *extra, *path, *FAST,
                        "--output", str(output)], capsys)
    assert_one_line_error(code, err, fragment)
    assert not output.exists()


def test_a_model_lm_eval_cannot_score_is_refused(model_folders, task_folder, tmp_path, capsys) -> None:
    code, _, err = run(["--model", str(model_folders["bert"]), "--method", "magnitude", "--sparsity", "0.5", "--eval-tasks", TASK,
                        "--eval-tasks-path", str(task_folder), *FAST], capsys)
    assert_one_line_error(code, err, "it needs a causal LM")
    code, _, err = run(["--model", str(model_folders["llama"]), "--method", "magnitude", "--sparsity", "0.5", "--eval-tasks", TASK,
                        "--eval-tasks-path", str(task_folder), *FAST], capsys)
    assert_one_line_error(code, err, "lm-eval needs a tokenizer with a BOS or EOS token")


SEQUENCES = [
    ("one, two, three,", " four"), ("two, three, four,", " five"), ("five, six, seven,", " eight"), ("six, seven, eight,", " nine"),
    ("Monday, Tuesday,", " Wednesday"), ("Tuesday, Wednesday,", " Thursday"), ("Thursday, Friday,", " Saturday"),
    ("January, February,", " March"), ("March, April,", " May"), ("June, July,", " August"), ("September, October,", " November"),
    ("A, B, C,", " D"), ("D, E, F,", " G"), ("first, second,", " third"), ("1, 2, 3,", " 4"), ("10, 20, 30,", " 40"),
]
DISTRACTORS = [" banana", " purple", " yesterday", " elephant", " quietly", " mountain"]


@pytest.mark.slow
def test_smollm2_is_far_above_chance_on_an_easy_local_task(tmp_path) -> None:
    generator = random.Random(0)
    questions = []
    for prompt, answer in SEQUENCES:
        choices = [answer, *generator.sample(DISTRACTORS, 3)]
        generator.shuffle(choices)
        questions.append({"question": prompt, "choices": choices, "answer": choices.index(answer)})
    folder = write_task(tmp_path / "tasks", "easy_sequences", questions)
    _, report = prune_model("smollm2-135m", method="magnitude", sparsity=0.5, blocks="0-3", eval_tasks=["easy_sequences"],
                            eval_tasks_path=str(folder), progress=False)
    dense, pruned = report.tasks["dense"]["easy_sequences"], report.tasks["pruned"]["easy_sequences"]
    assert dense["samples"] == len(SEQUENCES) and dense["acc"] >= 0.75  # chance: 0.25
    assert 0 <= pruned["acc"] <= 1

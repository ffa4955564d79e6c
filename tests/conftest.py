"""Tiny random models of every supported architecture, built from configs in code, and a tokenizer for them."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from calibration.conll import Sentence
from calibration.corpora import local_corpus, wiki_sample
from prune.cli import main

ARCHITECTURES = ("llama", "gpt2", "opt", "bert")
HIDDEN = 64
FFN = 128


@pytest.fixture(scope="session")
def wiki_text() -> str:
    """About 200 kB of the embedded Wikipedia sample; read from $PRUNE_WIKI_SAMPLE when it is set (a folder that
    `benchmarks/gpu_check.py bundle` exported, for a GPU machine without gensim)."""
    exported = os.environ.get("PRUNE_WIKI_SAMPLE")
    return (local_corpus(Path(exported)) if exported else wiki_sample()).text[:200_000]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, wiki_text: str) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "calibration.txt"
    path.write_text(wiki_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer(wiki_text: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (about 2,000 words) trained in the test on the Wikipedia sample."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([wiki_text], trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def tiny_model(architecture: str, vocab_size: int, *, hidden: int = HIDDEN, seed: int = 0) -> torch.nn.Module:
    """A two-block random model of `architecture` with inputs sizes that hold 2:4 and 4:8."""
    torch.manual_seed(seed)
    if architecture == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=FFN, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(config)
    elif architecture == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=4, n_positions=256)
        model = GPT2LMHeadModel(config)
    elif architecture == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=hidden)
        model = OPTForCausalLM(config)
    elif architecture == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=FFN, max_position_embeddings=256, num_labels=5)
        model = BertForTokenClassification(config)
    else:
        raise ValueError(architecture)
    return model.eval()


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each tiny architecture saved with save_pretrained next to the test tokenizer, as a user's local folder would be."""
    folders = {}
    for architecture in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(f"tiny-{architecture}")
        tiny_model(architecture, len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[architecture] = folder
    return folders


TASK = "tiny_choice"  # a local multiple-choice task of lm-eval, written by the fixture below


def write_task(folder: Path, name: str, questions: list[dict]) -> Path:
    """A multiple-choice task of lm-eval: its YAML and a JSONL data file of questions, choices and answers."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in questions))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder


def vocabulary_questions(tokenizer, count: int = 12, seed: int = 0) -> list[dict]:
    """Questions made of words the test tokenizer knows, each with three choices."""
    words = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and word.islower() and len(word) > 3)[:300]
    generator = random.Random(seed)
    return [{"question": " ".join(generator.sample(words, 6)), "choices": [" " + word for word in generator.sample(words, 3)],
             "answer": generator.randrange(3)} for _ in range(count)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, tokenizer) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks"), TASK, vocabulary_questions(tokenizer))


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny Llama and GPT-2 models whose tokenizer has an end-of-text token, as lm-eval needs."""
    with_eos = copy.deepcopy(tokenizer)
    with_eos.add_special_tokens({"eos_token": "</s>"})
    folders = {}
    for architecture in ("llama", "gpt2"):
        folder = tmp_path_factory.mktemp(f"lm-{architecture}")
        tiny_model(architecture, len(with_eos)).save_pretrained(folder)
        with_eos.save_pretrained(folder)
        folders[architecture] = folder
    return folders


def load_script(path: Path) -> ModuleType:
    """A script of benchmarks/ imported as a module (registered, so that its dataclasses can look their module up)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Helpers shared by several test modules (no test module imports another).

SMALL = {"nsamples": 8, "seqlen": 32, "batch_size": 4, "progress": False}  # the calibration of a test run (Python API)
FAST = [argument for name, value in SMALL.items() if name != "progress"
        for argument in (f"--{name.replace('_', '-')}", str(value))] + ["--quiet"]  # the same on the command line


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the command in-process: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def forward_passes() -> Iterator[list[str]]:
    """The class names of every module that runs a forward pass inside the block, in order."""
    forwards: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: forwards.append(type(module).__name__))
    try:
        yield forwards
    finally:
        handle.remove()


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("prune: error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert fragment in errors[0], errors[0]


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as shard:
            tensors.update({name: shard.get_tensor(name) for name in shard.keys()})  # noqa: SIM118
    return tensors


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def write_conll(folder: Path, splits: dict[str, list[Sentence]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, sentences in splits.items():
        blocks = ["\n".join(f"{token} {tag}" for token, tag in zip(s.tokens, s.tags, strict=True)) for s in sentences]
        (folder / f"{split}.txt").write_text("-DOCSTART- O\n\n" + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return folder


def random_problem(rows: int, columns: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated calibration inputs X (tokens, columns) and H = (2/n) XᵀX."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns**0.5
    inputs = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ (torch.eye(columns, dtype=torch.float64) + mixing)
    hessian = 2 * inputs.T @ inputs / tokens
    return weight, inputs, hessian


def output_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean over tokens of ‖(W − W') x‖²."""
    return (((weight - pruned) @ inputs.T) ** 2).sum().item() / inputs.shape[0]


def synthetic_sentences(tokenizer, count: int, seed: int) -> list[Sentence]:
    """Sentences of vocabulary words whose tags depend on the word alone (a rule a tiny model can learn)."""
    vocabulary = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and word.islower() and len(word) > 2)[:400]
    people, places, others = vocabulary[:15], vocabulary[15:30], vocabulary[30:]
    generator = random.Random(seed)
    sentences = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(generator.randint(4, 12)):
            kind = generator.random()
            if kind < 0.15:
                tokens.append(generator.choice(people))
                tags.append("B-PER")
            elif kind < 0.3:
                tokens.append(generator.choice(places))
                tags.append("B-LOC")
            else:
                tokens.append(generator.choice(others))
                tags.append("O")
        sentences.append(Sentence(tuple(tokens), tuple(tags)))
    return sentences

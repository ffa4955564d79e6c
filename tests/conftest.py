"""Tiny random models of every supported architecture, built from configs in code, and a tokenizer for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
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

from calibration.corpora import local_corpus, wiki_sample

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

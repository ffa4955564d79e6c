"""Training on a task loss: the one loop every training stage uses (recovery after pruning, fine-tuning a token
classifier, and the gradient-based methods to come), and fine-tuning a token classifier (NER) from an encoder with
selection of the best checkpoint on the dev split, cached on disk so that a benchmark fine-tunes once."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from calibration.conll import Sentence, label_names
from calibration.sentences import EncodedSentence, encode_sentences, pad_batch
from eval.ner import evaluate_ner
from methods import PruningError
from prune.devices import synchronize
from prune.models import TOKEN_CLASSIFICATION, LoadedModel, ModelError, default_cache_dir, first_line, load_model
from prune.output import write_atomically


@dataclass
class TrainingTimes:
    forward_backward: float = 0.0  # seconds in forward and backward passes (and gradient clipping)
    optimizer: float = 0.0  # seconds in the optimizers' steps


def train(model: nn.Module, batches: Iterable[dict], steps: int, optimizers: Sequence, schedulers: Sequence, device: torch.device, *,
          clip_norm: float | None = None, after_step: Callable[[int, float], None] | None = None, progress: bool = True,
          description: str = "training", penalty: Callable[[], torch.Tensor] | None = None) -> TrainingTimes:
    """Minimise the task loss `model(**batch).loss` (batches carry their `labels`), plus `penalty()` when given (a
    regulariser), for `steps` batches: per step one forward and backward pass, the gradient norm clipped to
    `clip_norm` when given, one step of every optimizer, then `after_step(step, task loss)` (logging, evaluation) and
    one step of every scheduler. The model is in training mode meanwhile and in evaluation mode afterwards. A loss
    that is not finite stops training with PruningError."""
    times = TrainingTimes()
    model.train()
    try:
        for step, batch in zip(tqdm(range(1, steps + 1), desc=description, unit="step", disable=not progress), batches, strict=False):
            batch = {key: value.to(device) for key, value in batch.items()}
            started = time.perf_counter()
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise PruningError(f"training diverged at step {step} (loss {loss.item()})")
            (loss + penalty() if penalty is not None else loss).backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            synchronize(device)
            middle = time.perf_counter()
            for optimizer in optimizers:
                optimizer.step()
            synchronize(device)
            times.forward_backward += middle - started
            times.optimizer += time.perf_counter() - middle
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step, loss.item())
            for scheduler in schedulers:
                scheduler.step()
    finally:
        model.eval()
    return times

FINETUNE_RECORD = "finetune.json"


@dataclass
class FinetuneSettings:
    """How the token classifier is trained: AdamW, linear warm-up then linear decay, `evals_per_epoch` dev evaluations
    per epoch, the checkpoint with the best dev entity F1 kept."""

    epochs: int = 5
    lr: float = 1e-4
    batch: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 256
    seed: int = 0
    train_limit: int | None = None  # train on the first n training sentences only (quick runs)
    dev_limit: int | None = None  # select on the first n dev sentences only
    evals_per_epoch: int = 2
    progress: bool = True

    def check(self) -> None:
        for label, value in (("epochs", self.epochs), ("batch", self.batch), ("max length", self.max_length), ("evaluations per epoch", self.evals_per_epoch)):
            if value < 1:
                raise PruningError(f"fine-tuning {label} must be at least 1, got {value}")
        if not self.lr > 0:
            raise PruningError(f"fine-tuning lr must be positive, got {self.lr:g}")
        if not 0 <= self.warmup < 1:
            raise PruningError(f"fine-tuning warm-up must be in [0, 1), got {self.warmup:g}")

    def identity(self) -> dict:
        """The settings that decide the trained weights (not the progress display)."""
        return {key: value for key, value in asdict(self).items() if key != "progress"}


@dataclass
class FinetuneResult:
    """What fine-tuning did: the dev F1 after each evaluation, the one kept, and the time."""

    labels: list[str]
    history: list[dict] = field(default_factory=list)  # {"epoch", "step", "train_loss", "dev_f1"}
    best_dev_f1: float = 0.0
    best_step: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    encoder: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def data_fingerprint(splits: dict[str, list[Sentence]]) -> str:
    """A digest of the sentences and tags of every split, so that a cache never serves a model trained on other data."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(split.encode())
        for sentence in splits[split]:
            digest.update(" ".join(sentence.tokens).encode())
            digest.update(b"\t")
            digest.update(" ".join(sentence.tags).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def cache_folder(encoder: str, splits: dict[str, list[Sentence]], settings: FinetuneSettings, cache_dir: Path | None = None) -> Path:
    """Where the token classifier fine-tuned from `encoder` on `splits` with `settings` is kept."""
    key = json.dumps({"encoder": encoder, "data": data_fingerprint(splits), "settings": settings.identity()}, sort_keys=True)
    slug = "".join(character if character.isalnum() or character in "-_." else "-" for character in Path(encoder).name or encoder)
    return (cache_dir or default_cache_dir()) / "ner" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def shuffled_batches(encoded: list[EncodedSentence], batch_size: int, generator: random.Random) -> list[list[int]]:
    """Batches of similar-length sentences (little padding), in a random order; sentences shuffled within length buckets."""
    order = list(range(len(encoded)))
    generator.shuffle(order)
    bucket = batch_size * 50
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda index: len(encoded[index].features["input_ids"]))
        batches.extend(chunk[position : position + batch_size] for position in range(0, len(chunk), batch_size))
    generator.shuffle(batches)
    return batches


def finetune_token_classifier(encoder: str, splits: dict[str, list[Sentence]], settings: FinetuneSettings, device: torch.device,
                              cache_dir: Path | None = None) -> tuple[LoadedModel, FinetuneResult]:
    """Train a token classifier head and the whole encoder on splits['train'], keeping the weights with the best dev F1."""
    settings.check()
    train_sentences = splits["train"][: settings.train_limit] if settings.train_limit else splits["train"]
    dev_sentences = splits["dev"][: settings.dev_limit] if settings.dev_limit else splits["dev"]
    if not train_sentences or not dev_sentences:
        raise PruningError("fine-tuning needs training and dev sentences; a split is empty")
    names = label_names(splits["train"])
    label_ids = {name: index for index, name in enumerate(names)}
    # a new classifier head for these labels (replacing any head of another size), initialised from the global generator
    torch.manual_seed(settings.seed)
    loaded = load_model(encoder, cache_dir=cache_dir, kind=TOKEN_CLASSIFICATION,
                        head_options={"id2label": dict(enumerate(names)), "label2id": label_ids, "ignore_mismatched_sizes": True})
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = encode_sentences(tokenizer, train_sentences, label_ids, settings.max_length)
    generator = random.Random(settings.seed)
    steps_per_epoch = -(-len(encoded) // settings.batch)
    total = steps_per_epoch * settings.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup * total), total)
    evaluate_every = max(1, steps_per_epoch // settings.evals_per_epoch)
    result = FinetuneResult(labels=names, settings=settings.identity(), encoder=encoder)
    best_state = None
    running: list[float] = []

    def epochs():
        for _ in range(settings.epochs):
            for indices in shuffled_batches(encoded, settings.batch, generator):
                yield pad_batch(tokenizer, [encoded[index] for index in indices])

    def after_step(step: int, loss: float) -> None:
        nonlocal best_state
        running.append(loss)
        if step % evaluate_every == 0 or step == total:
            model.eval()
            dev_f1 = evaluate_ner(model, tokenizer, dev_sentences, names, device).f1
            model.train()
            result.history.append({"epoch": -(-step // steps_per_epoch), "step": step, "train_loss": sum(running) / len(running), "dev_f1": dev_f1})
            running.clear()
            if dev_f1 > result.best_dev_f1 or best_state is None:
                result.best_dev_f1, result.best_step = dev_f1, step
                best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}

    model.to(device)
    started = time.perf_counter()
    train(model, epochs(), total, [optimizer], [schedule], device, clip_norm=1.0, after_step=after_step, progress=settings.progress,
          description="fine-tuning")
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    result.seconds = time.perf_counter() - started
    return loaded, result


def load_or_finetune(encoder: str, splits: dict[str, list[Sentence]], settings: FinetuneSettings, device: torch.device,
                     cache_dir: Path | None = None) -> tuple[LoadedModel, FinetuneResult, bool]:
    """The cached token classifier for (encoder, data, settings), fine-tuning and saving it first if there is none.

    Returns the model, its fine-tuning record, and whether it came from the cache.
    """
    folder = cache_folder(encoder, splits, settings, cache_dir)
    record = folder / FINETUNE_RECORD
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
            loaded = load_model(str(folder), kind=TOKEN_CLASSIFICATION)
        except (ValueError, ModelError) as error:
            raise ModelError(f"the cached token classifier in {folder} cannot be read ({first_line(error)}); delete that folder") from None
        loaded.name = f"{encoder} fine-tuned on NER"
        return loaded, FinetuneResult(**saved), True
    loaded, result = finetune_token_classifier(encoder, splits, settings, device, cache_dir)

    def write(staging: Path) -> None:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        (staging / FINETUNE_RECORD).write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")

    write_atomically(folder, write, overwrite=False)
    loaded.name, loaded.source = f"{encoder} fine-tuned on NER", str(folder)
    return loaded, result, False


def fresh_copy(loaded: LoadedModel) -> LoadedModel:
    """A LoadedModel whose weights are a copy of `loaded`'s (the tokenizer is shared): each pruning run starts dense."""
    return LoadedModel(model=copy.deepcopy(loaded.model).eval(), tokenizer=loaded.tokenizer, name=loaded.name, source=loaded.source, kind=loaded.kind)

"""Resuming a streamed run: what the finished blocks need to be trusted and skipped.

A streamed run writes each pruned block to its own shard in the staging folder beside its output. After each block
(and after the dense evaluation and the allocation) it also writes `resume.json` there, atomically: a fingerprint
of what decides the result (the settings, the model's files, the calibration and evaluation data) and what the
finished part of the run produced (its report entries). A run started again with `--resume` checks the fingerprint,
replays the finished blocks to rebuild the next block's inputs, and carries on: the output is the one an
uninterrupted run would have written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from methods import PruningError
from prune.weights import write_text

STATE = "resume.json"
NOT_FINGERPRINTED = {"overwrite", "resume", "stream"}  # options that change how a run is carried out, not its result


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """A digest of the values of some tensors (e.g. the calibration batches' token ids)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(folder: Path, files: list[Path]) -> dict:
    """The model's config and the names and sizes of its weight files."""
    config = (folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b""
    return {"config": hashlib.sha256(config).hexdigest(), "files": {path.name: path.stat().st_size for path in sorted(set(files))}}


@dataclass
class ResumeState:
    """The finished part of a streamed run, as saved in its staging folder."""

    folder: Path
    fingerprint: dict
    finished: int = 0  # blocks 0 .. finished-1 are done (pruned and written, or left dense)
    report: dict = field(default_factory=dict)  # the report entries they produced: layers, prune_breakdown, allocation, dense figures
    writable: bool = True  # False for the ranks but rank 0 of a run on several ranks: they read rank 0's state, never write it

    @classmethod
    def start(cls, folder: Path, fingerprint: dict, resume: bool) -> tuple[ResumeState, str | None]:
        """The state to carry on from (with --resume and a state of the same run in `folder`), or a fresh one; with a
        note for the report when something earlier was found."""
        path = folder / STATE
        if not path.is_file():
            return cls(folder, fingerprint), ("--resume found no unfinished run to continue; started from the beginning" if resume else None)
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not resume:
            return cls(folder, fingerprint), f"an unfinished earlier run ({saved['finished']} blocks done) was discarded; --resume continues one"
        differences = describe_differences(saved["fingerprint"], fingerprint)
        if differences:
            raise PruningError(f"--resume: the unfinished run in {folder} had other {differences}; start it again without --resume")
        return cls(folder, fingerprint, saved["finished"], saved["report"]), f"resumed after {saved['finished']} finished blocks of an earlier run"

    def finished_block(self, index: int, layers: list, breakdown: dict) -> None:
        """Block `index` is written: save it as finished, with the report's layer entries (LayerReports) and time so far."""
        self.finished = index + 1
        self.report.update(layers=[dataclasses.asdict(layer) for layer in layers], prune_breakdown=breakdown)
        self.save()

    def save(self) -> None:
        if self.writable:
            write_text(self.folder / STATE, json.dumps({"fingerprint": self.fingerprint, "finished": self.finished, "report": self.report}))

    def done(self) -> None:
        """The run is complete: no state to resume from is left behind."""
        if self.writable:
            (self.folder / STATE).unlink(missing_ok=True)


def describe_differences(saved: dict, current: dict) -> str:
    """What differs between two fingerprints, in words: 'settings (nsamples 8 -> 16)', 'model files', 'calibration data'."""
    parts = []
    saved_settings, settings = saved.get("settings", {}), current.get("settings", {})
    changed = sorted(key for key in set(saved_settings) | set(settings) if saved_settings.get(key) != settings.get(key))
    if changed:
        parts.append("settings (" + ", ".join(f"{key} {saved_settings.get(key)!r} -> {settings.get(key)!r}" for key in changed) + ")")
    for key, words in (("model", "model files"), ("calibration", "calibration data"), ("evaluation", "evaluation data")):
        if saved.get(key) != current.get(key):
            parts.append(words)
    return ", ".join(parts)

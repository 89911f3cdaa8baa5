"""DeepSpeed's checkpoint file I/O for goldfish_ds checkpoints: every file hashed while it is written, write errors
kept instead of raised (so a rank whose disk is full stays in step with the others), and every file read with
`torch.load(weights_only=True, mmap=True)`. See goldfish_ds/training/checkpoint.py for the checkpoints themselves.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch
from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from goldfish_ds.training.checkpoint import describe_error

# The classes besides tensors and builtins that DeepSpeed 0.19.8 pickles into the files of our ZeRO checkpoints
# (torch.serialization.get_unsafe_globals_in_checkpoint): in each optimizer-state file, the ZeRO stage as an enum
# ("zero_stage") and the loss scaler object ("loss_scaler": a LossScaler in fp32 and bf16 runs, a
# DynamicLossScaler with fp16's dynamic scaling). The model-state files need none. torch.load(weights_only=True)
# refuses every other class, and runs no code from the file.
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum]


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256")
_OVERLAP_BYTES = 1 << 20  # larger writes are hashed on _HASHER while the file is written


class _HashingFile:
    """A binary file that hashes and counts what is written through it, and keeps the OSError a write raised
    (torch.save reports it as a RuntimeError of its own). A large block is hashed in a thread while it is
    written (both release the GIL), so hashing adds little to a save that is bound by the disk."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.size, self.error = file, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        hashing = _HASHER.submit(self.sha256.update, data) if size >= _OVERLAP_BYTES else None
        try:
            written = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        finally:
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.sha256.update(data)
        self.size += size
        return written

    def flush(self) -> None:
        self.file.flush()


class VerifiedCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint file I/O for our checkpoints (installed on the engine by `install_verified_engine`).

    Saving, each file is written in torch's zip format, hashed while it is written and fsynced; its manifest
    entry is kept in `files` (paths relative to the checkpoint directory). The first failure is kept in `error`
    and not raised, and nothing more is written in that save: the rank goes on through DeepSpeed's collectives.
    Loading is `torch.load(weights_only=True, mmap=True)` with DeepSpeed's classes allowed (DEEPSPEED_SAFE_GLOBALS):
    no code runs from the file, and tensors are paged in from it instead of read into memory first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = "goldfish_ds.VerifiedCheckpointEngine"
        self.begin(Path("."))

    def begin(self, directory: Path) -> None:
        """Start a save into `directory`: forget the previous one's files and error."""
        self.directory, self.files, self.error = directory, {}, None

    def guarded(self, path: Path, action: Callable[[], object]) -> None:
        """Run `action`, which writes `path`, unless an earlier write of this save failed; keep its error."""
        if self.error is None:
            try:
                action()
            except Exception as e:  # a write that failed, whatever the writer's exception type
                self.error = f"could not write {path}: {describe_error(e)}"

    def write(self, path: Path, write: Callable[[BinaryIO], None]) -> None:
        """Write file `path` (a file of this save's directory) with `write(file)`, hashing and fsyncing it."""
        def action() -> None:
            with path.open("wb") as f:
                hashing = _HashingFile(f)
                try:
                    write(hashing)
                    f.flush()
                    os.fsync(f.fileno())
                except Exception as e:
                    raise (hashing.error or e) from None
            self.files[str(path.relative_to(self.directory))] = {"bytes": hashing.size,
                                                                 "sha256": hashing.sha256.hexdigest()}
        self.guarded(path, action)

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.guarded(Path(path), lambda: os.makedirs(path, exist_ok=exist_ok))

    def save(self, state_dict: dict, path: str) -> None:
        self.write(Path(path), lambda f: torch.save(state_dict, f))

    def load(self, path: str, map_location=None):
        return load_deepspeed_file(path, map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True


def load_deepspeed_file(path: str | Path, map_location=None):
    """One of DeepSpeed's checkpoint files, memory-mapped (tensors are paged in from the file as they are read)
    and unpickled with weights_only=True: tensors, containers and DEEPSPEED_SAFE_GLOBALS only."""
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


def install_verified_engine(engine) -> VerifiedCheckpointEngine:
    """Make `engine` (a DeepSpeedEngine) write and read its checkpoint files through a VerifiedCheckpointEngine;
    returns it. DeepSpeed copies its recovery scripts with shutil outside the checkpoint engine: that copy is
    guarded the same way, so a full disk there too leaves the rank in step with the others."""
    if not isinstance(engine.checkpoint_engine, VerifiedCheckpointEngine):
        ours = VerifiedCheckpointEngine()
        engine.checkpoint_engine = ours
        copy_scripts = engine._copy_recovery_script
        engine._copy_recovery_script = lambda save_path: ours.guarded(Path(save_path), lambda: copy_scripts(save_path))
    return engine.checkpoint_engine

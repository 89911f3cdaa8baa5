"""Atomic, verified DeepSpeed checkpoints: a crash or a full disk at any point never leaves a partial checkpoint
marked "latest", and a damaged checkpoint is found before it is loaded.

Layout of `root` (out_dir/checkpoints): one directory per complete checkpoint, `step_00000100/`, holding
DeepSpeed's files (model and optimizer shards of every rank; its zero_to_fp32.py goes next to the directories),
`client_state.json` (step, data position, settings; rank 0), one `rank_XXXXX.safetensors` per rank (its RNG
states, tensors with JSON metadata), and `manifest.json`, the size and sha256 of every other file, written last;
and `latest`, the tag of the newest complete one. DeepSpeed's own `latest` file is not used.

Saving goes to `step_XXXXXXXX.partial/`. Every rank writes its files through `VerifiedCheckpointEngine`, which
hashes and fsyncs each file as it writes it and records an I/O error (ENOSPC, EIO...) instead of raising it, so
the rank still takes part in every collective of DeepSpeed's save. One all_gather then tells every rank every
rank's status and file entries: after a failure every rank raises CheckpointError naming the rank, the file and
the error, rank 0 removes the partial directory, and `latest` still names the previous checkpoint. Otherwise rank
0 writes the manifest, renames the directory to its final name and replaces `latest` (atomic renames), then
broadcasts whether that worked.

Loading: `resume_tag` picks the checkpoint (the newest valid one, or a named one) after `verify` checked its
manifest (sizes, or sha256 too; the files are split between the ranks). DeepSpeed's files are read by its loader
through our engine with `torch.load(weights_only=True, mmap=True)`; our own state is JSON and safetensors.
`check_shared_directory` makes sure at start that every rank sees the same out_dir, as the checkpoints need.
"""
from __future__ import annotations

import errno
import json
import os
import random
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from goldfish_ds.files import sha256_file
from goldfish_ds.training.faults import maybe_crash
from goldfish_ds.training.reshard import load_resharded

if TYPE_CHECKING:  # imported where it is used: deepspeed must not be imported before the accelerator is chosen
    from goldfish_ds.training.checkpoint_engine import VerifiedCheckpointEngine

PARTIAL = ".partial"
MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.json"
LATEST = "latest"

class CheckpointError(Exception):
    """A checkpoint that could not be written, or that is missing or damaged; the message names the file."""


def describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in errno.errorcode:
        return f"{errno.errorcode[error.errno]} ({error.strerror})"
    return f"{type(error).__name__}: {error}"


def use_verified_engine(engine) -> VerifiedCheckpointEngine:
    """`engine`'s (a DeepSpeedEngine's) VerifiedCheckpointEngine, installed on first use."""
    from goldfish_ds.training.checkpoint_engine import install_verified_engine

    return install_verified_engine(engine)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_shared_directory(directory: Path) -> None:
    """Every rank must see the same `directory` (--out_dir): rank 0 writes a file with a random token there and
    every rank reads it back. A rank that does not see it (a node-local disk where the others have shared
    storage) is an error on every rank, naming the directory and the ranks, before anything is trained."""
    if dist.get_world_size() == 1:
        return
    token = [secrets.token_hex(16) if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".shared_{token[0]}").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    probe = directory / f".shared_{token[0]}"  # a new name each time: no client can have cached its absence
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink()
    blind = [f"{rank} on {host}" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ValueError(f"--out_dir {directory} is not shared by every rank: ranks {', '.join(blind)} do not see "
                         f"the file rank 0 wrote there ({probe.name}). Every rank writes its checkpoint shards "
                         f"into out_dir: it must be one directory on storage every host mounts at the same path")


# ---- our own state: RNGs per rank (safetensors), the client state (JSON) ----------------------------------

def rank_state_path(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.safetensors"


def rank_state_bytes(world_size: int) -> bytes:
    """This rank's RNG states (torch, CUDA, numpy, Python) and the job's world size as a safetensors file."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
               "python": torch.tensor(python_state, dtype=torch.int64)}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{i}": state for i, state in enumerate(cuda)})
    metadata = {"world_size": world_size, "cuda_devices": len(cuda),
                "numpy": [kind, position, has_gauss, cached_gaussian], "python": [version, gauss_next]}
    return safetensors_bytes(tensors, metadata={"state": json.dumps(metadata)})


def read_rank_state(directory: Path, rank: int) -> dict:
    """Rank `rank`'s state in checkpoint `directory`: {"world_size": int, "rng": {"torch": ByteTensor, "cuda":
    [ByteTensor] or None, "numpy": the np.random.get_state() tuple, "python": the random.getstate() tuple}}."""
    path = rank_state_path(directory, rank)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    kind, position, has_gauss, cached_gaussian = meta["numpy"]
    version, gauss_next = meta["python"]
    return {"world_size": meta["world_size"], "rng": {
        "torch": tensors["torch"],
        "cuda": [tensors[f"cuda_{i}"] for i in range(meta["cuda_devices"])] or None,
        "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian),
        "python": (version, tuple(tensors["python"].tolist()), gauss_next)}}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_client_state(directory: Path) -> dict:
    """The client state (the trainer's step, data position and settings) of checkpoint `directory`."""
    return json.loads((directory / CLIENT_STATE).read_text())


# ---- the manifest ----------------------------------------------------------------------------------------

def check_file(path: Path, entry: dict, hashes: bool) -> str | None:
    """None if `path` has the size (and, with hashes, the sha256) of its manifest entry; else what is wrong."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, its manifest says {entry['bytes']} (truncated or overwritten)"
    if hashes and sha256_file(path) != entry["sha256"]:
        return f"{path} does not have the sha256 of its manifest (its contents changed after the save)"
    return None


class CheckpointManager:
    """Saves, verifies and finds complete checkpoints under `root`, keeping the newest `keep`."""

    def __init__(self, root: str, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def latest_tag(self) -> str | None:
        """The tag `latest` names (the newest complete checkpoint), or None."""
        latest = self.root / LATEST
        return latest.read_text().strip() if latest.is_file() else None

    def tags(self) -> list[str]:
        """The tags of the complete checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)),
                      reverse=True)

    def remove_partial(self) -> None:
        """Delete what interrupted saves left behind (rank 0; every rank calls it)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"*{PARTIAL}"):
                shutil.rmtree(path)
        dist.barrier()

    # ---- saving -----------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> str:
        """Write checkpoint `step_<step>` (every rank calls it) and make it the latest; returns its tag. Raises
        CheckpointError on every rank if any rank could not write its files (the previous checkpoint stays
        the latest)."""
        tag = f"step_{step:08d}"
        partial = self.root / (tag + PARTIAL)
        files = use_verified_engine(engine)
        files.begin(partial)
        if self.rank == 0:
            def prepare() -> None:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            files.guarded(partial, prepare)
        self._all_wrote(files, partial)  # a barrier: the directory exists for every rank
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state={}, save_latest=False)
        maybe_crash("checkpoint", step)
        files.write(rank_state_path(partial, self.rank), lambda f: f.write(rank_state_bytes(self.world_size)))
        if self.rank == 0:
            files.write(partial / CLIENT_STATE, lambda f: f.write(json.dumps(client_state, indent=1).encode()))
        entries = self._all_wrote(files, partial)
        commit_error = [None]
        if self.rank == 0:
            try:
                self._commit(partial, tag, entries)
            except Exception as e:
                commit_error[0] = f"rank 0 could not commit {partial}: {describe_error(e)}"
                shutil.rmtree(partial, ignore_errors=True)
        dist.broadcast_object_list(commit_error, src=0)
        if commit_error[0]:
            raise CheckpointError(self._failed(partial, commit_error[0]))
        return tag

    def _all_wrote(self, files: VerifiedCheckpointEngine, partial: Path) -> dict:
        """Every rank's write status (one all_gather): the manifest entries of all ranks, or CheckpointError on
        every rank when one failed (rank 0 then removes the partial directory)."""
        statuses = [None] * self.world_size
        dist.all_gather_object(statuses, (files.error, files.files))
        failed = [f"rank {rank} {error}" for rank, (error, _) in enumerate(statuses) if error]
        if failed:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(self._failed(partial, "; ".join(failed)))
        return {name: entry for _, entries in statuses for name, entry in entries.items()}

    def _failed(self, partial: Path, why: str) -> str:
        return (f"checkpoint {partial} was not written: {why}. It was removed; the latest complete checkpoint is "
                f"still {self.latest_tag() or '(none)'}. Free space on the checkpoint disk (or fix it), then "
                f"continue with --resume")

    def _commit(self, partial: Path, tag: str, entries: dict) -> None:
        """Rank 0: the manifest (hashing any file of the directory no rank's engine wrote), then the renames
        that make `tag` complete and the latest, then pruning."""
        for path in sorted(partial.iterdir()):
            if path.name not in entries:
                entries[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        manifest = partial / MANIFEST
        with manifest.open("w") as f:
            json.dump({"tag": tag, "files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(partial)
        final = self.root / tag
        if final.exists():  # the same step again after a resume from an older checkpoint
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = self.root / f"{LATEST}.tmp"
        tmp.write_text(tag)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync_dir(self.root)
        self._prune(keep_tag=tag)

    def _prune(self, keep_tag: str) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))
        for path in complete[:-self.keep]:
            if path.name != keep_tag:
                shutil.rmtree(path)

    # ---- verifying and loading --------------------------------------------------------------------------
    def verify(self, tag: str, hashes: bool) -> str | None:
        """None if every file in checkpoint `tag`'s manifest is there with its size (and, with `hashes`, its
        sha256); otherwise what is wrong, naming the file. Every rank calls it: rank r checks every
        world_size-th file from the r-th."""
        directory = self.root / tag
        problem = None
        try:
            manifest = json.loads((directory / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            problem = f"{directory / MANIFEST} is missing (the checkpoint has no sizes and hashes to check)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{directory / MANIFEST} is unreadable ({describe_error(e)})"
        if problem is None:
            names = sorted(manifest)
            problem = next(filter(None, (check_file(directory / name, manifest[name], hashes)
                                         for name in names[self.rank::self.world_size])), None)
        problems = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        return next(filter(None, problems), None)

    def resume_tag(self, resume_from: str | None, verify_hashes: bool) -> str:
        """The checkpoint to resume from: `resume_from` if given (CheckpointError if it is absent or damaged),
        else the newest valid one at or before `latest` (a newer directory is left from a run that went on from
        an older checkpoint); rank 0 says which damaged ones it skipped and why. Every rank calls it."""
        tags = self.tags()
        if resume_from is not None:
            if resume_from not in tags:
                raise CheckpointError(f"--resume_from {resume_from}: no such checkpoint in {self.root}; the "
                                      f"complete ones are: {', '.join(tags) or '(none)'}")
            problem = self.verify(resume_from, verify_hashes)
            if problem:
                raise CheckpointError(f"--resume_from {resume_from}: the checkpoint is damaged: {problem}")
            return resume_from
        latest = self.latest_tag()
        skipped = []
        if latest is not None and latest not in tags:
            skipped.append(f"{self.root / latest}: `latest` names it, but it is missing")
        for tag in (t for t in tags if latest is None or t <= latest):
            problem = self.verify(tag, verify_hashes)
            if problem is None:
                if self.rank == 0:
                    for message in skipped:
                        print(f"--resume: skipped damaged checkpoint {message}", file=sys.stderr, flush=True)
                return tag
            skipped.append(f"{self.root / tag}: {problem}")
        raise CheckpointError(f"--resume: no valid checkpoint in {self.root}" +
                              "".join(f"\n  {message}" for message in skipped))

    def load(self, engine, tag: str, reshard_to: dict | None = None) -> dict:
        """Load checkpoint `tag` into `engine` and restore this rank's RNGs; returns the client state. With
        `reshard_to` (this job's Job.layout(), for --reshard) a ZeRO-3 checkpoint of another data-parallel size
        is converted on loading (goldfish_ds.training.reshard; RNG states not restored)."""
        directory = self.root / tag
        if reshard_to is not None:
            return load_resharded(engine, directory, read_client_state(directory), reshard_to)
        if not rank_state_path(directory, self.rank).is_file():
            raise CheckpointError(f"checkpoint {directory} has no state for rank {self.rank}: it was written by a "
                                  f"job of another size (this one has {self.world_size} ranks); add --reshard to "
                                  "continue it at another data-parallel size")
        rank_state = read_rank_state(directory, self.rank)
        if rank_state["world_size"] != self.world_size:
            raise CheckpointError(f"checkpoint {directory} was written by {rank_state['world_size']} ranks; this "
                                  f"job has {self.world_size}: resume with the same world size and layout, or add "
                                  "--reshard to continue it at another data-parallel size")
        use_verified_engine(engine)
        path, _ = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {directory}")
        set_rng_states(rank_state["rng"])
        return read_client_state(directory)

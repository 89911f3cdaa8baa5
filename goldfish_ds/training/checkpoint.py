"""Atomic DeepSpeed checkpoints: a crash at any point never leaves a partial checkpoint marked "latest".

Layout of `root` (out_dir/checkpoints): one directory per complete checkpoint, `step_00000100/`, holding
DeepSpeed's files (model and optimizer shards of every rank, our client state with the step and the
data position) and one `rank_XXXXX.pt` per rank (its RNG states); and `latest`, the tag of the newest
complete one. A save goes to `step_XXXXXXXX.partial/`; when every rank has written its files (a
barrier), rank 0 syncs them to disk, renames the directory to its final name and then replaces `latest`
(both atomic renames). DeepSpeed's own `latest` file is not used. `check_shared_directory` makes sure at
start that every rank sees the same out_dir, as the checkpoints need.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from goldfish_ds.training.faults import maybe_crash
from goldfish_ds.training.reshard import load_resharded

PARTIAL = ".partial"


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


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


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CheckpointManager:
    """Saves and finds complete checkpoints under `root`, keeping the newest `keep`."""

    def __init__(self, root: str, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint's tag, or None."""
        latest = self.root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"{latest} names {tag!r}, which is missing from {self.root}")
        return tag

    def remove_partial(self) -> None:
        """Delete what interrupted saves left behind (rank 0; every rank calls it)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(f"*{PARTIAL}"):
                shutil.rmtree(path)
        dist.barrier()

    def save(self, engine, step: int, client_state: dict) -> str:
        """Write checkpoint `step_<step>` (every rank calls it) and make it the latest; returns its tag."""
        tag = f"step_{step:08d}"
        partial = tag + PARTIAL
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / partial, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=partial, client_state=client_state, save_latest=False)
        maybe_crash("checkpoint", step)
        rank_file = self.root / partial / f"rank_{self.rank:05d}.pt"
        torch.save({"rng": rng_states(), "world_size": self.world_size}, rank_file)
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            _fsync_tree(self.root / partial)
            final = self.root / tag
            if final.exists():  # the same step again after a resume from an older checkpoint
                shutil.rmtree(final)
            os.replace(self.root / partial, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.root / "latest")
            _fsync_dir(self.root)
            self._prune(keep_tag=tag)
        dist.barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))
        for path in complete[:-self.keep]:
            if path.name != keep_tag:
                shutil.rmtree(path)

    def load(self, engine, tag: str, reshard_to: dict | None = None) -> dict:
        """Load checkpoint `tag` into `engine` and restore this rank's RNGs; returns the client state. With
        `reshard_to` (this job's Job.layout(), for --reshard) a ZeRO-3 checkpoint of another data-parallel size
        is converted on loading (goldfish_ds.training.reshard; RNG states not restored)."""
        if reshard_to is not None:
            return load_resharded(engine, self.root / tag, reshard_to)
        rank_file = self.root / tag / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise ValueError(f"checkpoint {self.root / tag} has no state for rank {self.rank}: it was written by a "
                             f"job of another size (this one has {self.world_size} ranks); add --reshard to "
                             "continue it at another data-parallel size")
        rank_state = torch.load(rank_file, weights_only=False)
        if rank_state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {self.root / tag} was written by {rank_state['world_size']} ranks; this job "
                             f"has {self.world_size}: resume with the same world size and layout, or add --reshard "
                             "to continue it at another data-parallel size")
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        set_rng_states(rank_state["rng"])
        return client_state

"""Where training metrics go (rank 0): out_dir/metrics.jsonl, a console progress bar, TensorBoard when the
`tensorboard` package is installed, and Weights & Biases when a project is given (`wandb`, its run under
out_dir/wandb; WANDB_MODE=offline works without a network); and every rank's peak host memory per phase, in
out_dir/memory.jsonl.

Each metrics.jsonl record has "kind" ("train" or "val") and "step". On resume the records after the resumed
step are dropped first, so the file always describes one uninterrupted run (so is a last line torn by a crash
mid-write, with a warning). memory.jsonl gets one record per rank and phase each time a process runs the phase
(HostMemoryPhases): the resident set size when the phase began and its peak during the phase (Linux only).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

GIB = 2**30


def _status_bytes(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return None
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def reset_peak_rss() -> int | None:
    """Reset this process's peak resident set size (VmHWM) to its current one, which it returns in bytes
    (None where /proc/self is not Linux's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes since the last reset_peak_rss (or its start)."""
    return _status_bytes("VmHWM")


class HostMemoryPhases:
    """Every rank's peak host memory per phase of a job, appended by rank 0 to out_dir/memory.jsonl.

    `with phases.measure("checkpoint"): ...` records {"kind": "memory", "phase", "rank", "start_rss_gib",
    "peak_rss_gib"} for every rank when the block ends (one gather_object: every rank must measure the same
    phases in the same order). A phase measured inside another (a checkpoint during training) pauses it: the
    outer phase's peak is the highest of its own stretches. A block that raises records nothing (the other
    ranks may not reach the gather). Nothing is recorded where /proc/self is not Linux's.
    """

    def __init__(self, out_dir: str) -> None:
        self.path = Path(out_dir) / "memory.jsonl"
        self._open: list[list] = []  # [phase, start rss, peak of its earlier stretches], innermost last

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        if self._open:
            self._open[-1][2] = max(self._open[-1][2], peak_rss_bytes() or 0)
        self._open.append([phase, reset_peak_rss(), 0])
        try:
            yield
        except BaseException:
            self._open.pop()
            raise
        _, start, earlier = self._open.pop()
        peak = peak_rss_bytes()
        self._record(phase, start, None if peak is None else max(peak, earlier))
        reset_peak_rss()  # an outer phase goes on from here

    def _record(self, phase: str, start: int | None, peak: int | None) -> None:
        mine = None if start is None or peak is None else {
            "kind": "memory", "phase": phase, "rank": dist.get_rank(), "start_rss_gib": round(start / GIB, 4),
            "peak_rss_gib": round(peak / GIB, 4)}
        records = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, records, dst=0)
        if records is not None and None not in records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def _scalars(record: dict) -> dict:
    """The record's numbers as "kind/key" scalars (TensorBoard tags, W&B keys); None values are left out."""
    return {f"{record['kind']}/{key}": value for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MetricsLogger:
    """Rank 0's records to metrics.jsonl, TensorBoard and W&B (wandb_project: its project; wandb_run_name
    defaults to out_dir's name; wandb_config: the run's settings shown in W&B). Other ranks pass enabled=False."""

    def __init__(self, out_dir: str, *, enabled: bool, start_step: int, max_steps: int, progress: bool,
                 wandb_project: str | None = None, wandb_run_name: str | None = None,
                 wandb_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = self._bar = self._tb = self.tensorboard_dir = self._wandb = self.wandb_dir = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not progress,
                         dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self.tensorboard_dir = str(Path(out_dir) / "tensorboard")
            self._tb = SummaryWriter(self.tensorboard_dir, purge_step=start_step + 1)
        if wandb_project is not None:
            import wandb  # optional: arguments.parse_args checks that it is installed

            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name or Path(out_dir).resolve().name,
                                     dir=out_dir, config=wandb_config)
            if not self._wandb.disabled:
                self.wandb_dir = self._wandb.settings.sync_dir

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to `step`. A last line that is not JSON (a crash mid-write tore it) is dropped
        with a warning on stderr; one elsewhere is an error naming the line."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number < len(lines):
                    raise ValueError(f"{self.path}: record {number} of {len(lines)} is not JSON ({e}): "
                                     f"{line[:80]!r}") from None
                print(f"{self.path}: dropped its last line, cut short by an interrupted write: {line[:80]!r}",
                      file=sys.stderr, flush=True)
                continue
            if record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        """Append one record (a dict with "kind" and "step" and numbers)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = _scalars(record)
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if record["kind"] == "train":
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        elif record["kind"] == "val":
            self._bar.write(f"step {record['step']}: validation loss {record['val_loss']:.4f}")
        else:  # a skipped step, a loss spike
            self._bar.write(f"step {record['step']}: {record['kind']} " + json.dumps(
                {k: v for k, v in record.items() if k not in ("kind", "step", "rows")}))

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self._bar.update(steps)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            self._bar.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def last_record(self, kind: str) -> dict | None:
        """The newest record of a kind in the file (for the end-of-run summary)."""
        if not self.path.is_file():
            return None
        records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return next((r for r in reversed(records) if r["kind"] == kind), None)

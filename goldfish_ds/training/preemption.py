"""Stopping a job early and cleanly: on SIGTERM or SIGUSR1 (what Slurm sends before a preemption or the time
limit, the latter with `--signal`), or when a wall-clock budget (--exit_after_minutes) runs out.

A signal may reach any one rank (or all of them, at different moments); the handler only notes it. Once per
optimizer step every rank calls `StopRequests.agreed()`, one all-reduce (MAX) of two integers over the WORLD
group: the signal any rank received, and whether rank 0's clock passed the budget. Every rank gets the same
answer at the same step, so all of them finish that step, write one checkpoint and exit with
PREEMPTED_EXIT_STATUS. A signal that arrives during validation or a checkpoint save is noted and acted on at
the end of that step, after the save completed.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h: stopped early with a checkpoint; run again with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Notes stop signals and the wall-clock budget; `agreed()` turns them into one decision for all ranks.

    exit_after_minutes: the budget, counted from this object's creation on rank 0's clock (None: no budget).
    device: where the all-reduced flags live (the job's device: NCCL needs a GPU tensor).
    """

    def __init__(self, exit_after_minutes: float | None, device: torch.device) -> None:
        self.received: int = 0  # the first stop signal this process received, 0 for none
        self.device = device
        self._deadline = (time.monotonic() + 60.0 * exit_after_minutes
                          if exit_after_minutes is not None and dist.get_rank() == 0 else None)
        self._previous = {}

    def install(self) -> None:
        """Catch STOP_SIGNALS from now on (the main thread's handlers; `uninstall` restores the old ones)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self) -> str | None:
        """Whether the job stops now, the same on every rank (every rank must call it, once per step): the
        reason ("SIGTERM", "SIGUSR1", "exit_after_minutes") or None. One all-reduce over the WORLD group."""
        spent = self._deadline is not None and time.monotonic() >= self._deadline
        flags = torch.tensor([self.received, int(spent)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, spent = flags.tolist()
        if signum:
            return signal.Signals(signum).name
        return "exit_after_minutes" if spent else None

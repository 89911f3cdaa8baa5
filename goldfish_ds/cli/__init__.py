"""The command-line programs: each module's `main` is a console command (goldfish-pretrain, ...) and what
the matching scripts/*.py runs."""
from __future__ import annotations

import os
import sys


def restart_with_passive_openmp(module: str) -> None:
    """Run this command (module's main) again with OMP_WAIT_POLICY=PASSIVE, unless the variable is set.

    OpenMP reads the variable once, when torch loads, which is before any command's code runs. Idle threads
    then sleep instead of spinning: on busy cores, spinning threads made greedy extraction with the tiny model
    10-25x slower (measured: 45-116 s against 4.5 s).
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        # The same sys.argv, so argparse names the program as the user called it.
        code = f"import sys; sys.argv[0] = {sys.argv[0]!r}; from {module} import main; main()"
        os.execv(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]])

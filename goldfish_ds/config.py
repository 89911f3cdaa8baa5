"""GoldfishConfig: which target tokens the goldfish loss leaves out, validated once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

# Strategy name -> code understood by the compiled kernels (csrc/goldfish_hash.h).
STRATEGIES = {
    "hash-table": 0,      # official (the released models): product of the window, lookup in a random table
    "static": 1,          # official: every k-th position from start_position
    "hash-avalanche": 2,  # official: product of the window, Thomas Wang 32-bit integer mix
    "random": 3,          # ablation: a fresh random mask every step, seeded
    "hash-rolling": 4,    # ours: order-sensitive rolling hash of the window, exact 1/k rate for any h
}
WINDOWS = ("inclusive", "preceding")


@dataclass(frozen=True)
class GoldfishConfig:
    """Settings of the goldfish loss.

    k: drop about 1/k of the target tokens (k >= 2).
    h: context width of the hash strategies: how many label tokens decide whether a target is dropped.
    strategy: one of STRATEGIES (see README for the trade-offs).
    ignore_index: label value that is never counted (padding); such positions are never "dropped".
    start_position: first dropped position of the "static" strategy.
    window: "inclusive" (official code: the target and its h-1 predecessors) or "preceding"
        (the paper's formula: the h tokens before the target).
    exempt_ids: label ids that are never dropped (BOS/EOS/pad/chat markers).
    table_path: hash-table strategy only: a file holding the 1,000,003 float32 table values
        (raw little-endian float32, or a tensor saved with torch.save); None builds the official
        table on the CPU (identical masks on every device).
    seed: random strategy only: the seed of the per-step masks.
    boundary_id: None (the official behaviour: a row is one sequence) or a label id that ends a document, e.g.
        the tokenizer's EOS: each row is then masked as if it were cut into segments after every label equal to
        boundary_id, each segment a row of its own. A hashed target is dropped only if its window holds no
        boundary label other than the target itself (no window spans two documents); the static strategy
        counts positions from the segment start; the random strategy is unchanged.
    """

    k: int
    h: int
    strategy: str = "hash-table"
    ignore_index: int = -100
    start_position: int = 0
    window: str = "inclusive"
    exempt_ids: Tuple[int, ...] = field(default_factory=tuple)
    table_path: Optional[str] = None
    seed: int = 0
    boundary_id: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"GoldfishConfig: k must be an integer >= 2 (drop about 1/k of the tokens), got {self.k!r}")
        if isinstance(self.h, bool) or not isinstance(self.h, int) or self.h < 1:
            raise ValueError(f"GoldfishConfig: h must be an integer >= 1 (the hashed context width), got {self.h!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"GoldfishConfig: strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"GoldfishConfig: window must be one of {list(WINDOWS)}, got {self.window!r}")
        if not isinstance(self.start_position, int) or self.start_position < 0:
            raise ValueError(f"GoldfishConfig: start_position must be an integer >= 0, got {self.start_position!r}")
        if not isinstance(self.ignore_index, int):
            raise ValueError(f"GoldfishConfig: ignore_index must be an integer, got {self.ignore_index!r}")
        if not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"GoldfishConfig: seed must be a 64-bit integer, got {self.seed!r}")
        if self.boundary_id is not None and (isinstance(self.boundary_id, bool) or not isinstance(self.boundary_id, int)
                                             or not -(2**63) <= self.boundary_id < 2**63):
            raise ValueError("GoldfishConfig: boundary_id must be None (no document boundaries) or a 64-bit integer "
                             f"label id (e.g. the tokenizer's EOS), got {self.boundary_id!r}")
        ids = tuple(self.exempt_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"GoldfishConfig: exempt_ids must be integers, got {self.exempt_ids!r}")
        object.__setattr__(self, "exempt_ids", tuple(sorted(set(ids))))
        if self.table_path is not None and self.strategy != "hash-table":
            raise ValueError("GoldfishConfig: table_path applies only to strategy='hash-table', "
                             f"got strategy={self.strategy!r}")

    @property
    def strategy_code(self) -> int:
        return STRATEGIES[self.strategy]

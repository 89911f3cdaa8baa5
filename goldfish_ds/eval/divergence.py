"""Divergence analysis: does a generation leave the true text at a token the goldfish loss dropped?

A goldfish model was never supervised on its dropped targets, so if goldfish works as intended its
generations depart from a memorized passage at those tokens far more often than the drop rate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.eval.documents import Document
from goldfish_ds.eval.extraction import ExtractionResult
from goldfish_ds.mask import goldfish_mask


@dataclass(frozen=True)
class DocumentDivergence:
    index: int
    first_divergence: int | None  # suffix position where the generation departs (None: exact match)
    on_dropped: bool | None       # whether that target was dropped in training (None: no divergence)
    suffix_dropped: list[bool]       # per suffix position, whether its target was dropped


@dataclass(frozen=True)
class DivergenceResult:
    documents: list[DocumentDivergence]
    num_divergences: int
    on_dropped_rate: float | None  # fraction of divergences landing on a dropped target (None: none diverged)
    suffix_drop_rate: float | None  # fraction of all suffix targets that were dropped (the chance level)

    def to_dict(self) -> dict:
        return asdict(self)


def suffix_dropped(ids: Sequence[int], prompt_length: int, n: int, cfg: GoldfishConfig) -> list[bool]:
    """Whether the goldfish loss dropped each of the n targets that follow a prompt of prompt_length tokens.

    As in training, the document sits at a row start: labels = ids[1:], the mask is computed on that row,
    and suffix position j (token ids[prompt_length + j]) is label index prompt_length - 1 + j.
    """
    if prompt_length < 1 or prompt_length + n > len(ids):
        raise ValueError(f"suffix_dropped: need 1 <= prompt_length and prompt_length + n <= len(ids), got "
                         f"prompt_length={prompt_length}, n={n}, len(ids)={len(ids)}")
    dropped = goldfish_mask(torch.tensor(list(ids[1:]), dtype=torch.long), cfg)
    return dropped[prompt_length - 1:prompt_length - 1 + n].tolist()


def divergence(results: Sequence[ExtractionResult], documents: Sequence[Document],
               cfg: GoldfishConfig) -> DivergenceResult:
    """Where each extraction departed from the truth, against the goldfish mask `cfg` of its document."""
    by_index = {doc.index: doc for doc in documents}
    rows = []
    for r in results:
        dropped = suffix_dropped(by_index[r.index].ids, r.prompt_length, len(r.truth), cfg)
        at = r.first_divergence
        rows.append(DocumentDivergence(r.index, at, None if at is None else dropped[at], dropped))
    diverged = [row.on_dropped for row in rows if row.first_divergence is not None]
    positions = sum(len(row.suffix_dropped) for row in rows)
    return DivergenceResult(
        documents=rows, num_divergences=len(diverged),
        on_dropped_rate=sum(diverged) / len(diverged) if diverged else None,
        suffix_drop_rate=sum(sum(row.suffix_dropped) for row in rows) / positions if positions else None)

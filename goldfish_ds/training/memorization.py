"""Memorization measured while training: the extraction attack of goldfish_ds.eval, run inside the job.

Every --memorization_eval_interval steps each document (by default the canaries of the training data, with the
exact ids they were trained on) is split as the evaluation splits it (split_document: prompt = all but the last
n tokens), the n tokens after the prompt are decoded greedily by the job's own model, in its own layout, and the
results are scored by the evaluation's functions (score_extraction, summarize_extraction): in fp32 the tokens and
numbers are those of `goldfish-evaluate-memorization` (HF generate) on an HF export of the same step.

Decoding is plain: no KV cache. Prompts are right-padded into a batch, and at decode step i the next token of
row r is the argmax at position len_r + i - 1 (causal attention: the padding after it cannot change it); the
whole batch is recomputed for each new token, so one evaluation costs n forward passes of every batch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from goldfish_ds.data import Tokenizer
from goldfish_ds.data.packed import CANARY_TEXTS
from goldfish_ds.eval.documents import make_documents, read_records
from goldfish_ds.eval.extraction import ExtractionResult, score_extraction, split_document, summarize_extraction
from goldfish_ds.parallel import data_parallel_rank, data_parallel_world_size
from goldfish_ds.parallel.state import tensor_parallel_group

RESULTS_DIR = "memorization"  # out_dir/memorization/step_XXXXXXXX.jsonl: one ExtractionResult per document
_FILLER_PROMPT = [0]  # the prompt of a filler row (a rank with no document left still runs the forwards)


@dataclass(frozen=True)
class Canary:
    """One evaluated document: its index in the input, the prompt, and the n true tokens after it."""

    index: int
    prompt: list[int]
    truth: list[int]


def memorization_canaries(data: str | None, train_data: str, suffix_len: int,
                          tokenizer: Tokenizer | None) -> list[Canary]:
    """The canaries of --memorization_data, or of the training data's canary.jsonl when it is None.

    Records with "ids" are used verbatim (the tokens as trained), records with only "text" are tokenized as
    BOS + text (goldfish_ds.eval.make_documents); documents shorter than suffix_len + 1 tokens are left out.
    Raises ValueError naming the options when there is no file or no document long enough.
    """
    path = data if data is not None else str(Path(train_data) / CANARY_TEXTS)
    if data is None and not Path(path).is_file():
        raise ValueError(f"--memorization_eval_interval needs documents to extract: the training data {train_data} "
                         f"has no {CANARY_TEXTS} (goldfish-prepare-data --canary writes one); give "
                         "--memorization_data FILE.jsonl (records with \"text\" and/or \"ids\")")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--memorization_data {path}: no such file")
    try:
        documents = make_documents(read_records(path), tokenizer)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--memorization_data {path}: {e}") from None
    canaries = []
    for doc in documents:
        split = split_document(doc.ids, suffix_len)
        if split is not None:
            canaries.append(Canary(doc.index, *split))
    if not canaries:
        raise ValueError(f"--memorization_data {path}: none of its {len(documents)} documents has more than "
                         f"--memorization_suffix_len {suffix_len} tokens: use a shorter suffix or longer documents")
    return canaries


@torch.no_grad()
def greedy_suffixes(model: torch.nn.Module, prompts: list[list[int]], n: int, device: torch.device) -> list[list[int]]:
    """n tokens decoded greedily after each prompt by a vocabulary-parallel Llama (logits: this rank's slice).

    The TP ranks of a group must pass the same prompts: at every step one all_gather over the TP group of
    the last positions' logit slices [B, V/tp] gives the full (padded, -inf) vocabulary, whose argmax (the
    first maximum, as torch.argmax and HF's greedy search take it) is the next token on every rank.
    """
    group = tensor_parallel_group()
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()) + n, dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    rows = torch.arange(len(prompts), device=device)
    for i in range(n):
        read = lengths + i - 1  # each row's last known token
        local = model(tokens[:, :int(read.max()) + 1])[rows, read]  # [B, V/tp]
        slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(slices, local.contiguous(), group=group)
        tokens[rows, read + 1] = torch.cat(slices, dim=-1).argmax(dim=-1)
    return [tokens[row, len(prompt):len(prompt) + n].tolist() for row, prompt in enumerate(prompts)]


class MemorizationEvaluation:
    """The extraction of `canaries` by the job's model, in its layout (ZeRO-3 and tensor parallelism).

    Every rank takes part: the canaries, sorted by prompt length, are dealt to the data-parallel ranks in turn
    and decoded in batches of `batch_size`; every rank runs the same number of batches (ZeRO-3 gathers the
    parameters collectively in every forward), a rank without canaries left decoding one filler row.
    """

    def __init__(self, canaries: list[Canary], suffix_len: int, batch_size: int, tokenizer: Tokenizer | None,
                 device: torch.device) -> None:
        if suffix_len < 1 or batch_size < 1:
            raise ValueError(f"MemorizationEvaluation: suffix_len and batch_size must be >= 1, got {suffix_len} and "
                             f"{batch_size}")
        self.canaries, self.n, self.batch_size = canaries, suffix_len, batch_size
        self.tokenizer, self.device = tokenizer, device

    def decode(self, model: torch.nn.Module) -> dict[int, list[int]]:
        """{canary index: its n decoded tokens} for this data-parallel rank's canaries."""
        dp_rank, dp_size = data_parallel_rank(), data_parallel_world_size()
        ordered = sorted(self.canaries, key=lambda c: len(c.prompt))
        mine = ordered[dp_rank::dp_size]
        decoded = {}
        for first in range(0, math.ceil(len(ordered) / dp_size), self.batch_size):
            batch = mine[first:first + self.batch_size]
            generated = greedy_suffixes(model, [c.prompt for c in batch] or [_FILLER_PROMPT], self.n, self.device)
            decoded.update((c.index, g) for c, g in zip(batch, generated))
        return decoded

    def evaluate(self, engine, step: int, out_dir: Path) -> dict | None:
        """Decode on every rank (eval mode, no gradients, the RNG states restored after), score on rank 0.

        Rank 0 writes every canary's ExtractionResult to out_dir/memorization/step_XXXXXXXX.jsonl and returns the
        "memorization" record (the summarize_extraction means, num_docs, suffix_len, seconds); others None.
        """
        start = time.perf_counter()
        engine.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                decoded = self.decode(engine)
        finally:
            engine.train()
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(decoded, gathered, dst=0)
        if gathered is None:
            return None
        for part in gathered[1:]:  # TP ranks of one group decoded the same rows
            decoded.update(part)
        results = [score_extraction(c.index, len(c.prompt), decoded[c.index], c.truth, self.tokenizer)
                   for c in self.canaries]
        path = out_dir / RESULTS_DIR / f"step_{step:08d}.jsonl"
        write_results(path, results)
        return {"kind": "memorization", "step": step, **summarize_extraction(results), "num_docs": len(results),
                "suffix_len": self.n, "seconds": time.perf_counter() - start,
                "results": str(path.relative_to(out_dir))}


def write_results(path: Path, results: list[ExtractionResult]) -> None:
    """One JSON line per document (ExtractionResult.to_dict()), written whole then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    tmp.replace(path)

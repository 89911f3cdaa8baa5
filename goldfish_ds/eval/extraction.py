"""Extraction attacks: prompt with a document's beginning, decode n tokens, compare with what follows.

The official protocol (Hans et al. 2024) prompts with everything before a document's last n = 50 tokens
and decodes greedily; the adversarial variant decodes with a 30-beam search.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from goldfish_ds.data import Tokenizer
from goldfish_ds.eval.documents import Document, decode_text


@dataclass(frozen=True)
class ExtractionResult:
    """One document's extraction: `generated` and `truth` are the n decoded and the n true suffix tokens."""

    index: int                       # the document's index in the input
    prompt_length: int
    generated: list[int]
    truth: list[int]
    exact_match: bool                # all n tokens equal
    token_match: float               # fraction of positions where generated == truth
    longest_run: int                 # longest run of consecutive positions where generated == truth
    first_divergence: int | None  # first position where generated != truth (None on an exact match)
    rougeL: float                    # RougeL F-measure of the decoded texts (Google's rouge-score)
    generated_text: str
    truth_text: str

    def to_dict(self) -> dict:
        return asdict(self)


def token_match_fraction(generated: Sequence[int], truth: Sequence[int]) -> float:
    """Fraction of positions j where generated[j] == truth[j] (equal lengths)."""
    _check_same_length(generated, truth)
    return sum(g == t for g, t in zip(generated, truth)) / len(truth) if truth else 0.0


def longest_match_run(generated: Sequence[int], truth: Sequence[int]) -> int:
    """Length of the longest run of consecutive positions where generated == truth (equal lengths)."""
    _check_same_length(generated, truth)
    best = run = 0
    for g, t in zip(generated, truth):
        run = run + 1 if g == t else 0
        best = max(best, run)
    return best


def first_divergence(generated: Sequence[int], truth: Sequence[int]) -> int | None:
    """First position where generated departs from truth, None if they are equal (equal lengths)."""
    _check_same_length(generated, truth)
    return next((j for j, (g, t) in enumerate(zip(generated, truth)) if g != t), None)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])  # no stemmer: the defaults of the official `evaluate` call


def rouge_l(generated_text: str, truth_text: str) -> float:
    """RougeL F-measure of a generation against the true text (rouge-score's default tokenization)."""
    return _rouge_scorer().score(truth_text, generated_text)["rougeL"].fmeasure


def _check_same_length(generated: Sequence[int], truth: Sequence[int]) -> None:
    if len(generated) != len(truth):
        raise ValueError(f"generated and truth must have equal lengths, got {len(generated)} and {len(truth)}")


def split_document(ids: Sequence[int], n: int, prefix_len: int | None = None) -> tuple[list[int], list[int]] | None:
    """(prompt, true suffix of n tokens), or None when the document is too short.

    prefix_len=None prompts with everything before the last n tokens (needs n + 1 tokens); otherwise the
    prompt is the first prefix_len tokens and the suffix the n after them (needs prefix_len + n tokens).
    """
    if prefix_len is None:
        return (list(ids[:-n]), list(ids[-n:])) if len(ids) >= n + 1 else None
    return (list(ids[:prefix_len]), list(ids[prefix_len:prefix_len + n])) if len(ids) >= prefix_len + n else None


def score_extraction(index: int, prompt_length: int, generated: list[int], truth: list[int],
                     tokenizer: Tokenizer | None) -> ExtractionResult:
    """One document's extraction metrics from its decoded and true suffixes (equal lengths); `tokenizer`
    decodes the texts for RougeL (ids as numbers without it)."""
    generated_text, truth_text = decode_text(generated, tokenizer), decode_text(truth, tokenizer)
    return ExtractionResult(
        index=index, prompt_length=prompt_length, generated=generated, truth=truth, exact_match=generated == truth,
        token_match=token_match_fraction(generated, truth), longest_run=longest_match_run(generated, truth),
        first_divergence=first_divergence(generated, truth), rougeL=rouge_l(generated_text, truth_text),
        generated_text=generated_text, truth_text=truth_text)


@torch.no_grad()
def generate_suffixes(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int,
                      num_beams: int = 1) -> list[list[int]]:
    """Exactly n tokens decoded after each prompt, greedily (num_beams=1) or by beam search, in one batch.

    Prompts are left-padded with an attention mask, so each row decodes as it would alone. End-of-sequence
    does not stop decoding: every row gets its n tokens, as the true suffixes have n.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # Any pad id works (padded positions are masked), but not 0: beam search reads pad id 0 as "none".
    input_ids = torch.ones(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    config = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=num_beams, num_return_sequences=1,
                              use_cache=True, eos_token_id=[], pad_token_id=1)  # [] stops nowhere; None = model EOS
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         generation_config=config)
    return out[:, width:].tolist()


def extract(model: torch.nn.Module, documents: Sequence[Document], n: int = 50, *, prefix_len: int | None = None,
            batch_size: int = 16, num_beams: int = 1, tokenizer: Tokenizer | None = None,
            progress: bool = False) -> list[ExtractionResult]:
    """Extraction attack on each document long enough (see split_document); the others are skipped.

    Documents are batched by prompt length (less padding); results come back in document order, and equal
    one-document-at-a-time decoding. `tokenizer` decodes the texts for RougeL (ids as numbers without it).
    """
    if n < 1 or batch_size < 1 or num_beams < 1:
        raise ValueError(f"extract: n, batch_size and num_beams must be >= 1, got {n}, {batch_size}, {num_beams}")
    if prefix_len is not None and prefix_len < 1:
        raise ValueError(f"extract: prefix_len must be >= 1 or None (prompt = all but the last n), got {prefix_len}")
    splits = [(doc, split_document(doc.ids, n, prefix_len)) for doc in documents]
    jobs = sorted(((doc, s) for doc, s in splits if s is not None), key=lambda job: len(job[1][0]))
    results = {}
    bar = tqdm(total=len(jobs), desc=f"extract ({'greedy' if num_beams == 1 else f'{num_beams} beams'})",
               unit="doc", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        generated = generate_suffixes(model, [prompt for _, (prompt, _) in batch], n, num_beams)
        for (doc, (prompt, truth)), gen in zip(batch, generated):
            results[doc.index] = score_extraction(doc.index, len(prompt), gen, truth, tokenizer)
        bar.update(len(batch))
    bar.close()
    return [results[doc.index] for doc, s in splits if s is not None]


def summarize_extraction(results: Sequence[ExtractionResult]) -> dict:
    """Means over documents: exact_match_rate, token_match_mean, longest_run_mean, rougeL_mean (None if empty)."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    return {"exact_match_rate": mean(float(r.exact_match) for r in results),
            "token_match_mean": mean(r.token_match for r in results),
            "longest_run_mean": mean(r.longest_run for r in results),
            "rougeL_mean": mean(r.rougeL for r in results)}

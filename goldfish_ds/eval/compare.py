"""evaluate_models: every memorization measurement on several models, side by side.

The result (also results.json of write_report):
  config: the options (models, documents, nonmembers, num_docs, n, prefix_len, batch_size, num_beams,
          min_k_percent, max_length, goldfish (GoldfishConfig fields or None), device, dtype)
  runs: {name: {
    model_dir, tokenizer, num_documents (evaluated), num_skipped (shorter than needed), extraction_seconds,
    exact_match_rate, token_match_mean, longest_run_mean, rougeL_mean,     (greedy; None with no document)
    documents: [ExtractionResult fields per document],
    beam:       {num_beams, the four means, documents, divergence?}          (when num_beams is given)
    mia:        {min_k_percent, num_members, num_nonmembers,
                 loss|zlib|min_k: {auc, tpr_at_1pct_fpr},
                 members|nonmembers: [{index, loss, zlib_ratio, min_k_log_prob}]}  (when nonmembers are given)
    divergence: {num_divergences, on_dropped_rate, suffix_drop_rate,
                 documents: [{index, first_divergence, on_dropped, suffix_dropped}]}  (when goldfish is given)
  }}
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from goldfish_ds.config import GoldfishConfig
from goldfish_ds.eval.divergence import divergence
from goldfish_ds.eval.documents import (
    Records,
    load_model,
    load_model_tokenizer,
    make_documents,
    read_records,
)
from goldfish_ds.eval.extraction import extract, summarize_extraction
from goldfish_ds.eval.membership import ATTACKS, membership_inference


def evaluate_models(models: Mapping[str, str | Path], documents: Records, *,
                    nonmembers: Records | None = None, num_docs: int | None = None, n: int = 50,
                    prefix_len: int | None = None, batch_size: int = 16, num_beams: int | None = None,
                    goldfish: GoldfishConfig | None = None, min_k_percent: float = 20.0,
                    tokenizer: str | None = None, max_length: int | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> dict:
    """Evaluate each model (name -> HF causal LM directory) on the same documents.

    documents / nonmembers: JSONL paths or parsed records ("text", optionally "ids"); the first num_docs of
    each. Greedy extraction always; beam-search extraction when num_beams is given (the paper used 30);
    membership inference when nonmembers are given; divergence analysis when a goldfish config is given.
    Each model uses its own tokenizer (see find_tokenizer) unless `tokenizer` overrides it; documents are cut
    to max_length tokens (default: the model's max_position_embeddings + 1, its longest training row).

    Returns {"config": {...}, "runs": {name: {"exact_match_rate": ..., "rougeL_mean": ..., ...}}}; the keys
    are listed in this module's docstring.
    """
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    members = read_records(documents, num_docs)
    held_out = read_records(nonmembers, num_docs) if nonmembers is not None else None
    runs = {}
    for name, model_dir in models.items():
        model = load_model(model_dir, device, dtype)
        tok = load_model_tokenizer(model_dir, tokenizer)
        limit = max_length
        if limit is None and getattr(model.config, "max_position_embeddings", None) is not None:
            limit = model.config.max_position_embeddings + 1
        docs = make_documents(members, tok, max_length=limit)
        run: dict = {"model_dir": str(model_dir), "tokenizer": tok.path}

        start = time.perf_counter()
        greedy = extract(model, docs, n, prefix_len=prefix_len, batch_size=batch_size, tokenizer=tok,
                         progress=progress)
        run.update(num_documents=len(greedy), num_skipped=len(docs) - len(greedy),
                   extraction_seconds=time.perf_counter() - start, **summarize_extraction(greedy),
                   documents=[r.to_dict() for r in greedy])
        if num_beams is not None:
            beam = extract(model, docs, n, prefix_len=prefix_len, batch_size=batch_size, num_beams=num_beams,
                           tokenizer=tok, progress=progress)
            run["beam"] = {"num_beams": num_beams, **summarize_extraction(beam),
                           "documents": [r.to_dict() for r in beam]}
        if held_out is not None:
            mia = membership_inference(model, [d for d in docs if len(d.ids) >= 2],
                                       [d for d in make_documents(held_out, tok, max_length=limit) if len(d.ids) >= 2],
                                       k_percent=min_k_percent, batch_size=batch_size, progress=progress)
            run["mia"] = {"min_k_percent": min_k_percent, "num_members": len(mia.members),
                          "num_nonmembers": len(mia.nonmembers),
                          **{a: {"auc": mia.auc[a], "tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr[a]} for a in ATTACKS},
                          "members": [asdict(s) for s in mia.members],
                          "nonmembers": [asdict(s) for s in mia.nonmembers]}
        if goldfish is not None:
            run["divergence"] = divergence(greedy, docs, goldfish).to_dict()
            if num_beams is not None:
                run["beam"]["divergence"] = divergence(beam, docs, goldfish).to_dict()
        runs[name] = run
        del model
    config = {"models": {name: str(d) for name, d in models.items()},
              "documents": str(documents) if isinstance(documents, (str, Path)) else None,
              "nonmembers": str(nonmembers) if isinstance(nonmembers, (str, Path)) else None,
              "num_docs": num_docs, "n": n, "prefix_len": prefix_len, "batch_size": batch_size,
              "num_beams": num_beams, "min_k_percent": min_k_percent, "max_length": max_length,
              "goldfish": asdict(goldfish) if goldfish is not None else None, "device": str(device),
              "dtype": str(dtype).replace("torch.", "")}
    return {"config": config, "runs": runs}

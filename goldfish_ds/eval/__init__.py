"""Memorization evaluation of HF causal LMs: extraction (greedy and beam search), membership inference,
divergence from the truth at goldfish-dropped tokens, and a side-by-side report of several models."""
from goldfish_ds.eval.compare import evaluate_models
from goldfish_ds.eval.divergence import (
    DivergenceResult,
    DocumentDivergence,
    divergence,
    suffix_dropped,
)
from goldfish_ds.eval.documents import (
    Document,
    decode_text,
    find_tokenizer,
    load_model,
    load_model_tokenizer,
    make_documents,
    read_records,
)
from goldfish_ds.eval.extraction import (
    ExtractionResult,
    extract,
    first_divergence,
    generate_suffixes,
    longest_match_run,
    rouge_l,
    score_extraction,
    split_document,
    summarize_extraction,
    token_match_fraction,
)
from goldfish_ds.eval.membership import (
    ATTACKS,
    DocumentScores,
    MembershipResult,
    document_scores,
    membership_inference,
    min_k_mean,
    roc_auc,
    token_log_probs,
    tpr_at_fpr,
)
from goldfish_ds.eval.report import summary_markdown, write_report

__all__ = [
    "ATTACKS", "DivergenceResult", "Document", "DocumentDivergence", "DocumentScores", "ExtractionResult",
    "MembershipResult", "decode_text", "divergence", "document_scores", "evaluate_models", "extract",
    "find_tokenizer", "first_divergence", "generate_suffixes", "load_model", "load_model_tokenizer",
    "longest_match_run", "make_documents", "membership_inference", "min_k_mean", "read_records", "roc_auc",
    "rouge_l", "score_extraction", "split_document", "suffix_dropped", "summarize_extraction", "summary_markdown",
    "token_log_probs", "token_match_fraction", "tpr_at_fpr", "write_report",
]

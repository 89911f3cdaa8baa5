"""Shared fixtures: devices to test on, and real text from ../shared/data when it is there."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wiki_dev.jsonl"

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])]


def wiki_texts() -> list[str]:
    if not WIKI.is_file():
        pytest.skip(f"real-text data {WIKI} is absent (it lives in the project's shared/ folder, not in a clone)")
    with WIKI.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def wiki_token_ids(tmp_path_factory) -> torch.Tensor:
    """The 400 wiki_dev articles tokenized with an 8k sentencepiece BPE model trained on them, concatenated."""
    import sentencepiece as spm

    texts = wiki_texts()
    work = tmp_path_factory.mktemp("spm")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(work / "wiki"), vocab_size=8000,
                                   model_type="bpe", num_threads=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(work / "wiki.model"))
    ids = [i for text in texts for i in [sp.bos_id()] + sp.encode(text)]
    return torch.tensor(ids, dtype=torch.int64)



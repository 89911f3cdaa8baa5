"""Evaluation inputs: documents as token ids, and an HF causal LM directory with its tokenizer."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from goldfish_ds.data import Tokenizer, load_tokenizer

Records = str | Path | Sequence[Mapping]


@dataclass(frozen=True)
class Document:
    """One evaluated document: `index` is its position in the input, `ids` the exact tokens the model sees."""

    index: int
    ids: list[int]
    text: str  # the text of `ids` (what the zlib attack compresses)


def read_records(source: Records, num_docs: int | None = None) -> list[dict]:
    """The first `num_docs` (all if None) document records of a JSONL file (or of already parsed records).

    A record is an object with "text" and optionally "ids".
    """
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in list(source)[:num_docs]]
    records = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            if num_docs is not None and len(records) >= num_docs:
                break
            if line.strip():
                records.append(json.loads(line))
    return records


def decode_text(ids: Sequence[int], tokenizer: Tokenizer | None) -> str:
    """Text of `ids` without BOS/EOS/pad (as the official evaluation's skip_special_tokens=True).

    Without a tokenizer the ids are written as space-separated numbers, so ids-only evaluations still
    get a RougeL (over token ids) and a zlib length.
    """
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    special = tokenizer.special_ids
    return tokenizer.decode([i for i in ids if i not in special])


def make_documents(records: Sequence[Mapping], tokenizer: Tokenizer | None, *,
                   max_length: int | None = None) -> list[Document]:
    """Token documents from records (see read_records), indexed by their position.

    A record's "ids" are used verbatim (the tokens as trained); otherwise its "text" is tokenized as
    BOS + text. Documents are cut to their first `max_length` tokens when it is given.
    """
    documents = []
    for index, record in enumerate(records):
        if "ids" in record:
            ids = [int(i) for i in record["ids"]]
        elif "text" in record:
            if tokenizer is None:
                raise ValueError(f"document {index} has no 'ids': a tokenizer is needed to tokenize its 'text'")
            ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(record["text"])
        else:
            raise ValueError(f"document {index}: expected a 'text' or an 'ids' field, got {sorted(record)}")
        ids = ids[:max_length] if max_length is not None else ids
        documents.append(Document(index, ids, decode_text(ids, tokenizer)))
    return documents


def find_tokenizer(model_dir: str | Path) -> str:
    """The tokenizer of an HF model directory: its `tokenizer.model` (sentencepiece) first, then tokenizer.json."""
    root = Path(model_dir)
    if (root / "tokenizer.model").is_file():
        return str(root / "tokenizer.model")
    if (root / "tokenizer.json").is_file():
        return str(root)
    raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json inside; pass a tokenizer explicitly "
                            "(--tokenizer)")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF causal LM from a local directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def load_model_tokenizer(model_dir: str | Path, tokenizer: str | None = None) -> Tokenizer:
    """`tokenizer` when given (a .model file or an HF tokenizer directory), else the model directory's own."""
    return load_tokenizer(tokenizer if tokenizer is not None else find_tokenizer(model_dir))

"""Documents from files and datasets on disk, plus a small built-in corpus.

Inputs: `.txt` (the whole file is one document), `.jsonl` (one JSON object per line), `.parquet` (one row
per document, streamed by record batch), and a directory written by `datasets.Dataset.save_to_disk`. The
last three take their text from a field / column (default "text"). A `DatasetDict` directory needs a split,
named as `DIR:SPLIT`; a name is split at its last ':' only when it does not exist as given.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

INPUT_FORMATS = (".txt (one document per file), .jsonl or .parquet (a text field per record), or a directory "
                 "written by datasets' save_to_disk (DIR:SPLIT picks one split of a DatasetDict)")
_BATCH_ROWS = 1024  # rows per record batch read from parquet / arrow, so memory stays flat


def read_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of each input in order (formats: INPUT_FORMATS); empty documents are skipped."""
    for name in paths:
        path, split = _resolve(name)
        if path.is_dir():
            texts = _read_hf_dataset(name, path, split, text_field)
        elif path.suffix == ".jsonl":
            texts = _read_jsonl(name, path, text_field)
        elif path.suffix == ".parquet":
            texts = _read_parquet(name, path, text_field)
        elif path.suffix == ".txt":
            texts = iter([path.read_text(encoding="utf-8")])
        else:
            raise ValueError(f"input {name!r}: supported inputs are {INPUT_FORMATS}")
        yield from (text for text in texts if text)


def read_jsonl_records(paths: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """Yield ("FILE:LINE", record) for every JSON object of the .jsonl inputs (blank lines skipped)."""
    for name in paths:
        path, _ = _resolve(name)
        if path.suffix != ".jsonl" or not path.is_file():
            raise ValueError(f"input {name!r}: records (chat, prompt_response) are read from .jsonl files only")
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{name}:{number}: not a JSON object ({error})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{name}:{number}: not a JSON object, got {type(record).__name__}")
                yield f"{name}:{number}", record


def builtin_documents() -> list[str]:
    """The 79 help topics bundled with Python (`pydoc_data.topics`), sorted by topic name: a default corpus."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _resolve(name: str) -> tuple[Path, str | None]:
    path = Path(name)
    if path.exists():
        return path, None
    directory, sep, split = name.rpartition(":")
    if sep and split and Path(directory).is_dir():
        return Path(directory), split
    raise FileNotFoundError(f"input {name!r} does not exist")


def _read_jsonl(name: str, path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{name}:{number}: no {text_field!r} field")
            yield record[text_field]


def _read_parquet(name: str, path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"input {name!r}: no {text_field!r} column (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        yield from batch.column(0).to_pylist()


def _read_hf_dataset(name: str, path: Path, split: str | None, text_field: str) -> Iterator[str]:
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ValueError(f"input {name!r} is a directory but not one written by datasets' save_to_disk")
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"input {name!r} is a DatasetDict: name one split as {path!s}:SPLIT, SPLIT one of "
                             f"{sorted(dataset)}")
        dataset = dataset[split]
    elif split is not None:
        raise ValueError(f"input {name!r}: {path!s} holds a single Dataset, it has no split {split!r}")
    if text_field not in dataset.column_names:
        raise ValueError(f"input {name!r}: no {text_field!r} column (columns: {dataset.column_names})")
    for batch in dataset.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        yield from batch[text_field]

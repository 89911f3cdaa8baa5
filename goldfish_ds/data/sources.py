"""Documents from files: `.jsonl` (one JSON object per line, its "text" field) or `.txt` (one file, one document)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


def read_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of each file in order; empty documents are skipped."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"input {name!r} does not exist")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise ValueError(f"{name}:{number}: no {text_field!r} field")
                    if record[text_field]:
                        yield record[text_field]
        elif path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            if text:
                yield text
        else:
            raise ValueError(f"input {name!r}: supported formats are .jsonl (objects with a {text_field!r} field) "
                             "and .txt (one document per file)")

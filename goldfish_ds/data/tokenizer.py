"""Tokenizers: a sentencepiece model (a Llama `tokenizer.model`) or an HF tokenizer directory, one interface."""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path


class Tokenizer:
    """encode(text) -> ids, plus the special ids the pipeline needs (None where the tokenizer has none)."""

    def __init__(self, path: str) -> None:
        root = Path(path)
        if root.is_file() and root.suffix == ".model":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(root))
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id = self._nonnegative(self._sp.bos_id())
            self.eos_id = self._nonnegative(self._sp.eos_id())
            self.pad_id = self._nonnegative(self._sp.pad_id())
            self._hf = None
        elif root.is_dir() and (root / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
            self.vocab_size = len(self._hf)
            self.bos_id, self.eos_id, self.pad_id = self._hf.bos_token_id, self._hf.eos_token_id, self._hf.pad_token_id
            self._sp = None
        else:
            raise FileNotFoundError(f"tokenizer {path!r}: expected a sentencepiece .model file or a directory with "
                                    "tokenizer.json")
        self.path = str(root)

    @staticmethod
    def _nonnegative(i: int) -> int | None:
        return i if i >= 0 else None

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """BOS, EOS and PAD ids (those the tokenizer has), sorted: the ids the goldfish loss exempts by default."""
        return tuple(sorted({self.bos_id, self.eos_id, self.pad_id} - {None}))

    def encode_document(self, text: str) -> list[int]:
        """A document as the data pipeline stores it: BOS + encode(text) + EOS (each where the tokenizer has one)."""
        prefix = [self.bos_id] if self.bos_id is not None else []
        suffix = [self.eos_id] if self.eos_id is not None else []
        return prefix + self.encode(text) + suffix

    @property
    def chat_template(self) -> str | None:
        """The HF tokenizer's Jinja chat template; None for sentencepiece models and HF tokenizers without one."""
        return getattr(self._hf, "chat_template", None) if self._hf is not None else None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """`messages` ([{"role", "content"}, ...]) rendered as text by the chat template (see chat_template)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.path} has no chat template")
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`: a sentencepiece .model file or an HF tokenizer directory."""
    return Tokenizer(path)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a sentencepiece model on `texts` (BOS=1, EOS=2, PAD=3, UNK=0); returns the .model path."""
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as corpus:
        for text in texts:
            corpus.write(text.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(input=corpus.name, model_prefix=model_prefix, vocab_size=vocab_size,
                                   model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   byte_fallback=True, num_threads=2, minloglevel=2)
    Path(corpus.name).unlink()
    return f"{model_prefix}.model"

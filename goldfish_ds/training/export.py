"""Export a training model (any ZeRO stage, any tensor-parallel size) as an HF Llama directory with its tokenizer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from goldfish_ds.models import Llama, save_hf_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def export_hf(model: Llama, directory: str, tokenizer_path: str | None) -> None:
    """Write config.json, model.safetensors and the tokenizer to `directory` (every rank calls it).

    ZeRO-3 partitions are gathered, tensor-parallel shards concatenated and the vocabulary padding
    stripped; the directory appears complete or not at all (written aside, then renamed by rank 0).
    A sentencepiece tokenizer is copied as tokenizer.model with a tokenizer_config.json naming
    LlamaTokenizer, so `transformers.AutoTokenizer` loads it too.
    """
    import deepspeed

    final = Path(directory)
    staging = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        save_hf_llama(model, str(staging))
    if rank == 0:
        if tokenizer_path:
            copy_tokenizer(Path(tokenizer_path), staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    dist.barrier()


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy an HF tokenizer directory's files, or a sentencepiece model as tokenizer.model + tokenizer_config.json."""
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        return
    shutil.copy2(source, target / "tokenizer.model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(source))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
              "pad_token": piece(sp.pad_id()), "unk_token": piece(sp.unk_id()), "add_bos_token": True,
              "add_eos_token": False, "legacy": False}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

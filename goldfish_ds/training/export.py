"""Export a training model (any ZeRO stage, any tensor-parallel size) as an HF Llama directory with its tokenizer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from goldfish_ds.data import load_tokenizer
from goldfish_ds.models import Llama, save_hf_llama
from goldfish_ds.models.hf import DEFAULT_MAX_SHARD_SIZE
from goldfish_ds.training.partitions import gather_partitions, is_partitioned

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def export_hf(model: Llama, directory: str, tokenizer_path: str | None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write config.json, generation_config.json, the weights and the tokenizer to `directory` (every rank calls it).

    The weights are HF's safetensors layout: model.safetensors, or shards of at most max_shard_size ("5GB",
    "500MB", bytes) with model.safetensors.index.json. Global rank 0 writes them one shard at a time: each
    tensor's ZeRO-3 partitions are gathered onto DP rank 0 and its tensor-parallel slices onto rank 0, and
    the vocabulary padding is stripped; no rank holds the whole model. The directory appears complete or
    not at all (written aside, then renamed by rank 0). A sentencepiece tokenizer is copied as
    tokenizer.model with a tokenizer_config.json naming LlamaTokenizer, so `transformers.AutoTokenizer`
    loads it too; generation_config.json carries its BOS/EOS ids.
    """
    final = Path(directory)
    staging = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    save_hf_llama(model, str(staging), max_shard_size=max_shard_size,
                  local_tensor=gather_partitions if is_partitioned(model) else None)
    if rank == 0:
        generation = {}
        if tokenizer_path:
            copy_tokenizer(Path(tokenizer_path), staging)
            tokenizer = load_tokenizer(tokenizer_path)
            generation = {f"{name}_token_id": i for name, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id))
                          if i is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
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

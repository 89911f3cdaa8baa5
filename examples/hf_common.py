"""What the transformers, TRL and PEFT examples share: options, model and tokenizer, data, goldfish settings.

Without --model the examples write a tiny random HF Llama and a sentencepiece tokenizer trained on Python's
bundled documentation to OUTPUT_DIR/tiny_model once, so they run offline; --model takes any HF causal LM
directory or hub name (e.g. runs/default/hf, which `scripts/pretrain.py` writes).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer,
                          default_data_collator)

from goldfish_ds import GoldfishConfig
from goldfish_ds.data import builtin_documents, train_sentencepiece
from goldfish_ds.integrations.transformers import GoldfishDataCollator, GoldfishTrainer
from goldfish_ds.training.export import copy_tokenizer


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal LM directory or hub name; default: a tiny random Llama")
    p.add_argument("--output_dir", default="runs/examples", help="Trainer output directory")
    p.add_argument("--max_steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per training row")
    p.add_argument("--batch_size", type=int, default=8, help="rows per micro-batch and device")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear decay)")
    p.add_argument("--goldfish_k", type=int, default=4, help="drop about 1/k of the supervised targets")
    p.add_argument("--goldfish_h", type=int, default=13, help="context width of the hashed mask")
    p.add_argument("--labels", choices=("fused", "collator"), default="fused",
                   help="fused: the trainer runs goldfish_ds' fused loss on the logits; collator: the stock trainer "
                        "and the model's own loss, on labels with the dropped targets set to -100")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (e.g. examples/ds_zero3.json)")
    p.add_argument("--tiny_hidden_size", type=int, default=64, help="tiny model (no --model): hidden size")
    p.add_argument("--tiny_layers", type=int, default=2, help="tiny model (no --model): decoder layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model and the data order")
    return p


def write_tiny_model(directory: Path, hidden_size: int, layers: int, seed: int) -> Path:
    """A random LlamaForCausalLM and a 512-piece sentencepiece tokenizer on the bundled docs, saved once."""
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    spm_model = train_sentencepiece(builtin_documents(), str(directory / "spm"), vocab_size=512)
    copy_tokenizer(Path(spm_model), directory)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def model_path(args: argparse.Namespace, training_args) -> str:
    """--model, or the tiny model (written by the main process while the other ranks wait)."""
    if args.model is not None:
        return args.model
    with training_args.main_process_first(desc="tiny model"):
        return str(write_tiny_model(Path(args.output_dir) / "tiny_model", args.tiny_hidden_size, args.tiny_layers,
                                    args.seed))


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str) -> torch.nn.Module:
    """Load after the TrainingArguments are made: under ZeRO-3 the weights then load straight into partitions."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def goldfish_config(args: argparse.Namespace, tokenizer) -> GoldfishConfig:
    """The paper's hash-table mask; the tokenizer's special tokens (BOS/EOS/PAD, chat markers) are never dropped."""
    return GoldfishConfig(k=args.goldfish_k, h=args.goldfish_h, exempt_ids=tuple(tokenizer.all_special_ids))


def packed_text_rows(tokenizer, seq_len: int) -> list[dict]:
    """The bundled docs, BOS + text + EOS each, concatenated and cut into rows of seq_len tokens (labels = ids)."""
    ids = []
    for text in builtin_documents():
        ids += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [{"input_ids": ids[i:i + seq_len], "labels": ids[i:i + seq_len]}
            for i in range(0, len(ids) - seq_len + 1, seq_len)]


def trainer_options(args: argparse.Namespace) -> dict:
    """TrainingArguments (or SFTConfig) keywords from the shared options."""
    return dict(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="linear",
                logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed,
                deepspeed=args.deepspeed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)


def causal_lm_trainer(args: argparse.Namespace, training_args, model, tokenizer):
    """--labels fused: GoldfishTrainer; collator: the stock Trainer on GoldfishDataCollator labels."""
    rows = packed_text_rows(tokenizer, args.seq_len)
    goldfish = goldfish_config(args, tokenizer)
    if args.labels == "fused":
        return GoldfishTrainer(model=model, args=training_args, train_dataset=rows,
                               data_collator=default_data_collator, goldfish=goldfish)
    return Trainer(model=model, args=training_args, train_dataset=rows,
                   data_collator=GoldfishDataCollator(default_data_collator, goldfish))


def write_report(trainer, output_dir: str) -> None:
    """Rank 0 writes OUTPUT_DIR/report.json: the log history and whether ZeRO-3 partitioned the parameters."""
    if trainer.is_world_process_zero():
        partitioned = all(hasattr(p, "ds_id") for p in trainer.model.parameters())
        path = Path(output_dir) / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"log_history": trainer.state.log_history, "zero3_partitioned": partitioned}))
        print(f"log history: {path}")

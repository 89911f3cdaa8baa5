"""Every bad input that goldfish_ds refuses, one row each: the exception, and a message that names the offending
option or argument (and the allowed values where there are some).

Four tables, to extend by adding rows:
  API_REFUSALS       the Python API: loss and mask arguments, goldfish / model / DeepSpeed configs, tensor-parallel
                     layers, data files, samplers, tokenizers, document sources, HF checkpoints, launch
                     environments, a CPU that cannot run the extension's build; the rows with ranks=2 run on
                     every rank of one shared 2-rank gloo job
  ARGUMENT_REFUSALS  scripts/pretrain.py options refused by parse_args, in this process
  JOB_REFUSALS       scripts/pretrain.py inputs refused while the job starts (data, tokenizer, model and DeepSpeed
                     configs, HF checkpoints, launch environments): all of them run in one worker process (this file
                     run as a script) that calls Job(parse_args(argv)), exactly what pretrain.py's main calls, and
                     reports the exception; pretrain.py turns ValueError and FileNotFoundError into one line
  CLI_ONE_LINE       a few of the above through the real `python scripts/pretrain.py`: a one-line
                     `pretrain.py: error: ...`, no traceback
The README states the number of rows (test_the_readme_states_the_count).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist

from conftest import DEVICES
from distributed import run_distributed
from test_kernels import RECORDED_CPUS
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy, goldfish_linear_cross_entropy, goldfish_mask
from goldfish_ds.data import (CanarySet, PackedTokenDataset, ShardedSampler, builtin_documents, load_tokenizer,
                              read_documents, train_sentencepiece, write_packed_shards)
from goldfish_ds.kernels import check_cpu_supports
from goldfish_ds.models import Llama, LlamaConfig, documents_from_eos, llama_from_hf, save_hf_llama
from goldfish_ds.models.hf import HFCheckpoint, parse_size
from goldfish_ds.parallel import (destroy_model_parallel, initialize_model_parallel, scatter_to_tensor_parallel_region,
                                  vocab_parallel_goldfish_cross_entropy, vocab_parallel_goldfish_linear_cross_entropy)
from goldfish_ds.parallel.distributed import expand_hostlist, launch_environment
from goldfish_ds.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         VocabParallelLMHead)
from goldfish_ds.training.deepspeed_config import load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "scripts" / "pretrain.py"
CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))
TINY = LlamaConfig.from_json(str(REPO / "configs" / "models" / "tiny.json"))
VOCAB = 2048  # of the test corpus's tokenizer and model
ops = torch.ops.goldfish_ds


def logits_labels(V: int = 300, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, V, generator=g).to(device), torch.randint(0, V, (2, 8), generator=g).to(device)


def with_label(value: int, V: int = 300, device: str = "cpu"):
    logits, labels = logits_labels(V, device)
    labels[1, 3] = value
    return logits, labels


def hidden_weight_labels(V: int = 300, H: int = 8, device: str = "cpu", label: Optional[int] = None):
    """The inputs of the fused linear losses: hidden [2, 8, H], weight [V, H], labels [2, 8]."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (2, 8), generator=g)
    if label is not None:
        labels[1, 3] = label
    return (torch.randn(2, 8, H, generator=g).to(device), torch.randn(V, H, generator=g).to(device),
            labels.to(device))


def map_second(inputs: tuple, change: Callable) -> tuple:
    """inputs with change() applied to the second (the weight)."""
    return (inputs[0], change(inputs[1]), *inputs[2:])


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def ds_config(tmp: Path, **changes) -> str:
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3_cpu.json").read_text())
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (config.setdefault(section, {}) if section else config)[field] = value
    return write_json(tmp / "ds.json", config)


def tiny_hf(directory: Path, vocab: int = VOCAB, **config) -> Path:
    """A 1-layer Llama saved in HF's layout (model.safetensors, config.json)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, **config)
    save_hf_llama(Llama(cfg), str(directory))
    return directory


def without_tensor(directory: Path, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def truncated(file: Path, keep: int) -> Path:
    file.write_bytes(file.read_bytes()[:keep])
    return file


def edited_json(file: Path, **changes) -> Path:
    write_json(file, {**json.loads(file.read_text()), **changes})
    return file


def sharded_without_second(directory: Path) -> Path:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf(directory / "whole"))
    model.save_pretrained(directory / "sharded", max_shard_size="40KB")
    next((directory / "sharded").glob("model-00002-of-*.safetensors")).unlink()
    return directory / "sharded"


def tokenizer_without_eos(directory: Path) -> Path:
    """An HF tokenizer directory (a 3-word WordLevel vocabulary) with no EOS token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(str(directory))
    return directory


def llama_forward(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """A 1-layer Llama (SMALL) run on input_ids with forward's other arguments."""
    return Llama(LlamaConfig(**SMALL))(input_ids, **kwargs)


def packed(directory: Path, vocab: int = 1000, canary=None) -> Path:
    """20 documents of 50 ids in shards of about 300 tokens (several shards), and the canaries if given."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, vocab, (50,), generator=g).tolist() for _ in range(20)]
    write_packed_shards(docs, str(directory), vocab, shard_tokens=300, canary=canary)
    return directory


def with_canaries(directory: Path) -> Path:
    return packed(directory, 500, CanarySet(["x", "y"], [[1, 2, 3], [4] * 40], seq_len=16, repeats=2))


def opened(directory: Path, seq_len: int = 32, change: Optional[Callable[[Path], object]] = None):
    """PackedTokenDataset(directory) after change(directory); a same-size change must still open unverified."""
    if change is not None:
        change(directory)
    return PackedTokenDataset(str(directory), seq_len, verify=True)


def flipped(file: Path) -> Path:
    """The first byte flipped: the same size, so only the sha256 tells."""
    content = file.read_bytes()
    file.write_bytes(bytes([content[0] ^ 1]) + content[1:])
    PackedTokenDataset(str(file.parent), 16 if "canary" in file.name else 32)  # sizes are checked, and agree
    return file


def first_shard(directory: Path) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["shards"][0]["tokens"]


def documents_of(tmp: Path, name: str, text_field: str = "text") -> list:
    """read_documents of one input made in tmp: a.parquet (id, body), ds (save_to_disk Dataset), dd (a
    DatasetDict of train and test), a.jsonl (a line without the field), a.csv, or a path as given."""
    if name.startswith("a.parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [0, 1], "body": ["one", "two"]}), tmp / "a.parquet")
    elif name.split(":")[0] in ("ds", "dd"):
        import datasets

        datasets.Dataset.from_dict({"text": ["one"], "id": [0]}).save_to_disk(str(tmp / "ds"))
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one"]}),
                              "test": datasets.Dataset.from_dict({"text": ["two"]})}).save_to_disk(str(tmp / "dd"))
    elif name == "a.jsonl":
        (tmp / "a.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    elif name == "a.csv":
        (tmp / "a.csv").write_text("text\none\n")
    return list(read_documents([str(tmp / name)], text_field=text_field))


# ---- the Python API ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """`call(tmp_path, device)` must raise `error` with a message matching `message` (which names the argument).
    devices: run it on every device (CPU, and CUDA where there is one); ranks: on every rank of a gloo job
    (call gets the rank instead of tmp_path)."""

    what: str
    call: Callable
    error: type
    message: str
    devices: bool = False
    ranks: int = 1


def on_tp2(make: Callable[[], object]) -> Callable[[int], object]:
    """make(), on a rank of a 2-rank job, inside TP groups of 2."""
    def call(rank: int):
        initialize_model_parallel(2)
        try:
            return make()
        finally:
            destroy_model_parallel()
    return call


def tp_padded_vocab():
    """TP=2 over a real padded vocabulary: V = 99 columns split as 2 x 50, the last one -inf padding."""
    head = VocabParallelLMHead(16, 99)
    hidden = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(2))
    labels[0, 0] = 98  # the last real id
    loss = vocab_parallel_goldfish_cross_entropy(head(hidden), labels, CFG, vocab_size=99)
    assert torch.isfinite(loss)  # the real vocabulary is fine
    labels[1, 3] = 99  # the padding column
    return vocab_parallel_goldfish_cross_entropy(head(hidden), labels, CFG, vocab_size=99)


def tp_shards(rank: int, labels_change: Optional[Callable] = None, **kwargs):
    logits, labels = logits_labels(200)
    if labels_change:
        labels_change(rank, labels)
    local = logits[..., rank * 100:(rank + 1) * 100].contiguous()
    return vocab_parallel_goldfish_cross_entropy(local, labels, CFG, dist.group.WORLD, **kwargs)


def tp_linear_shards(rank: int, label: Optional[int] = None, **kwargs):
    """vocab_parallel_goldfish_linear_cross_entropy on 2 ranks holding 100 weight rows each."""
    hidden, weight, labels = hidden_weight_labels(200, label=label)
    return vocab_parallel_goldfish_linear_cross_entropy(hidden, weight[rank * 100:(rank + 1) * 100], labels, CFG,
                                                        dist.group.WORLD, **kwargs)


def label_at(value: int):
    def change(rank: int, labels: torch.Tensor) -> None:
        labels[1, 3] = value(rank) if callable(value) else value
    return change


SMALL = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
LAUNCH_ENV_SEVERAL = ("looks like one rank of several .*but no launcher's variables are complete"
                      ".*RANK, WORLD_SIZE, LOCAL_RANK")

API_REFUSALS = [
    # goldfish config
    Refusal("GoldfishConfig k < 2", lambda t, d: GoldfishConfig(k=1, h=13), ValueError, "k must be an integer >= 2"),
    Refusal("GoldfishConfig h < 1", lambda t, d: GoldfishConfig(k=4, h=0), ValueError, "h must be an integer >= 1"),
    Refusal("GoldfishConfig unknown strategy", lambda t, d: GoldfishConfig(k=4, h=13, strategy="hash"), ValueError,
            "strategy must be one of"),
    Refusal("GoldfishConfig unknown window", lambda t, d: GoldfishConfig(k=4, h=13, window="after"), ValueError,
            "window must be one of"),
    Refusal("GoldfishConfig start_position < 0", lambda t, d: GoldfishConfig(k=4, h=13, start_position=-1),
            ValueError, "start_position must be an integer >= 0"),
    Refusal("GoldfishConfig exempt_ids not integers", lambda t, d: GoldfishConfig(k=4, h=13, exempt_ids=(1.5,)),
            ValueError, "exempt_ids must be integers"),
    Refusal("GoldfishConfig table_path with another strategy",
            lambda t, d: GoldfishConfig(k=4, h=13, strategy="static", table_path="t.bin"), ValueError,
            "table_path applies only"),
    Refusal("GoldfishConfig ignore_index not an integer", lambda t, d: GoldfishConfig(k=4, h=13, ignore_index=1.5),
            ValueError, "ignore_index must be an integer, got 1.5"),
    Refusal("GoldfishConfig seed past 64 bits", lambda t, d: GoldfishConfig(k=4, h=13, seed=2 ** 64), ValueError,
            "seed must be a 64-bit integer"),
    Refusal("goldfish table file without a tensor", lambda t, d: (torch.save({"table": 1}, t / "dict.pt"),
                                                                  goldfish_mask(torch.zeros(1, 5, dtype=torch.int64),
                                                                                GoldfishConfig(k=4, h=2, table_path=str(
                                                                                    t / "dict.pt")))),
            ValueError, "table file .*dict.pt' must hold a tensor, got dict"),
    Refusal("goldfish table_path missing",
            lambda t, d: goldfish_mask(torch.zeros(1, 5, dtype=torch.int64),
                                       GoldfishConfig(k=4, h=2, table_path="/nonexistent")),
            FileNotFoundError, "table_path '/nonexistent' does not exist"),
    Refusal("goldfish table file of the wrong size",
            lambda t, d: (torch.save(torch.rand(10), t / "short.pt"),
                          goldfish_mask(torch.zeros(1, 5, dtype=torch.int64),
                                        GoldfishConfig(k=4, h=2, table_path=str(t / "short.pt")))),
            ValueError, "table file .* must hold 1000003 float32 values, got 10"),
    # mask
    Refusal("goldfish_mask labels not a tensor", lambda t, d: goldfish_mask([1, 2, 3], CFG), TypeError,
            "labels must be a torch.Tensor, got list"),
    Refusal("goldfish_mask labels not int64", lambda t, d: goldfish_mask(torch.zeros(2, 5, dtype=torch.int32), CFG),
            TypeError, "labels must be int64"),
    Refusal("goldfish_mask labels 3-D", lambda t, d: goldfish_mask(torch.zeros(2, 3, 5, dtype=torch.int64), CFG),
            ValueError, r"labels must be \[T\] or \[B, T\]"),
    Refusal("mask op k < 2", lambda t, d: ops.goldfish_mask(torch.zeros(2, 5, dtype=torch.int64), 1, 1, 13, 0, -100,
                                                             False, None, None, 0, 0),
            RuntimeError, "k must be an integer >= 2"),
    Refusal("mask op h < 1", lambda t, d: ops.goldfish_mask(torch.zeros(2, 5, dtype=torch.int64), 1, 4, 0, 0, -100,
                                                             False, None, None, 0, 0),
            RuntimeError, r"h \(context width\) must be an integer >= 1"),
    Refusal("mask op strategy code", lambda t, d: ops.goldfish_mask(torch.zeros(2, 5, dtype=torch.int64), 9, 4, 13,
                                                                     0, -100, False, None, None, 0, 0),
            RuntimeError, r"strategy code must be in \[0, 4\]"),
    Refusal("mask op hash-table without table_bits",
            lambda t, d: ops.goldfish_mask(torch.zeros(2, 5, dtype=torch.int64), 0, 4, 13, 0, -100, False, None,
                                           None, 0, 0),
            RuntimeError, "needs its table_bits"),
    Refusal("mask op table_bits of the wrong size",
            lambda t, d: ops.goldfish_mask(torch.zeros(2, 5, dtype=torch.int64), 0, 4, 13, 0, -100, False,
                                           torch.zeros(10, dtype=torch.int64), None, 0, 0),
            RuntimeError, "table_bits must be a contiguous int64 tensor of 15626 words"),
    Refusal("mask op labels not int64", lambda t, d: ops.goldfish_mask(torch.zeros(2, 5), 1, 4, 13, 0, -100, False,
                                                                        None, None, 0, 0),
            RuntimeError, "labels must be int64"),
    Refusal("apply_goldfish op k < 2", lambda t, d: ops.apply_goldfish(torch.zeros(2, 5, dtype=torch.int64), 1, 1, 13,
                                                                        0, -100, False, None, None, 0, 0),
            RuntimeError, "k must be an integer >= 2"),
    # loss
    *[Refusal(f"goldfish_cross_entropy label {bad}", lambda t, d, bad=bad: goldfish_cross_entropy(
        *with_label(bad, device=d), CFG), RuntimeError, rf"labels must be in \[0, 300\).*ignore_index=-100; "
        rf"labels\[11\] = {bad}", devices=True) for bad in (300, 301, -1, -101)],
    Refusal("goldfish_cross_entropy labels of another shape",
            lambda t, d: goldfish_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.int64), CFG),
            ValueError, "labels must have shape"),
    Refusal("goldfish_cross_entropy float labels",
            lambda t, d: goldfish_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 3), CFG), TypeError,
            "labels must be int64"),
    Refusal("goldfish_cross_entropy float64 logits",
            lambda t, d: goldfish_cross_entropy(torch.zeros(2, 3, 5, dtype=torch.float64),
                                                torch.zeros(2, 3, dtype=torch.int64), CFG),
            RuntimeError, "logits must be float32, bfloat16 or float16"),
    Refusal("goldfish_cross_entropy 1-D logits",
            lambda t, d: goldfish_cross_entropy(torch.zeros(5), torch.zeros(1, dtype=torch.int64), CFG), ValueError,
            "logits must be a"),
    Refusal("goldfish_cross_entropy empty vocabulary",
            lambda t, d: goldfish_cross_entropy(torch.zeros(2, 3, 0), torch.zeros(2, 3, dtype=torch.int64), CFG),
            ValueError, "V >= 1"),
    Refusal("goldfish_cross_entropy unknown reduction",
            lambda t, d: goldfish_cross_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.int64), CFG,
                                                "avg"),
            ValueError, r"reduction must be one of \['mean', 'sum', 'none'\]"),
    # the fused linear loss (LM head + loss)
    *[Refusal(f"goldfish_linear_cross_entropy label {bad}", lambda t, d, bad=bad: goldfish_linear_cross_entropy(
        *hidden_weight_labels(device=d, label=bad), CFG), ValueError,
        rf"labels must be in \[0, 300\) \(vocab_size 300\) or ignore_index=-100; found {bad}", devices=True)
      for bad in (300, -1)],
    Refusal("goldfish_linear_cross_entropy float64 hidden and weight",
            lambda t, d: goldfish_linear_cross_entropy(*[x.double() for x in hidden_weight_labels()[:2]],
                                                       hidden_weight_labels()[2], CFG),
            TypeError, "hidden must be float32, bfloat16 or float16, got torch.float64"),
    Refusal("goldfish_linear_cross_entropy weight of another dtype",
            lambda t, d: goldfish_linear_cross_entropy(*map_second(hidden_weight_labels(), lambda w: w.bfloat16()),
                                                       CFG),
            TypeError, r"weight \(torch.bfloat16\) and hidden \(torch.float32\) must have the same dtype"),
    Refusal("goldfish_linear_cross_entropy weight of another hidden size",
            lambda t, d: goldfish_linear_cross_entropy(*map_second(hidden_weight_labels(), lambda w: w[:, :5]), CFG),
            ValueError, r"weight must be a \[V, H\] tensor with V >= 1 and H = 8 \(hidden's last dimension\), got "
            r"\(300, 5\)"),
    Refusal("goldfish_linear_cross_entropy weight on another device",
            lambda t, d: goldfish_linear_cross_entropy(*map_second(hidden_weight_labels(), lambda w: w.to("meta")),
                                                       CFG),
            ValueError, r"weight \(meta\) and hidden \(cpu\) must be on the same device"),
    Refusal("goldfish_linear_cross_entropy 1-D hidden",
            lambda t, d: goldfish_linear_cross_entropy(torch.zeros(8), torch.zeros(3, 8),
                                                       torch.zeros(1, dtype=torch.int64), CFG),
            ValueError, r"hidden must be a \[B, T, H\] or \[N, H\] tensor"),
    *[Refusal(f"goldfish_linear_cross_entropy chunk_bytes={bad!r}", lambda t, d, bad=bad: goldfish_linear_cross_entropy(
        *hidden_weight_labels(), CFG, chunk_bytes=bad), ValueError,
        rf"chunk_bytes must be a positive int \(bytes\) or None .*got {re.escape(repr(bad))}") for bad in (0, "1MB")],
    Refusal("vocab-parallel linear loss: reduction passed where the group goes",
            lambda t, d: vocab_parallel_goldfish_linear_cross_entropy(*hidden_weight_labels(), CFG, "sum"), TypeError,
            r"group must be a torch.distributed ProcessGroup or None, got 'sum' \(reduction is its 6th argument"),
    Refusal("loss op labels of another length",
            lambda t, d: ops.cross_entropy_loss(torch.zeros(4, 10), torch.zeros(3, dtype=torch.int64), None, -100,
                                                False),
            RuntimeError, "labels must have N = 4 entries"),
    Refusal("loss op int64 dropped mask",
            lambda t, d: ops.cross_entropy_loss(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64),
                                                torch.zeros(4, dtype=torch.int64), -100, False),
            RuntimeError, "dropped must be a contiguous bool tensor"),
    Refusal("loss op grad_scale of two elements",
            lambda t, d: ops.cross_entropy_loss_grad(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64), None,
                                                     -100, False, torch.ones(2)),
            RuntimeError, "grad_scale must be a float32 tensor with one element"),
    Refusal("loss op non-contiguous logits",
            lambda t, d: ops.cross_entropy_loss(torch.zeros(10, 4).t(), torch.zeros(4, dtype=torch.int64), None,
                                                -100, False),
            RuntimeError, "logits must be contiguous"),
    Refusal("scale_rows op scale of another length",
            lambda t, d: ops.scale_rows_(torch.zeros(4, 10), torch.ones(3)), RuntimeError,
            r"scale must be float32 with 1 or N = 4 elements"),
    Refusal("vocab-parallel reduction passed where the group goes",
            lambda t, d: vocab_parallel_goldfish_cross_entropy(*logits_labels(), CFG, "sum"), TypeError,
            r"group must be a torch.distributed ProcessGroup or None, got 'sum' \(reduction is its 5th argument"),
    # vocab-parallel loss, on real gloo ranks
    Refusal("vocab-parallel label in the TP padding [V, V_padded)", on_tp2(tp_padded_vocab), ValueError,
            r"labels must be in \[0, 99\) \(vocab_size 99, padded to 100 for 2 shards of 50\) or ignore_index=-100; "
            r"found 99", ranks=2),
    Refusal("vocab-parallel label past the shards", lambda r: tp_shards(r, label_at(200)), ValueError,
            r"labels must be in \[0, 200\) \(vocab_size 200\) or ignore_index=-100; found 200", ranks=2),
    Refusal("vocab-parallel vocab_size that the shards cannot hold", lambda r: tp_shards(r, vocab_size=100),
            ValueError, r"vocab_size must be an int in \(100, 200\] \(2 shards of 100 logits\), got 100", ranks=2),
    Refusal("vocab-parallel linear loss: label in the TP padding", lambda r: tp_linear_shards(r, 199, vocab_size=199),
            ValueError, r"labels must be in \[0, 199\) \(vocab_size 199, padded to 200 for 2 shards of 100\) or "
            r"ignore_index=-100; found 199", ranks=2),
    Refusal("vocab-parallel linear loss: vocab_size that the shards cannot hold",
            lambda r: tp_linear_shards(r, vocab_size=100), ValueError,
            r"vocab_size must be an int in \(100, 200\] \(2 shards of 100 logits\), got 100", ranks=2),
    Refusal("vocab-parallel labels that differ between ranks",
            lambda r: tp_shards(r, label_at(lambda rank: rank), check_labels_match=True), ValueError,
            "labels differ between the tensor-parallel ranks", ranks=2),
    # tensor-parallel layers and groups, on real gloo ranks
    Refusal("ColumnParallelLinear out_features not divisible by TP", on_tp2(lambda: ColumnParallelLinear(4, 5)),
            ValueError, r"out_features \(5\) must be divisible by the tensor-parallel size \(2\)", ranks=2),
    Refusal("RowParallelLinear in_features not divisible by TP", on_tp2(lambda: RowParallelLinear(7, 4)),
            ValueError, r"in_features \(7\) must be divisible by the tensor-parallel size \(2\)", ranks=2),
    Refusal("VocabParallelEmbedding id outside the vocabulary", on_tp2(
        lambda: VocabParallelEmbedding(10, 4)(torch.tensor([[3, 10]]))), ValueError, r"ids must be in \[0, 10\)",
        ranks=2),
    Refusal("VocabParallelLMHead tied to an embedding of another size", on_tp2(
        lambda: VocabParallelLMHead(4, 10, tied=VocabParallelEmbedding(12, 4))), ValueError,
        "the tied embedding must have the same vocabulary and hidden size", ranks=2),
    Refusal("scatter of a last dimension not divisible by TP", on_tp2(
        lambda: scatter_to_tensor_parallel_region(torch.zeros(2, 5))), ValueError,
        r"the last dimension \(5\) must be divisible by the tensor-parallel size 2", ranks=2),
    Refusal("Llama with more TP ranks than KV heads", on_tp2(lambda: Llama(replace(TINY, num_key_value_heads=1,
                                                                                  num_attention_heads=4))),
            ValueError, r"tensor-parallel size \(2\) must divide num_key_value_heads \(1\)", ranks=2),
    Refusal("initialize_model_parallel with a size that does not divide the world",
            lambda r: initialize_model_parallel(3), ValueError,
            "tensor_parallel_size must be a positive divisor of the world size 2, got 3", ranks=2),
    # launch environments
    *[Refusal(f"launch environment {env}", lambda t, d, env=env: launch_environment(env), ValueError,
              f"{LAUNCH_ENV_SEVERAL}") for env in (
        {"WORLD_SIZE": "4"},  # RANK missing
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"},  # no local rank
        {"PMI_RANK": "1", "PMI_SIZE": "2"},  # PMI without hydra's local rank, outside srun
        {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"},  # an allocation's shell, not an srun task
        {"PMIX_RANK": "3"},  # a PMIx launcher we do not read
        {"PALS_RANKID": "1"},  # HPE Cray PALS
        {"JSM_NAMESPACE_SIZE": "6", "JSM_NAMESPACE_RANK": "0"},  # IBM jsrun
    )],
    Refusal("launch environment RANK >= WORLD_SIZE",
            lambda t, d: launch_environment({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}), ValueError,
            "RANK=4, WORLD_SIZE=4, LOCAL_RANK=0 is not a rank"),
    Refusal("launch environment SLURM_PROCID not an integer",
            lambda t, d: launch_environment({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}),
            ValueError, "SLURM_PROCID must be an integer, got 'x'"),
    *[Refusal(f"Slurm host list {hosts!r}", lambda t, d, hosts=hosts: expand_hostlist(hosts), ValueError,
              "Slurm host list") for hosts in ("node[01-03", "node[a-b]", "node]1[", "")],
    # model configs and HF checkpoints
    *[Refusal(f"LlamaConfig {key} {value!r}", lambda t, d, key=key, value=value: LlamaConfig.from_dict(
        {**TINY.to_hf_dict(), key: value}), ValueError, rf"{key} .* is not supported") for key, value in (
        ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True), ("model_type", "gpt2"))],
    *[Refusal(f"LlamaConfig {what}", lambda t, d, changes=changes: LlamaConfig.from_dict({**SMALL, **changes}),
              ValueError, message) for what, changes, message in (
        ("rope type yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 8}},
         r"rope_scaling .*rope_type 'yarn' is not supported \(allowed: default, linear, llama3\)"),
        ("llama3 rope without its factors", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
         "rope_type 'llama3' needs low_freq_factor"),
        ("rope_theta twice, differently", {"rope_theta": 500.0, "rope_parameters": {"rope_type": "default",
                                                                                     "rope_theta": 10000.0}},
         r"rope_theta 500.0 and rope_parameters\['rope_theta'\] 10000.0 disagree"),
        ("rope_parameters and rope_scaling that disagree", {"rope_parameters": {"rope_type": "linear", "factor": 2.0},
                                                             "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
         "rope_parameters .* and rope_scaling .* disagree"),
        ("odd head_dim", {"head_dim": 3}, r"head_dim \(3\) must be even"),
        ("heads not divisible by the KV heads", {"num_attention_heads": 4, "num_key_value_heads": 3},
         r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
        ("partial rotary embedding", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        ("llama3 rope with its frequency bands reversed", {"rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8}}, r"low_freq_factor \(4.0\) must be below high_freq_factor"),
        ("rope keys of another rope type", {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}},
         r"rope_scaling keys \['beta_fast'\] are not supported for rope_type 'linear'"),
        ("hidden_size not divisible by the heads", {"hidden_size": 9}, "hidden_size \\(9\\) must be divisible by "
                                                                        "num_attention_heads \\(2\\)"),
    )],
    Refusal("LlamaConfig from a JSON list", lambda t, d: LlamaConfig.from_dict([1]), ValueError,
            "a config must be a JSON object, got list"),
    Refusal("LlamaConfig without its sizes", lambda t, d: LlamaConfig.from_dict({"vocab_size": 10}), ValueError,
            "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads missing"),
    Refusal("model config that is not JSON", lambda t, d: LlamaConfig.from_json(
        str((t / "bad.json").write_text("{oops") and t / "bad.json")), ValueError, r"model config .*bad\.json: "),
    *[Refusal(f"Llama.forward {what}", lambda t, d, kwargs=kwargs: llama_forward(torch.zeros(2, 5, dtype=torch.int64),
              **kwargs), ValueError, message) for what, kwargs, message in (
        ("documents of another shape", {"documents": torch.zeros(2, 4, dtype=torch.int64)},
         r"documents must be an integer tensor of input_ids' shape \[2, 5\] .*got torch.int64\[2, 4\]"),
        ("float documents", {"documents": torch.zeros(2, 5)},
         r"documents must be an integer tensor of input_ids' shape \[2, 5\] .*got torch.float32\[2, 5\]"),
        ("documents that decrease along a row", {"documents": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]])},
         "documents must be non-decreasing along each row"),
        ("positions of another shape", {"positions": torch.arange(4)},
         r"positions must have shape \[T\] = \[5\] or \[B, T\] = \[2, 5\], got \[4\]"),
    )],
    Refusal("Llama.forward loss_targets that is not a LossTargets", lambda t, d: llama_forward(
        torch.zeros(2, 5, dtype=torch.int64), loss_targets={"labels": torch.zeros(2, 5, dtype=torch.int64)}),
        TypeError, "loss_targets must be a LossTargets or None, got dict"),
    Refusal("documents_from_eos eos_id not an int", lambda t, d: documents_from_eos(
        torch.zeros(2, 5, dtype=torch.int64), 2.0), ValueError, "documents_from_eos: eos_id must be an int token id, "
                                                                "got 2.0"),
    Refusal("HF checkpoint directory without weights", lambda t, d: HFCheckpoint(str(t)), FileNotFoundError,
            "no model.safetensors"),
    Refusal("HF checkpoint without a tensor", lambda t, d: llama_from_hf(str(without_tensor(
        tiny_hf(t / "hf"), "model.layers.0.mlp.up_proj.weight"))), ValueError,
        "model.safetensors has no tensor 'model.layers.0.mlp.up_proj.weight'"),
    Refusal("HF checkpoint tensor of another shape", lambda t, d: llama_from_hf(str(edited_json(
        tiny_hf(t / "hf") / "config.json", intermediate_size=48).parent)), ValueError,
        r"model.layers.0.mlp.gate_proj.weight in model.safetensors has shape \(64, 32\), this model expects "
        r"\(48, 32\)"),
    Refusal("HF checkpoint shard named in the index missing", lambda t, d: HFCheckpoint(str(sharded_without_second(t))),
            FileNotFoundError, "model-00002-of-.*, named in model.safetensors.index.json, is missing"),
    Refusal("HF checkpoint shard truncated", lambda t, d: llama_from_hf(str(truncated(
        tiny_hf(t / "hf") / "model.safetensors", 5000).parent)), ValueError,
        "model.safetensors cannot be read as a safetensors file"),
    Refusal("HF checkpoint index without weight_map", lambda t, d: HFCheckpoint(str(write_json(
        t / "model.safetensors.index.json", {}) and t)), ValueError,
        "model.safetensors.index.json is not an index of shards"),
    # data files, samplers, tokenizers, document sources
    Refusal("data shard truncated", lambda t, d: opened(packed(t), change=lambda p: truncated(
        first_shard(p), 100)), ValueError, r"data file .*tokens_00000.bin is corrupt: 100 bytes, the manifest says"),
    Refusal("data shard changed, same size", lambda t, d: opened(packed(t), change=lambda p: flipped(first_shard(p))),
            ValueError, r"data file .*tokens_00000.bin is corrupt: its sha256 differs from the manifest's"),
    Refusal("data shard missing", lambda t, d: opened(packed(t), change=lambda p: first_shard(p).unlink()),
            FileNotFoundError, r"data file .*tokens_00000.bin listed in the manifest is missing"),
    Refusal("data directory without a manifest", lambda t, d: opened(t), FileNotFoundError,
            "has no manifest.json: not a packed data directory"),
    Refusal("data read with seq_len 0", lambda t, d: opened(packed(t), seq_len=0), ValueError,
            "PackedTokenDataset: seq_len must be >= 1, got 0"),
    Refusal("token id outside the vocabulary written", lambda t, d: write_packed_shards([[1, 2, 10]], str(t), 10),
            ValueError, r"token ids must be in \[0, 10\), got \[1, 10\]"),
    Refusal("canary rows of another seq_len", lambda t, d: opened(with_canaries(t), seq_len=32), ValueError,
            "holds canary rows of seq_len 16, not the requested seq_len 32"),
    Refusal("canary rows truncated", lambda t, d: opened(with_canaries(t), 16, lambda p: truncated(
        p / "canary_rows.bin", 132)), ValueError, "canary_rows.bin is corrupt: 132 bytes, the manifest says 136"),
    Refusal("canary rows changed, same size", lambda t, d: opened(with_canaries(t), 16, lambda p: flipped(
        p / "canary_rows.bin")), ValueError, "canary_rows.bin is corrupt: its sha256 differs"),
    Refusal("canary rows missing", lambda t, d: opened(with_canaries(t), 16, lambda p: (
        p / "canary_rows.bin").unlink()), FileNotFoundError, "canary_rows.bin listed in the manifest is missing"),
    Refusal("canary texts changed", lambda t, d: opened(with_canaries(t), 16, lambda p: (
        p / "canary.jsonl").write_bytes((p / "canary.jsonl").read_bytes().replace(b'"x"', b'"z"'))), ValueError,
        "canary.jsonl is corrupt: its sha256 differs"),
    Refusal("canary texts missing", lambda t, d: opened(with_canaries(t), 16, lambda p: (p / "canary.jsonl").unlink()),
            FileNotFoundError, "canary.jsonl listed in the manifest is missing"),
    *[Refusal(f"CanarySet {what}", lambda t, d, args=args: CanarySet(*args),
              ValueError, message) for what, args, message in (
        ("repeats 0", (["x"], [[1]], 16, 0), "CanarySet: repeats must be >= 1, got 0"),
        ("texts and ids of different lengths", (["x", "y"], [[1]], 16), "CanarySet: needs one text per document"),
        ("seq_len 0", (["x"], [[1]], 0), "CanarySet: seq_len must be >= 1, got 0"),
    )],
    Refusal("canary id outside the vocabulary", lambda t, d: write_packed_shards(
        [], str(t), 10, canary=CanarySet(["x"], [[1, 10]], 4)), ValueError,
        r"token ids must be in \[0, 10\)"),
    *[Refusal(f"ShardedSampler {what}", lambda t, d, kwargs=kwargs: ShardedSampler(
        **kwargs), ValueError, message) for what, kwargs, message in (
        ("dp_rank past dp_size", dict(num_rows=10, dp_rank=4, dp_size=4), r"dp_rank must be in \[0, 4\), got 4"),
        ("micro-batch 0", dict(num_rows=10, micro_batch_size=0),
         "micro_batch_size and accumulation_steps must be >= 1"),
        ("fewer rows than one global batch", dict(num_rows=10, dp_size=2, micro_batch_size=3, accumulation_steps=2),
         "10 rows cannot fill one global batch of 12"),
    )],
    Refusal("ShardedSampler resumed with another data seed", lambda t, d: ShardedSampler(103, 1, 4, seed=5)
            .load_state_dict({"epoch": 0, "position": 0, "seed": 6}), ValueError,
            "the checkpoint's data seed 6 differs from 5"),
    Refusal("tokenizer path without a tokenizer", lambda t, d: load_tokenizer(
        str(t)), FileNotFoundError, "expected a sentencepiece .model file or a directory with tokenizer.json"),
    *[Refusal(f"document source {what}", lambda t, d, name=name, field=field: documents_of(t, name, field),
              error, message) for what, name, field, error, message in (
        ("DatasetDict without a split", "dd", "text", ValueError,
         r"is a DatasetDict: name one split as .*:SPLIT, SPLIT one of \['test', 'train'\]"),
        ("Dataset with a split", "ds:train", "text", ValueError, "holds a single Dataset, it has no split 'train'"),
        ("parquet without the text column", "a.parquet", "text", ValueError,
         r"no 'text' column \(columns: \['id', 'body'\]\)"),
        ("Dataset without the --text_field column", "ds", "body", ValueError, "no 'body' column"),
        ("jsonl line without the field", "a.jsonl", "text", ValueError, r"a.jsonl:2: no 'text' field"),
        ("directory not written by save_to_disk", "", "text", ValueError,
         "is a directory but not one written by datasets' save_to_disk"),
        ("missing", "none:train", "text", FileNotFoundError, "does not exist"),
        ("of an unknown format", "a.csv", "text", ValueError, "supported inputs are"),
    )],
    # the machine: a CPU without the SIMD level the extension was built for (recorded /proc/cpuinfo flags)
    *[Refusal(f"extension built for {level} on the {cpu}", lambda t, d, level=level, cpu=cpu: check_cpu_supports(
        level, frozenset(RECORDED_CPUS[cpu][0].split())), ImportError,
        rf"built for the SIMD level {level}, which this CPU lacks \(no .*avx.*\).*`GOLDFISH_CPU_CAPABILITY="
        rf"{RECORDED_CPUS[cpu][1]} pip install --no-build-isolation -e \.`")
      for level, cpu in (("AVX512_BF16", "Core i7-4510U"), ("AVX512", "Core i7-4510U"),
                         ("AVX2", "Core i5-6267U under VirtualBox"), ("AVX512", "Core i5-6267U under VirtualBox"))],
    Refusal("HF checkpoint index whose weight_map is a list", lambda t, d: HFCheckpoint(str(write_json(
        t / "model.safetensors.index.json", {"weight_map": ["a"]}) and t)), ValueError,
        '"weight_map" must map tensor names to files, got list'),
    Refusal("DeepSpeed config that is not JSON", lambda t, d: load_deepspeed_config(
        str((t / "ds.json").write_text("{") and t / "ds.json"), 1, TINY), ValueError,
        r"--deepspeed_config .*ds\.json: not valid JSON"),
    Refusal("HF export max_shard_size", lambda t, d: parse_size("5XB"), ValueError,
            "max_shard_size must be a positive number of bytes"),
    # DeepSpeed configs
    *[Refusal(f"DeepSpeed config {what}", lambda t, d, changes=changes, dp=dp: load_deepspeed_config(
        ds_config(t, **changes), dp, TINY), ValueError, message) for what, changes, dp, message in (
        ("train_batch_size", {"train_batch_size": 16}, 3, "train_batch_size 16 != .* data-parallel size 3"),
        ("optimizer section", {"optimizer": {"type": "Adam"}}, 1, "remove the 'optimizer' section"),
        ("scheduler section", {"scheduler": {"type": "WarmupLR"}}, 1, "remove the 'scheduler' section"),
        ("micro-batch 0", {"train_micro_batch_size_per_gpu": 0}, 1,
         "train_micro_batch_size_per_gpu must be a positive integer"),
        *[(f"{key} auto", {key: "auto"}, 1, rf'{key.replace("__", ".")} is "auto"; only these zero_optimization '
           r'sizes may be "auto": reduce_bucket_size') for key in (
            "train_micro_batch_size_per_gpu", "zero_optimization__stage", "bf16__enabled")],
    )],
]


def _refusals_on_ranks(rank: int, world: int, out: str) -> None:
    """Every row of `world` ranks, in one job; rank 0 writes {row index: [exception type, message]}."""
    outcomes = {}
    for index, case in enumerate(API_REFUSALS):
        if case.ranks == world:
            try:
                case.call(rank)
                outcomes[index] = [None, "no error"]
            except Exception as e:
                outcomes[index] = [type(e).__name__, str(e)]
    if rank == 0:
        Path(out).write_text(json.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes_on_two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ranks") / "outcomes.json"
    run_distributed(_refusals_on_ranks, 2, str(out))
    return {int(index): outcome for index, outcome in json.loads(out.read_text()).items()}


def api_params():
    for index, case in enumerate(API_REFUSALS):
        for device in DEVICES if case.devices else ["cpu"]:
            marks = device.marks if hasattr(device, "marks") else ()
            device = device.values[0] if hasattr(device, "values") else device
            yield pytest.param(index, device, id=f"{case.what}-{device}" if case.devices else case.what, marks=marks)


@pytest.mark.parametrize("index, device", list(api_params()))
def test_python_api_refuses(index, device, tmp_path, request):
    case = API_REFUSALS[index]
    if case.ranks == 2:
        error, message = request.getfixturevalue("outcomes_on_two_ranks")[index]
        assert error == case.error.__name__ and re.search(case.message, message), message
        return
    with pytest.raises(case.error, match=case.message):
        case.call(tmp_path, device)


# ---- pretrain.py options refused by parse_args --------------------------------------------------------------

ARGUMENT_REFUSALS = {  # what: (argv, error, message); SystemExit: argparse's own error on stderr
    "--max_steps 0": (["--max_steps", "0"], ValueError, "--max_steps must be >= 1, got 0"),
    "--seq_len 0": (["--seq_len", "0"], ValueError, "--seq_len must be >= 1, got 0"),
    "--tensor_parallel 0": (["--tensor_parallel", "0"], ValueError, "--tensor_parallel must be >= 1, got 0"),
    "--eval_rows 0": (["--eval_rows", "0"], ValueError, "--eval_rows must be >= 1, got 0"),
    "--keep_checkpoints 0": (["--keep_checkpoints", "0"], ValueError, "--keep_checkpoints must be >= 1, got 0"),
    "--save_interval 0": (["--save_interval", "0"], ValueError, "--save_interval must be >= 1, got 0"),
    "--log_interval 0": (["--log_interval", "0"], ValueError, "--log_interval must be >= 1, got 0"),
    "--warmup_steps -1": (["--warmup_steps", "-1"], ValueError, "--warmup_steps must be >= 0, got -1"),
    "--eval_interval -1": (["--eval_interval", "-1"], ValueError, "--eval_interval must be >= 0, got -1"),
    "--dist_timeout 0": (["--dist_timeout", "0"], ValueError, "--dist_timeout must be > 0 seconds, got 0.0"),
    "--lr 0": (["--lr", "0"], ValueError, "--lr must be > 0, got 0.0"),
    "--min_lr above --lr": (["--lr", "1e-3", "--min_lr", "1e-2"], ValueError, r"--min_lr must be in \[0, --lr=0.001\]"),
    "--peak_tflops 0": (["--peak_tflops", "0"], ValueError, r"--peak_tflops must be > 0 \(TFLOP/s of one device\)"),
    "--wandb_run_name without --wandb_project": (["--wandb_run_name", "run1"], ValueError,
                                                 "--wandb_run_name names a W&B run: give --wandb_project too"),
    "--exit_after_minutes 0": (["--exit_after_minutes", "0"], ValueError,
                               r"--exit_after_minutes must be > 0 minutes, got 0.0"),
    "--max_skipped_steps 0": (["--max_skipped_steps", "0"], ValueError, "--max_skipped_steps must be >= 1, got 0"),
    "--spike_factor 0.5": (["--spike_factor", "0.5"], ValueError,
                           r"--spike_factor must be 0 \(off\) or > 1, got 0.5"),
    "--reshard without --resume": (["--reshard"], ValueError,
                                   "--reshard converts the checkpoint that --resume loads: give --resume too"),
    "--verify_checkpoint without --resume": (["--verify_checkpoint"], ValueError,
                                             "--verify_checkpoint checks the checkpoint a run resumes from: give "
                                             "--resume or --resume_from TAG too"),
    "--hf_max_shard_size 5XB": (["--hf_max_shard_size", "5XB"], ValueError,
                                "--hf_max_shard_size must be a positive number of bytes"),
    "--goldfish_k 1": (["--goldfish_k", "1"], ValueError, "k must be an integer >= 2"),
    "--goldfish_h 0": (["--goldfish_h", "0"], ValueError, "h must be an integer >= 1"),
    "--goldfish_start_position -1": (["--goldfish_start_position", "-1"], ValueError, "start_position must be"),
    "--goldfish_exempt_ids a,b": (["--goldfish_exempt_ids", "a,b"], ValueError,
                                  "--goldfish_exempt_ids must be 'special', 'none' or comma-separated integers"),
    "--goldfish_table_path missing": (["--goldfish_table_path", "/nonexistent.bin"], FileNotFoundError,
                                      "table_path '/nonexistent.bin' does not exist"),
    "--goldfish_strategy unknown": (["--goldfish_strategy", "hash"], SystemExit,
                                    "argument --goldfish_strategy: invalid choice: 'hash'"),
    "--goldfish_window unknown": (["--goldfish_window", "after"], SystemExit,
                                  "argument --goldfish_window: invalid choice: 'after'"),
    "--max_steps not an integer": (["--max_steps", "ten"], SystemExit, "argument --max_steps: invalid int value"),
    "--config with unknown options": (["--config", "{tmp}/run.json"], ValueError,
                                      r"--config .*run\.json: unknown options \['max_step'\]"),
}


@pytest.mark.parametrize("what", ARGUMENT_REFUSALS)
def test_pretrain_options_are_refused_by_parse_args(what, tmp_path, capsys):
    from goldfish_ds.training import parse_args

    argv, error, message = ARGUMENT_REFUSALS[what]
    write_json(tmp_path / "run.json", {"max_step": 3})
    with pytest.raises(error) as raised:
        parse_args([a.format(tmp=tmp_path) for a in argv])
    text = capsys.readouterr().err if error is SystemExit else str(raised.value)
    assert re.search(message, text), text


# ---- pretrain.py inputs refused while the job starts ----------------------------------------------------------

@dataclass(frozen=True)
class JobRefusal:
    """make(corpus, tmp) -> (extra argv, extra environment), for a scratch directory tmp; the job must raise
    `error` (ValueError or FileNotFoundError: what pretrain.py reports in one line) matching `message`."""

    what: str
    make: Callable
    error: type
    message: str


def corpus_copy(corpus: Path, tmp: Path, change: Callable[[Path], object]) -> list:
    data = tmp / "train"
    shutil.copytree(corpus / "train", data)
    change(data)
    return ["--data", str(data)]


def hf_option(make_checkpoint: Callable[[Path], Path]):
    return lambda corpus, tmp: (["--init_from_hf", str(make_checkpoint(tmp))], {})


JOB_REFUSALS = [
    JobRefusal("--data shard missing", lambda c, t: (corpus_copy(c, t, lambda d: (d / "tokens_00000.bin").unlink()),
                                                     {}), FileNotFoundError, "tokens_00000.bin .*is missing"),
    JobRefusal("--data shard truncated", lambda c, t: (corpus_copy(c, t, lambda d: truncated(
        d / "tokens_00000.bin", 100)), {}), ValueError, "tokens_00000.bin is corrupt"),
    JobRefusal("--data directory without a manifest", lambda c, t: (["--data", str(t)], {}), FileNotFoundError,
               "no manifest.json"),
    JobRefusal("--val_data without --data", lambda c, t: (["--data", None], {}), ValueError,
               "--val_data and --tokenizer describe --data"),
    JobRefusal("--val_data without a row", lambda c, t: (["--val_data", str(write_shards(t / "val", [[1, 5, 6, 2]]))],
                                                         {}), ValueError,
               r"--val_data .* has no row of --seq_len \+ 1 = 65 tokens"),
    JobRefusal("--data tokenized with a larger vocabulary", lambda c, t: (
        ["--data", str(write_shards(t / "big", [list(range(200))] * 40, vocab=VOCAB + 1))], {}),
        ValueError, f"was tokenized with a vocabulary of {VOCAB + 1}, larger than the model's vocab_size {VOCAB}"),
    JobRefusal("--tokenizer larger than the model", lambda c, t: (["--model_config", write_json(
        t / "small.json", {**json.loads((c / "model.json").read_text()), "vocab_size": 1024})], {}), ValueError,
        f"tokenizer .* has {VOCAB} tokens, more than the model's vocab_size 1024"),
    JobRefusal("--tokenizer missing", lambda c, t: (["--tokenizer", str(t / "tok.model")], {}), FileNotFoundError,
               "tok.model"),
    JobRefusal("--document_attention without --tokenizer", lambda c, t: (["--config", write_json(
        t / "run.json", {"document_attention": True}), "--tokenizer", None], {}), ValueError,
        "--document_attention finds the documents of a packed row by their EOS tokens: give the data's --tokenizer"),
    JobRefusal("--document_attention with a tokenizer without EOS", lambda c, t: (["--config", write_json(
        t / "run.json", {"document_attention": True}), "--tokenizer", str(tokenizer_without_eos(t / "tok"))], {}),
        ValueError, r"--document_attention finds .* but tokenizer .*tok has no EOS token"),
    JobRefusal("--model_config missing", lambda c, t: (["--model_config", str(t / "none.json")], {}),
               FileNotFoundError, r"model config .*none\.json does not exist"),
    JobRefusal("--model_config not a Llama", lambda c, t: (["--model_config", write_json(
        t / "gpt2.json", {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32})], {}), ValueError,
        r"model config .*gpt2\.json: LlamaConfig: model_type 'gpt2' is not supported \(only 'llama'\)"),
    JobRefusal("--tensor_parallel 2 on one rank", lambda c, t: (["--tensor_parallel", "2"], {}), ValueError,
               "tensor_parallel_size must be a positive divisor of the world size 1, got 2"),
    JobRefusal("--deepspeed_config train_batch_size", lambda c, t: (["--deepspeed_config", ds_config(
        t, train_batch_size=64)], {}), ValueError, "train_batch_size 64 != "),
    JobRefusal("--deepspeed_config fewer rows than one global batch", lambda c, t: (["--deepspeed_config", ds_config(
        t, train_micro_batch_size_per_gpu=64, gradient_accumulation_steps=64)], {}), ValueError,
        r"fewer than one global batch of 4096 \(--deepspeed_config"),
    JobRefusal("--deepspeed_config missing", lambda c, t: (["--deepspeed_config", str(t / "none.json")], {}),
               FileNotFoundError, r"none\.json"),
    JobRefusal("--init_from_hf without config.json", hf_option(lambda t: t), FileNotFoundError,
               r"model config .*config\.json does not exist"),
    JobRefusal("--init_from_hf config not a Llama", hf_option(lambda t: edited_json(
        tiny_hf(t / "hf") / "config.json", model_type="mistral").parent), ValueError,
        r"config\.json: LlamaConfig: model_type 'mistral' is not supported"),
    JobRefusal("--init_from_hf without a tensor", hf_option(lambda t: without_tensor(
        tiny_hf(t / "hf"), "model.norm.weight")), ValueError, "model.safetensors has no tensor 'model.norm.weight'"),
    JobRefusal("--init_from_hf tensor of another shape", hf_option(lambda t: edited_json(
        tiny_hf(t / "hf") / "config.json", intermediate_size=48).parent), ValueError,
        r"gate_proj.weight in model.safetensors has shape \(64, 32\), this model expects \(48, 32\)"),
    JobRefusal("--init_from_hf shard missing", hf_option(sharded_without_second), FileNotFoundError,
               "named in model.safetensors.index.json, is missing"),
    JobRefusal("--init_from_hf shard truncated", hf_option(lambda t: truncated(
        tiny_hf(t / "hf") / "model.safetensors", 5000).parent), ValueError,
        "model.safetensors cannot be read as a safetensors file"),
    JobRefusal("launcher variables of several ranks, incomplete", lambda c, t: ([], {"WORLD_SIZE": "2"}), ValueError,
               LAUNCH_ENV_SEVERAL),
    JobRefusal("MASTER_ADDR that does not resolve", lambda c, t: ([], {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "no-such-host.invalid",
        "MASTER_PORT": "29500"}), ValueError, "rank 0's address 'no-such-host.invalid' does not resolve"),
    JobRefusal("--network_interface that is not up", lambda c, t: (["--network_interface", "nosuch0"], {}), ValueError,
               r"network interface 'nosuch0' is not up .*\(up: .*lo"),
]


def write_shards(directory: Path, docs: list, vocab: int = VOCAB) -> Path:
    write_packed_shards(docs, str(directory), vocab)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The built-in corpus with a 2k sentencepiece tokenizer: train/, val/, tok.model, model.json (tiny, V=2048)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = builtin_documents()
    tok = load_tokenizer(train_sentencepiece(docs[8:], str(root / "tok"), vocab_size=VOCAB))
    for name, texts in (("train", docs[8:]), ("val", docs[:8])):
        write_shards(root / name, ([tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts))
    write_json(root / "model.json", {**json.loads((REPO / "configs" / "models" / "tiny.json").read_text()),
                                     "vocab_size": VOCAB})
    return root


def job_argv(corpus: Path, out_dir: Path, extra: list) -> list:
    """A valid tiny job's options, with `extra` (option, value pairs) replacing them; a value None drops one."""
    options = {"--deepspeed_config": ds_config(out_dir.parent), "--out_dir": str(out_dir),
               "--data": str(corpus / "train"), "--val_data": str(corpus / "val"),
               "--tokenizer": str(corpus / "tok.model"), "--model_config": str(corpus / "model.json"),
               "--seq_len": "64", "--max_steps": "2"}
    options.update(zip(extra[::2], extra[1::2]))
    return [x for option, value in options.items() if value is not None for x in (option, value)] + [
        "--no-progress", "--no-export_hf"]


@pytest.fixture(scope="module")
def job_outcomes(corpus, tmp_path_factory) -> dict:
    """What Job(parse_args(argv)) raised for each JOB_REFUSALS row, from one worker process."""
    cases = []
    for case in JOB_REFUSALS:
        tmp = tmp_path_factory.mktemp("job")
        scratch = tmp / "scratch"
        scratch.mkdir()
        extra, env = case.make(corpus, scratch)
        cases.append({"what": case.what, "argv": job_argv(corpus, tmp / "out", extra), "env": env})
    plan = tmp_path_factory.mktemp("plan") / "cases.json"
    write_json(plan, cases)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, __file__, str(plan)], capture_output=True, text=True, timeout=600,
                            env=dict(environment, OMP_NUM_THREADS="1"), cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("index", range(len(JOB_REFUSALS)), ids=[case.what for case in JOB_REFUSALS])
def test_pretrain_inputs_are_refused_before_training(index, job_outcomes):
    case = JOB_REFUSALS[index]
    outcome = job_outcomes[case.what]
    assert outcome["error"] == case.error.__name__, outcome
    assert re.search(case.message, outcome["message"]), outcome["message"]


def run_job_refusals(plan: str) -> None:
    """The worker: Job(parse_args(argv)) for every case, in this one process; prints {what: outcome} as JSON."""
    from goldfish_ds.parallel import model_parallel_is_initialized
    from goldfish_ds.training import Job, parse_args

    base = dict(os.environ)
    outcomes = {}
    for case in json.loads(Path(plan).read_text()):
        os.environ.clear()
        os.environ.update(base, **case["env"])
        try:
            Job(parse_args(case["argv"]))
            outcome = {"error": None, "message": "the job started"}
        except (ValueError, FileNotFoundError) as e:  # what scripts/pretrain.py reports in one line
            outcome = {"error": type(e).__name__, "message": str(e)}
        except Exception as e:  # anything else would reach the user as a traceback
            outcome = {"error": type(e).__name__, "message": traceback.format_exc()}
        if model_parallel_is_initialized():  # the next Job makes its own groups
            destroy_model_parallel()
        outcomes[case["what"]] = outcome
    print(json.dumps(outcomes))


# ---- the real command line: one line, no traceback ------------------------------------------------------------

CLI_ONE_LINE = ["--init_from_hf shard truncated", "launcher variables of several ranks, incomplete"]  # JOB rows


@pytest.mark.parametrize("what", CLI_ONE_LINE)
def test_pretrain_reports_a_refusal_in_one_line(what, corpus, tmp_path):
    case = next(c for c in JOB_REFUSALS if c.what == what)
    (tmp_path / "scratch").mkdir()
    extra, env = case.make(corpus, tmp_path / "scratch")
    result = subprocess.run([sys.executable, str(PRETRAIN), *job_argv(corpus, tmp_path / "out", extra)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("pretrain.py: error: ") and re.search(case.message, last), last


# ---- the count -----------------------------------------------------------------------------------------------

def refusal_count() -> int:
    return len(API_REFUSALS) + len(ARGUMENT_REFUSALS) + len(JOB_REFUSALS)


def test_the_readme_states_the_count():
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{refusal_count()} bad inputs are refused with a message naming the option or argument" in readme


if __name__ == "__main__":
    run_job_refusals(sys.argv[1])

"""HF interop: import a `LlamaForCausalLM` checkpoint into a (tensor-parallel) Llama, export back to HF.

Weights are read one tensor at a time, and each rank reads only the rows and columns of its tensor-parallel
slice: from safetensors through `safe_open(...).get_slice`, from `pytorch_model*.bin` through a memory-mapped
`torch.load(weights_only=True)` (never arbitrary pickle). Single files and sharded checkpoints
(`*.index.json`) both work. HF's Llama uses rotate-half rotary embeddings like ours, so q/k need no
permutation (Meta's original checkpoints do; convert those with HF's script first). Column-parallel weights
(q, k, v, gate, up) are split by rows, row-parallel ones (o, down) by columns, the vocabulary by rows (padded
to a multiple of the tensor-parallel size with zero rows; the padding is stripped on export).

Export writes HF's layout (`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
`max_shard_size` bytes and `model.safetensors.index.json`) from global rank 0, which holds one shard and one
tensor at a time; the other ranks send it their slices tensor by tensor.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from goldfish_ds.models.llama import Llama, LlamaConfig, RMSNorm
from goldfish_ds.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         VocabParallelLMHead, uninitialised_weights)
from goldfish_ds.parallel.state import group_rank_and_size

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


# ---- reading ------------------------------------------------------------------------------------------

class HFCheckpoint:
    """The tensors of an HF checkpoint directory, read one at a time (or a block of rows and columns of one).

    Looks, in HF's order, for model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin. Every read opens the file and closes it again, so no mapping of it outlives the read.
    A missing file is a FileNotFoundError, an unreadable one (corrupt, truncated, not a checkpoint) a ValueError;
    both name the file.
    """

    def __init__(self, directory: str) -> None:
        root = Path(directory)
        self.directory = root
        self.files: Dict[str, Path] = {}  # tensor name -> the file holding it
        for index, single in ((SAFETENSORS_INDEX, "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (root / index).is_file():
                self.source = index
                self.files = {name: root / file for name, file in self._weight_map(root / index).items()}
                for file in sorted(set(self.files.values())):
                    if not file.is_file():
                        raise FileNotFoundError(f"HF checkpoint {directory}: {file.name}, named in {index}, is missing")
                break
            if (root / single).is_file():
                self.source = single
                self.files = {name: root / single for name in self._names(root / single)}
                break
        else:
            raise FileNotFoundError(f"HF checkpoint {directory}: no model.safetensors, {SAFETENSORS_INDEX}, "
                                    f"pytorch_model.bin or pytorch_model.bin.index.json")

    @staticmethod
    def _weight_map(index: Path) -> Dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"HF checkpoint {index.parent}: {index.name} is not an index of shards (a JSON object "
                             f"with a \"weight_map\" of tensor names to files): {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"HF checkpoint {index.parent}: {index.name}: \"weight_map\" must map tensor names to "
                             f"files, got {type(weight_map).__name__}")
        return weight_map

    @staticmethod
    def _open(file: Path):
        """safetensors: a safe_open handle; .bin: the memory-mapped state dict (tensors read on access)."""
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                return safe_open(str(file), framework="pt")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors' SafetensorError, torch.load's RuntimeError / UnpicklingError, OSError
            kind = "safetensors" if file.suffix == ".safetensors" else "torch.save (zip format)"
            raise ValueError(f"HF checkpoint {file.parent}: {file.name} cannot be read as a {kind} file "
                             f"(corrupt or truncated?): {type(e).__name__}: {str(e).splitlines()[0]}") from None

    @classmethod
    def _names(cls, file: Path) -> List[str]:
        if file.suffix == ".safetensors":
            with cls._open(file) as f:
                return list(f.keys())
        return list(cls._open(file))

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise ValueError(f"HF checkpoint {self.directory}: {self.source} has no tensor {name!r}")
        return self.files[name]

    def names(self) -> List[str]:
        return list(self.files)

    def shape(self, name: str) -> Tuple[int, ...]:
        file = self._file(name)
        if file.suffix == ".safetensors":
            with self._open(file) as f:
                return tuple(f.get_slice(name).get_shape())
        return tuple(self._open(file)[name].shape)

    def read(self, name: str, rows: slice = slice(None), columns: Optional[slice] = None) -> torch.Tensor:
        """tensor[rows] (or tensor[rows, columns]) of tensor `name`, reading only those elements' file pages."""
        file = self._file(name)
        index = (rows,) if columns is None else (rows, columns)
        if file.suffix == ".safetensors":
            with self._open(file) as f:
                return f.get_slice(name)[index]
        return self._open(file)[name][index].clone()  # a copy: the mapping goes with the state dict


def read_hf_state_dict(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory, whole (for small checkpoints and tests)."""
    checkpoint = HFCheckpoint(directory)
    return {name: checkpoint.read(name) for name in checkpoint.names()}


# ---- tensor-parallel layouts ----------------------------------------------------------------------------

class HFParameter(NamedTuple):
    key: str  # the HF tensor name
    param: nn.Parameter
    layout: str  # rows (column-parallel), columns (row-parallel), vocab (rows, padded), replicated
    shape: Tuple[int, ...]  # the full HF shape (vocabulary unpadded)


def hf_parameters(model: Llama) -> List[HFParameter]:
    """Every parameter with its HF name, tensor-parallel layout and full shape, in HF's order (a tied LM head has
    none)."""
    cfg, out = model.cfg, []
    for name, module in model.named_modules():
        key = f"{name}.weight" if name.startswith("lm_head") else f"model.{name}.weight"
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            layout = "rows" if isinstance(module, ColumnParallelLinear) else "columns"
            out.append(HFParameter(key, module.weight, layout, (module.out_features, module.in_features)))
        elif isinstance(module, VocabParallelEmbedding) or (isinstance(module, VocabParallelLMHead)
                                                            and module.tied is None):
            out.append(HFParameter(key, module.weight, "vocab", (cfg.vocab_size, cfg.hidden_size)))
        elif isinstance(module, RMSNorm):
            out.append(HFParameter(key, module.weight, "replicated", (cfg.hidden_size,)))
    return out


def tensor_parallel_shape(model: Llama, entry: HFParameter) -> Tuple[int, ...]:
    """The shape of this rank's tensor-parallel slice of a parameter (the padded vocabulary's, for vocab)."""
    _, tp = group_rank_and_size(model.embed_tokens.group)
    rows, *rest = entry.shape
    if entry.layout == "rows":
        return (rows // tp, *rest)
    if entry.layout == "columns":
        return (rows, rest[0] // tp)
    if entry.layout == "vocab":
        return (math.ceil(rows / tp), *rest)
    return entry.shape


def read_tensor_parallel_rows(model: Llama, checkpoint: HFCheckpoint, entry: HFParameter, start: int,
                              stop: int) -> torch.Tensor:
    """Rows [start, stop) of this rank's tensor-parallel slice of a checkpoint tensor, [stop - start, ...]: only
    those rows (and, row-parallel, this rank's columns) are read; vocabulary padding rows are zeros. The
    checkpoint tensor's shape is checked first."""
    rank, tp = group_rank_and_size(model.embed_tokens.group)
    found = checkpoint.shape(entry.key)
    if found != entry.shape:
        raise ValueError(f"HF checkpoint {checkpoint.directory}: {entry.key} in {checkpoint.files[entry.key].name} "
                         f"has shape {found}, this model expects {entry.shape} (from its config.json)")
    local = tensor_parallel_shape(model, entry)
    if entry.layout == "columns":
        return checkpoint.read(entry.key, slice(start, stop), slice(rank * local[1], (rank + 1) * local[1]))
    if entry.layout == "replicated":
        return checkpoint.read(entry.key, slice(start, stop))
    first, end = rank * local[0] + start, rank * local[0] + stop
    if entry.layout == "rows":
        return checkpoint.read(entry.key, slice(first, end))
    real = checkpoint.read(entry.key, slice(min(first, entry.shape[0]), min(end, entry.shape[0])))
    if len(real) == stop - start:
        return real
    return torch.cat([real, real.new_zeros(stop - start - len(real), *real.shape[1:])])


def load_hf_llama(model: Llama, directory: str) -> None:
    """Copy this rank's tensor-parallel slice of every tensor of an HF checkpoint into `model` (shapes checked),
    one tensor at a time."""
    checkpoint = HFCheckpoint(directory)
    for entry in hf_parameters(model):
        with torch.no_grad():
            entry.param.copy_(read_tensor_parallel_rows(model, checkpoint, entry, 0, len(entry.param)))


def llama_from_hf(directory: str, **model_kwargs) -> Llama:
    """A Llama with the config and weights of an HF checkpoint directory (sharded by the current TP group)."""
    cfg = LlamaConfig.from_json(str(Path(directory) / "config.json"))
    with uninitialised_weights():  # every weight is loaded next
        model = Llama(cfg, **model_kwargs)
    load_hf_llama(model, directory)
    return model


# ---- writing --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size, name: str = "max_shard_size") -> int:
    """Bytes of a size: an int, or a string like "5GB", "500MB", "2GiB" (HF's convention: GB = 10^9 bytes);
    errors name the argument `name`."""
    match = None if isinstance(size, bool) else re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if match and match.group(2).upper() in _UNITS:
        count = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        if count >= 1:
            return count
    raise ValueError(f"{name} must be a positive number of bytes: an int, or a number with a unit among "
                     f"KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 5GB, 500MB), got {size!r}")


def plan_shards(sizes: Dict[str, int], max_shard_size: int) -> List[List[str]]:
    """Tensor names grouped into shards in order, as HF splits: a shard closes when the next tensor would take it
    past max_shard_size bytes (a larger tensor gets a shard of its own)."""
    shards, total = [[]], 0
    for name, size in sizes.items():
        if shards[-1] and total + size > max_shard_size:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def shard_file_names(count: int) -> List[str]:
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                     for i in range(count)]


def _in_writer_tensor_parallel_group(model: Llama) -> bool:
    """Whether this rank is in the tensor-parallel group of global rank 0, the writer."""
    group = model.embed_tokens.group
    if group is None:
        return not dist.is_initialized() or dist.get_rank() == 0
    return dist.get_global_rank(group, 0) == 0


def _gather_tensor_parallel(model: Llama, entry: HFParameter, local: torch.Tensor) -> Optional[torch.Tensor]:
    """The full tensor on tensor-parallel rank 0 (None on the others): one dist.gather of the ranks' slices."""
    group = model.embed_tokens.group
    rank, tp = group_rank_and_size(group)
    if tp == 1 or entry.layout == "replicated":
        return local if rank == 0 else None
    local = local.contiguous()
    if rank != 0:
        dist.gather(local, None, group=group, group_dst=0)
        return None
    if entry.layout == "columns":
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.gather(local, parts, group=group, group_dst=0)
        return torch.cat(parts, dim=1)
    full = local.new_empty(local.shape[0] * tp, *local.shape[1:])  # gathered in place: no second copy
    dist.gather(local, list(full.chunk(tp)), group=group, group_dst=0)
    return full


def save_hf_llama(model: Llama, directory: str, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                  local_tensor: Optional[Callable[[nn.Parameter], Optional[torch.Tensor]]] = None) -> None:
    """Write config.json and the weights in HF's safetensors layout (every rank calls it; global rank 0 writes).

    max_shard_size: bytes or a string like "5GB" (see parse_size); one shard is written as model.safetensors,
    more as model-0000i-of-0000n.safetensors with model.safetensors.index.json. The shards are planned from
    the known full shapes; the writer then gathers one tensor at a time and holds at most one shard.
    local_tensor(param): this rank's whole tensor-parallel slice of `param` on the ranks of the writer's
    tensor-parallel group, None on the others; every rank calls it for every parameter, in order (default:
    the parameter itself). The training side passes a gather of ZeRO-3 partitions here.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    entries = {e.key: e for e in hf_parameters(model)}
    dtype = model.norm.weight.dtype
    sizes = {key: math.prod(e.shape) * dtype.itemsize for key, e in entries.items()}
    shards = plan_shards(sizes, limit)
    files = shard_file_names(len(shards))
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if local_tensor is None:
        in_writer_group = _in_writer_tensor_parallel_group(model)

        def local_tensor(param: nn.Parameter) -> Optional[torch.Tensor]:
            return param.detach() if in_writer_group else None
    root = Path(directory)
    if writer:
        root.mkdir(parents=True, exist_ok=True)
    for names, file in zip(shards, files):
        tensors = {}
        for name in names:
            entry = entries[name]
            local = local_tensor(entry.param)
            full = _gather_tensor_parallel(model, entry, local) if local is not None else None
            if writer:
                full = full[: model.cfg.vocab_size] if entry.layout == "vocab" else full
                tensors[name] = full.to("cpu").contiguous()
        if writer:
            save_file(tensors, str(root / file), metadata={"format": "pt"})
    if writer:
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {name: file for names, file in zip(shards, files) for name in names}}
            (root / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        dtype_name = str(dtype).removeprefix("torch.")  # the dtype the tensors are saved in
        (root / "config.json").write_text(json.dumps({**model.cfg.to_hf_dict(), "torch_dtype": dtype_name}, indent=2))


def export_hf_state_dict(model: Llama, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Full HF-keyed tensors of the model (its parameters, or their gradients), gathered on every rank (for
    small models and tests; save_hf_llama writes big ones)."""
    group = model.embed_tokens.group
    _, tp = group_rank_and_size(group)
    out = {}
    for key, param, layout, _ in hf_parameters(model):
        local = (param.grad if grads else param).detach().contiguous()
        if layout != "replicated" and tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local, group=group)
            local = torch.cat(parts, dim=1 if layout == "columns" else 0)
        out[key] = local[: model.cfg.vocab_size] if layout == "vocab" else local
    return out

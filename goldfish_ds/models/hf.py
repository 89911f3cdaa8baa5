"""HF interop: import a `LlamaForCausalLM` checkpoint into a (tensor-parallel) Llama, export back to HF.

Weights are read from safetensors (or `pytorch_model*.bin` with `weights_only=True`), never arbitrary
pickle. HF's Llama uses rotate-half rotary embeddings like ours, so q/k need no permutation (Meta's
original checkpoints do; convert those with HF's script first). Column-parallel weights (q, k, v, gate,
up) are split by rows, row-parallel ones (o, down) by columns, the vocabulary by rows (padded to a multiple
of the tensor-parallel size; the padding is stripped on export).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from torch import nn

from goldfish_ds.models.llama import Llama, LlamaConfig, RMSNorm
from goldfish_ds.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
from goldfish_ds.parallel.state import group_rank_and_size


def read_hf_state_dict(directory: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single or sharded safetensors, or .bin read weights-only)."""
    from safetensors.torch import load_file

    root = Path(directory)
    files = sorted(root.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory!r}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _sharded_parameters(model: Llama) -> Iterator[Tuple[str, nn.Parameter, str]]:
    """(HF key, parameter, layout) for every parameter; layout is rows, columns, vocab or replicated."""
    for name, module in model.named_modules():
        key = name if name.startswith("lm_head") else f"model.{name}"
        if isinstance(module, ColumnParallelLinear):
            yield f"{key}.weight", module.weight, "rows"
        elif isinstance(module, RowParallelLinear):
            yield f"{key}.weight", module.weight, "columns"
        elif isinstance(module, VocabParallelEmbedding) or (isinstance(module, VocabParallelLMHead) and module.tied is None):
            yield f"{key}.weight", module.weight, "vocab"
        elif isinstance(module, RMSNorm):
            yield f"{key}.weight", module.weight, "replicated"


def load_hf_llama(model: Llama, state_dict: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every tensor of an HF state dict into `model` (shapes are checked)."""
    rank, tp = group_rank_and_size(model.embed_tokens.group)
    for key, param, layout in _sharded_parameters(model):
        if key not in state_dict:
            raise KeyError(f"load_hf_llama: the checkpoint has no {key!r}")
        full = state_dict[key]
        if layout == "rows":
            shard = full.chunk(tp, dim=0)[rank]
        elif layout == "columns":
            shard = full.chunk(tp, dim=1)[rank]
        elif layout == "vocab":
            padded = full.new_zeros(param.shape[0] * tp, full.shape[1])
            padded[: full.shape[0]] = full
            shard = padded[rank * param.shape[0]:(rank + 1) * param.shape[0]]
        else:
            shard = full
        if shard.shape != param.shape:
            raise ValueError(f"load_hf_llama: {key} has shape {tuple(full.shape)}, which does not fit this model's "
                             f"shard {tuple(param.shape)} (tensor-parallel size {tp})")
        with torch.no_grad():
            param.copy_(shard)


def export_hf_state_dict(model: Llama, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Full HF-keyed tensors of the model (its parameters, or their gradients), gathered on every rank."""
    group = model.embed_tokens.group
    _, tp = group_rank_and_size(group)
    out = {}
    for key, param, layout in _sharded_parameters(model):
        local = (param.grad if grads else param).detach().contiguous()
        if layout != "replicated" and tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local, group=group)
            local = torch.cat(parts, dim=1 if layout == "columns" else 0)
        out[key] = local[: model.cfg.vocab_size] if layout == "vocab" else local
    return out


def save_hf_llama(model: Llama, directory: str) -> None:
    """Write config.json and model.safetensors in HF format (every rank calls it; rank 0 writes)."""
    from safetensors.torch import save_file

    state = export_hf_state_dict(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        dtype = str(model.norm.weight.dtype).removeprefix("torch.")  # the dtype the tensors are saved in
        (root / "config.json").write_text(json.dumps({**model.cfg.to_hf_dict(), "torch_dtype": dtype}, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"),
                  metadata={"format": "pt"})


def llama_from_hf(directory: str, **model_kwargs) -> Llama:
    """A Llama with the config and weights of an HF checkpoint directory (sharded by the current TP group)."""
    cfg = LlamaConfig.from_json(str(Path(directory) / "config.json"))
    model = Llama(cfg, **model_kwargs)
    load_hf_llama(model, read_hf_state_dict(directory))
    return model

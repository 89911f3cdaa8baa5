"""Llama (the HF `LlamaForCausalLM` architecture) built from the tensor-parallel layers.

RMSNorm, rotary embeddings in HF's rotate-half convention (plain, linear or llama3-scaled: goldfish_ds.models.rope),
SwiGLU MLP, grouped-query attention (head_dim may differ from hidden_size / num_attention_heads) through
`scaled_dot_product_attention`, tied or untied embeddings. With tensor parallelism each rank holds
num_attention_heads / tp query heads and num_key_value_heads / tp key/value heads, a slice of the MLP, and
a slice of the vocabulary; `forward` returns this rank's slice of the logits, the input of
goldfish_ds.parallel.vocab_parallel_goldfish_cross_entropy, or, given `loss_targets`, that loss itself, computed by
the LM head without a logits buffer (vocab_parallel_goldfish_linear_cross_entropy). Without a tensor-parallel group
it is a plain single-process model.

Document attention (`forward(..., documents=...)`, see `documents_from_eos`): a packed row holds several documents
one after another, and plain causal attention lets each document see the ones before it. With `documents` a
position attends only to the earlier positions of its own document and RoPE positions restart at 0 there, so each
document's logits are those it would get on its own. The price is a [B, 1, T, T] bool mask per forward (shared by
the layers) and, on CUDA, SDPA's memory-efficient kernel instead of flash attention (which takes no mask); grouped
query attention then expands k and v to every query head, as SDPA's fused kernels take no mask with enable_gqa.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from goldfish_ds.models.rope import RopeParameters, rope_parameters_from_hf, rotary_cos_sin
from goldfish_ds.loss import GoldfishStats
from goldfish_ds.parallel.layers import (ColumnParallelLinear, LossTargets, RowParallelLinear, VocabParallelEmbedding,
                                         VocabParallelLMHead)
from goldfish_ds.parallel.state import default_tensor_parallel_group, group_rank_and_size


# Keys of an HF config (LlamaConfig's, and PreTrainedConfig's that LlamaForCausalLM honours) that change the math,
# with the one value Llama implements; any other value is refused.
_ONLY_VALUE = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
               "is_causal": True, "model_type": "llama", "quantization_config": None, "per_layer_config": None}


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture; field names, meanings and defaults are those of HF's LlamaConfig.

    num_key_value_heads defaults to num_attention_heads, head_dim to hidden_size / num_attention_heads (q and o
    have num_attention_heads * head_dim features, k and v num_key_value_heads * head_dim).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters = RopeParameters()
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig: hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim ({self.head_dim}) must be even (rotate-half rotary embedding)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_dict(cls, values: dict) -> "LlamaConfig":
        """From our config JSON, `asdict()` of a LlamaConfig, or an HF config.json of transformers 4 or 5.

        The RoPE is read from either generation's keys (see `rope_parameters_from_hf`). Keys that change the
        math to something Llama does not implement (hidden_act, attention_bias, mlp_bias, attention_dropout,
        partial_rotary_factor, rope types other than default / linear / llama3, ...) are refused by name; keys
        that do not change LlamaForCausalLM's logits (token ids, use_cache, pretraining_tp, dtype, architectures,
        ...) are ignored.
        """
        if not isinstance(values, dict):
            raise ValueError(f"LlamaConfig: a config must be a JSON object, got {type(values).__name__}")
        for key, supported in _ONLY_VALUE.items():
            if values.get(key) not in (None, supported):
                raise ValueError(f"LlamaConfig: {key} {values[key]!r} is not supported (only {supported!r})")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise ValueError(f"LlamaConfig: {', '.join(missing)} missing (a Llama config needs {', '.join(required)})")
        names = {f.name for f in fields(cls)} - {"rope_parameters"}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        max_positions = kwargs.get("max_position_embeddings", cls.max_position_embeddings)
        return cls(**kwargs, rope_parameters=rope_parameters_from_hf(values, max_positions))

    @classmethod
    def from_json(cls, path: str) -> "LlamaConfig":
        """From a JSON file (see from_dict); errors name the file."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as e:  # json's JSONDecodeError is one too
            raise ValueError(f"model config {path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """config.json for HF transformers, with the RoPE in both generations' keys.

        transformers 5 reads `rope_parameters`; transformers 4 ignores that key and reads the top-level
        `rope_theta` and `rope_scaling` instead (transformers 5 reads those too, preferring rope_scaling), so both
        are written and they agree: either generation loads the same RoPE.
        """
        rope = self.rope_parameters.to_hf_dict()
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
        return {**asdict(self), "rope_parameters": rope, "rope_theta": rope["rope_theta"], "rope_scaling": scaling,
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32"}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as HF does (bit-compatible outputs).
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def documents_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The document index [B, T] (int64) of each input position of packed rows input_ids [B, T], for
    `Llama.forward(documents=...)`: a new document starts at the position right after each EOS input token, so the
    row [a, b, EOS, c, EOS, d] gives [0, 0, 0, 1, 1, 2] (a row that starts mid-document is one document up to its
    first EOS)."""
    if isinstance(eos_id, bool) or not isinstance(eos_id, int):
        raise ValueError(f"documents_from_eos: eos_id must be an int token id, got {eos_id!r}")
    ends = (input_ids == eos_id).long()
    return ends.cumsum(-1) - ends


def _document_mask_and_positions(documents: torch.Tensor, input_ids: torch.Tensor):
    """(mask [B, 1, T, T] bool, positions [B, T]) of documents [B, T], or (None, None) when no row has a document
    boundary (plain causal attention is then the same, and keeps SDPA's is_causal path). mask[b, 0, t, s] is True
    where query t may attend key s: s <= t in the same document; positions count from 0 at each document's first
    position. One host sync (the checks, and whether there is a boundary)."""
    if not isinstance(documents, torch.Tensor) or documents.shape != input_ids.shape or documents.is_floating_point() \
            or documents.is_complex() or documents.dtype == torch.bool:
        raise ValueError(f"Llama.forward: documents must be an integer tensor of input_ids' shape "
                         f"{list(input_ids.shape)} (a document index per input position), got "
                         f"{documents.dtype if isinstance(documents, torch.Tensor) else type(documents).__name__}"
                         f"{list(documents.shape) if isinstance(documents, torch.Tensor) else ''}")
    steps = documents.diff(dim=1)
    decreasing, boundary = torch.stack([steps.lt(0).any(), steps.ne(0).any()]).tolist()
    if decreasing:
        raise ValueError("Llama.forward: documents must be non-decreasing along each row (the document index of "
                         "each input position, e.g. from documents_from_eos)")
    if not boundary:
        return None, None
    T = documents.shape[1]
    index = torch.arange(T, device=documents.device)
    starts = F.pad(steps.ne(0), (1, 0), value=True)
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None], positions


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, seed: int, group) -> None:
        super().__init__()
        _, tp = group_rank_and_size(group)
        if cfg.num_key_value_heads % tp:
            raise ValueError(f"Llama: the tensor-parallel size ({tp}) must divide num_key_value_heads "
                             f"({cfg.num_key_value_heads})")
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp, cfg.head_dim
        std = cfg.initializer_range
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, std=std, seed=seed, group=group)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, std=std, seed=seed + 1, group=group)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, std=std, seed=seed + 2, group=group)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, std=std, seed=seed + 3, group=group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, hidden]; cos, sin [T, head_dim] or [B, 1, T, head_dim]; mask None (causal) or [B, 1, T, T] bool."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        else:  # SDPA's fused CUDA kernels take a mask but not with enable_gqa (math kernel): expand k, v instead
            groups = self.heads // self.kv_heads
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                               v.repeat_interleave(groups, dim=1), attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, seed: int, group) -> None:
        super().__init__()
        std = cfg.initializer_range
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, std=std, seed=seed, group=group)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, std=std, seed=seed + 1, group=group)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, std=std, seed=seed + 2, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, seed: int, group) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, seed, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, seed + 10, group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Token ids [B, T] -> this rank's vocabulary slice of the logits [B, T, ceil(V / tp)], or the loss.

    forward(input_ids, positions=None, documents=None, *, loss_targets=None): positions, the RoPE positions [T]
    (every row) or [B, T] (per row), default 0..T-1; documents [B, T], the non-decreasing document index of each
    input position (documents_from_eos), makes attention block-diagonal causal (within a document) and restarts the
    positions at 0 in each document, unless positions are given too (they are then used as given). Without
    documents, or when no row has a boundary, attention is plain causal. loss_targets (a LossTargets: labels [B, T],
    goldfish config, reduction, ...): return the goldfish loss of the logits (and GoldfishStats when
    loss_targets.return_stats) instead of the logits, computed by the LM head on the kept targets only, with no
    N x V logits buffer (VocabParallelLMHead.forward).

    seed: initialisation seed; the parameters are the same at every tensor-parallel size.
    activation_checkpointing: recompute each decoder layer in the backward pass instead of storing it.
    """

    def __init__(self, cfg: LlamaConfig, *, seed: int = 0, activation_checkpointing: bool = False,
                 group=None) -> None:
        super().__init__()
        group = default_tensor_parallel_group(group)
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range,
                                                   seed=seed, group=group)
        self.layers = nn.ModuleList(DecoderLayer(cfg, seed + 100 * (i + 1), group) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = VocabParallelLMHead(cfg.hidden_size, cfg.vocab_size,
                                           tied=self.embed_tokens if cfg.tie_word_embeddings else None,
                                           std=cfg.initializer_range, seed=seed + 1, group=group)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                documents: Optional[torch.Tensor] = None, *, loss_targets: Optional[LossTargets] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, GoldfishStats]]:
        B, T = input_ids.shape
        mask = None
        if documents is not None:
            mask, document_positions = _document_mask_and_positions(documents, input_ids)
            if positions is None:
                positions = document_positions
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"Llama.forward: positions must have shape [T] = [{T}] or [B, T] = [{B}, {T}], got "
                             f"{list(positions.shape)}")
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.cfg.rope_parameters, self.cfg.head_dim, x.dtype)
        if positions.dim() == 2:  # per row: [B, 1, T, head_dim] broadcasts over the heads
            cos, sin = cos[:, None], sin[:, None]
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        # By keyword: ZeRO-3's module hooks look for tensors in the positional inputs and warn about other types.
        return self.lm_head(self.norm(x), loss_targets=loss_targets)

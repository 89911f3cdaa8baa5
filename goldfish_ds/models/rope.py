"""Rotary position embeddings: the RoPE settings of a Llama config and the cos/sin they give.

rope_type "default" is plain RoPE with base rope_theta; "linear" divides every inverse frequency by factor;
"llama3" (Llama 3.1 / 3.2) splits the frequencies into wavelength bands around original_max_position_embeddings:
wavelengths above original / low_freq_factor are divided by factor, those below original / high_freq_factor are
kept, and those in between are interpolated smoothly. The arithmetic is transformers', step for step in float32 (on
the CPU the frequencies are bit-identical to HF's). Other rope types (dynamic, yarn, longrope, ...) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

# The parameters each supported rope_type uses besides rope_theta.
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class RopeParameters:
    """transformers 5's `rope_parameters` (same names); the fields a rope_type does not use are None."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (allowed: {', '.join(ROPE_TYPES)})")
        for name in _SCALING_FIELDS:
            used = name in ROPE_TYPES[self.rope_type]
            if used != (getattr(self, name) is not None):
                raise ValueError(f"rope_type {self.rope_type!r} {'needs' if used else 'does not use'} {name} "
                                 f"(it uses: {', '.join(('rope_theta',) + ROPE_TYPES[self.rope_type])})")
        if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"low_freq_factor ({self.low_freq_factor}) must be below "
                             f"high_freq_factor ({self.high_freq_factor})")

    def to_hf_dict(self) -> dict:
        """The fields in use, as transformers 5 writes them in config.json."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def rope_parameters_from_hf(values: dict, max_position_embeddings: int) -> RopeParameters:
    """The RoPE of a config dict of either transformers generation.

    transformers 5 writes `rope_parameters` (rope_theta inside); transformers 4 writes a top-level `rope_theta` and
    `rope_scaling` (None, or the scaling without rope_theta; `type` was the old name of rope_type). A config may
    carry both if they give the same RoPE, and a rope_theta both at the top level and nested only if they agree:
    the two generations read different ones. A llama3 config without original_max_position_embeddings uses
    max_position_embeddings, as transformers does.
    """
    read = [_read_rope(key, values[key], values, max_position_embeddings)
            for key in ("rope_parameters", "rope_scaling") if values.get(key)]
    if len(read) == 2 and read[0] != read[1]:
        raise ValueError(f"LlamaConfig: rope_parameters {values['rope_parameters']!r} and rope_scaling "
                         f"{values['rope_scaling']!r} (with rope_theta {values.get('rope_theta')!r}) disagree")
    return read[0] if read else _read_rope("rope_parameters", {}, values, max_position_embeddings)


def _read_rope(key: str, nested: dict, values: dict, max_position_embeddings: int) -> RopeParameters:
    params = {k: v for k, v in nested.items() if v is not None}
    legacy_type = params.pop("type", None)
    params.setdefault("rope_type", legacy_type or "default")
    top_theta = values.get("rope_theta")
    if top_theta is not None and params.setdefault("rope_theta", top_theta) != top_theta:
        raise ValueError(f"LlamaConfig: rope_theta {top_theta} and {key}['rope_theta'] {params['rope_theta']} "
                         f"disagree (transformers 4 reads the first, transformers 5 the second)")
    where = f"{key}['partial_rotary_factor']" if "partial_rotary_factor" in params else "partial_rotary_factor"
    partial = params.pop("partial_rotary_factor", values.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise ValueError(f"LlamaConfig: {where} {partial} is not supported (only 1.0: rotary embedding of the "
                         f"whole head)")
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    names = [f.name for f in fields(RopeParameters)]
    try:  # the rope type is checked before the keys: yarn's keys are not the error, yarn is
        rope = RopeParameters(**{k: v for k, v in params.items() if k in names})
    except ValueError as error:
        raise ValueError(f"LlamaConfig: {key} {nested!r}: {error}") from None
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"LlamaConfig: {key} keys {unknown} are not supported for rope_type {rope.rope_type!r} "
                         f"(allowed: {', '.join(('rope_type', 'rope_theta') + ROPE_TYPES[rope.rope_type])})")
    return rope


def rope_inverse_frequencies(rope: RopeParameters, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The inverse frequencies [head_dim / 2] (float32), computed as transformers does (on the CPU, bit-identical)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.rope_theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        original = rope.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        long_waves = wavelength > original / rope.low_freq_factor
        short_waves = wavelength < original / rope.high_freq_factor
        scaled = torch.where(long_waves, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        return torch.where(~short_waves & ~long_waves, blended, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, rope: RopeParameters, head_dim: int, dtype: torch.dtype):
    """cos, sin [..., head_dim] of HF's rotate-half rotary embedding at positions [...]: [T] (every row at the same
    positions) gives [T, head_dim], [B, T] (positions per row) gives [B, T, head_dim]."""
    inv_freq = rope_inverse_frequencies(rope, head_dim, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)

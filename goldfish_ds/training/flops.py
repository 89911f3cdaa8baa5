"""Model FLOPs of a training step from the model's shape (PaLM's count), and the peak throughput of known GPUs.

Model FLOPs per token, forward and backward (Chowdhery et al. 2022, "PaLM", appendix B; the count Megatron-LM's
MFU uses too): 6 N + 12 L H Q T, where N is the number of weights that enter a matmul for every token (each
decoder layer's q, k, v, o, gate, up and down projections and the LM head's V x hidden; not the embedding lookup
nor the norm gains), L the layers, H the query heads, Q the head dimension and T the sequence length. 6 N is
2 N forward plus 4 N backward; 12 L H Q T is the attention scores and the weighted values (2 matmuls of 2 T H Q
per token and layer forward, x 3), over the full T x T square like PaLM's. Model FLOPs, not hardware FLOPs: the
recompute of activation checkpointing, vocabulary padding for tensor parallelism and elementwise work are not
counted, so MFU does not reward them.
"""
from __future__ import annotations

import torch

from goldfish_ds.models import LlamaConfig

FORMULA = ("model FLOPs per token = 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B): N = weights in "
           "matmuls (decoder projections + LM head; not the embedding lookup), L layers, H query heads, Q head_dim, "
           "T --seq_len; activation-checkpointing recompute not counted")

# bf16/fp16 dense tensor-core peak of one device (NVIDIA data sheets). NVL boards, other GPUs and CPUs are not
# listed: their MFU needs --peak_tflops.
PEAK_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200 SXM": 989.0}


def matmul_parameters(cfg: LlamaConfig) -> int:
    """N: the weights that enter a matmul for every token (decoder projections and the LM head)."""
    q_features = cfg.num_attention_heads * cfg.head_dim
    kv_features = cfg.num_key_value_heads * cfg.head_dim
    attention = cfg.hidden_size * (q_features + 2 * kv_features) + q_features * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_hidden_layers * (attention + mlp) + cfg.vocab_size * cfg.hidden_size


def training_flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Model FLOPs of one token's forward and backward pass in rows of seq_len tokens: 6 N + 12 L H Q T."""
    if seq_len < 1:
        raise ValueError(f"training_flops_per_token: seq_len must be >= 1, got {seq_len}")
    return 6 * matmul_parameters(cfg) + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def known_peak_tflops(device_name: str) -> float | None:
    """PEAK_TFLOPS for a torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", ...),
    None for a device not in the table."""
    name = device_name.upper()
    if "NVL" in name:
        return None
    if "A100" in name:
        return PEAK_TFLOPS["A100"]
    if "H100" in name:
        return PEAK_TFLOPS["H100 PCIe"] if "PCIE" in name else PEAK_TFLOPS["H100 SXM"]
    if "H200" in name:
        return PEAK_TFLOPS["H200 SXM"]
    return None


def device_peak_tflops(peak_tflops: float | None, device: torch.device, dtype: torch.dtype) -> float | None:
    """The per-device peak MFU divides by: --peak_tflops if given, else the table's for a listed GPU training in
    bf16 or fp16 (its tensor-core peak says nothing about fp32), else None (MFU is then not logged)."""
    if peak_tflops is not None:
        return peak_tflops
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return known_peak_tflops(torch.cuda.get_device_name(device))


def step_throughput(tokens: float, step_time_s: float, flops_per_token: int, num_devices: int,
                    peak_tflops: float | None) -> dict:
    """A step's model_flops (all devices), tflops_per_s (= model_flops / step_time_s / 1e12) and, when the peak
    is known, mfu (= tflops_per_s / (num_devices x peak_tflops)); tokens and step_time_s: the step's input tokens
    and seconds, or their means over several steps."""
    model_flops = tokens * flops_per_token
    record = {"model_flops": model_flops, "tflops_per_s": model_flops / step_time_s / 1e12}
    if peak_tflops is not None:
        record["mfu"] = record["tflops_per_s"] / (num_devices * peak_tflops)
    return record

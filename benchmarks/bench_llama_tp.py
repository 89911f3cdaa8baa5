"""Tiny Llama forward + backward at TP=1: our tensor-parallel layers vs the same model in plain torch.nn.

The plain model is a copy with every ColumnParallelLinear / RowParallelLinear replaced by nn.Linear,
the embedding by nn.Embedding and the LM head by a plain matmul, holding the same weights; both train
with the same fused goldfish loss. Usage: python benchmarks/bench_llama_tp.py [--batch 8x256] [--repeats 10]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_interleaved  # noqa: E402

from goldfish_ds import GoldfishConfig, goldfish_cross_entropy  # noqa: E402
from goldfish_ds.models import Llama, LlamaConfig  # noqa: E402
from goldfish_ds.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class PlainHead(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def plain_copy(model: Llama) -> nn.Module:
    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight = child.weight
                setattr(parent, name, linear)
            elif isinstance(child, VocabParallelEmbedding):
                embedding = nn.Embedding(child.num_embeddings, child.embedding_dim)
                embedding.weight = child.weight
                setattr(parent, name, embedding)
            elif isinstance(child, VocabParallelLMHead):
                setattr(parent, name, PlainHead(child.tied.weight if child.tied is not None else child.weight))
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "models" / "tiny.json"))
    parser.add_argument("--batch", default="8x256")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    B, T = map(int, args.batch.split("x"))
    cfg = LlamaConfig.from_json(args.config)
    ours = Llama(cfg).train()
    plain = plain_copy(ours).train()
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    goldfish = GoldfishConfig(k=4, h=13)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        goldfish_cross_entropy(model(ids[:, :-1]), ids[:, 1:], goldfish).backward()

    times = time_interleaved({"ours": lambda: step(ours), "plain": lambda: step(plain)}, "cpu", args.repeats)
    tokens = B * T
    print(f"tiny Llama ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters), batch {B}x{T}, "
          f"fwd+bwd, median of {args.repeats}")
    print(f"  ours (TP layers, TP=1): {tokens / times['ours']:9.0f} tokens/s")
    print(f"  plain nn.Linear:        {tokens / times['plain']:9.0f} tokens/s")
    print(f"  ratio ours/plain:       {times['plain'] / times['ours']:.3f}")


if __name__ == "__main__":
    main()

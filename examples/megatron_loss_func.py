"""The goldfish loss in a Megatron-LM `pretrain_gpt.py`-style training step, with megatron-core on CPU ranks.

    torchrun --nproc_per_node 2 examples/megatron_loss_func.py [--steps 5] [--out summary.json]

Tensor parallelism over every rank (gloo). `forward_step` is pretrain_gpt.py's, with its goldfish line;
each micro-batch goes through megatron.core's own `schedules.forward_step` and `schedules.backward_step`
(what `forward_backward_no_pipelining` loops over; that function itself allocates a counter on "cuda").
Megatron's GPTModel cannot run forward on a CPU (its attention takes a buffer on torch.cuda.current_device()),
so `TinyGPT` keeps the parts of GPTModel the loss sees: megatron-core's VocabParallelEmbedding, a
ColumnParallelLinear LM head and LanguageModule.compute_language_model_loss (labels [b, s] -> the
vocab-parallel cross-entropy on [s, b] -> per-token losses [b, s]). Rank 0 prints Megatron's reported
figures per step: the goldfish loss ("lm loss"), the loss on all tokens and the drop rate.
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist

from goldfish_ds import GoldfishConfig
from goldfish_ds.integrations.megatron import goldfish_loss_func

GOLDFISH = GoldfishConfig(k=4, h=13)
VOCAB, HIDDEN, SEQ_LEN, MICRO_BATCH, MICRO_BATCHES = 256, 32, 64, 2, 2
PAD = 0


def make_batches(seed: int = 0) -> list[torch.Tensor]:
    """MICRO_BATCHES micro-batches of MICRO_BATCH rows of SEQ_LEN + 1 ids; the last row ends in PAD padding."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(1, VOCAB, (MICRO_BATCH, SEQ_LEN + 1), generator=gen) for _ in range(MICRO_BATCHES)]
    batches[-1][-1, -SEQ_LEN // 4:] = PAD
    return batches


def get_batch(data_iterator: Iterator[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """pretrain_gpt.py's get_batch, for one row tensor: tokens, labels, loss_mask, position_ids, all [b, s]."""
    rows = next(data_iterator)
    tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    loss_mask = labels.ne(PAD).float()  # Megatron's GPTDataset zeroes the loss on padding
    position_ids = torch.arange(SEQ_LEN).unsqueeze(0).expand_as(tokens)
    return tokens, labels, loss_mask, position_ids


def build_model():
    """TinyGPT on megatron-core's tensor-parallel layers (parallel_state must be initialised)."""
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.transformer import TransformerConfig

    class TinyGPT(LanguageModule):
        """Embedding and LM head of a GPTModel; forward returns the [b, s] per-token losses given labels."""

        def __init__(self, config: TransformerConfig) -> None:
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            init = partial(torch.nn.init.normal_, std=0.5)
            self.embedding = tensor_parallel.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=init, config=config)
            self.output_layer = tensor_parallel.ColumnParallelLinear(HIDDEN, VOCAB, config=config, init_method=init,
                                                                     bias=False, gather_output=False)

        def set_input_tensor(self, input_tensor) -> None:  # called by the schedules; a single pipeline stage
            pass

        def logits(self, tokens: torch.Tensor) -> torch.Tensor:
            """[s, b, V/tp]: this rank's vocabulary slice, in Megatron's sequence-first layout."""
            return self.output_layer(self.embedding(tokens).transpose(0, 1).contiguous())[0]

        def forward(self, tokens, position_ids, attention_mask, labels=None):
            return self.compute_language_model_loss(labels, self.logits(tokens))

    torch.manual_seed(1234)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, use_cpu_initialization=True,
                               perform_initialization=True)
    return TinyGPT(config)


def forward_step(data_iterator, model):
    """pretrain_gpt.py's forward_step; the goldfish change is the loss_func in the return line."""
    tokens, labels, loss_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, None, labels=labels)
    return output_tensor, partial(goldfish_loss_func, GOLDFISH, labels, loss_mask)


def train_step(model, batches: list[torch.Tensor]) -> dict:
    """One iteration through megatron.core's schedules; Megatron's reported figures (numerator / denominator)."""
    from megatron.core.pipeline_parallel import schedules

    store: list[dict] = []
    data = iter(batches)
    for i in range(len(batches)):
        output_tensor, _ = schedules.forward_step(forward_step, data, model, len(batches), None, store, model.config,
                                                  1, current_microbatch=i)
        schedules.backward_step(None, output_tensor, None, model.model_type, model.config)
    return {key: (lambda v: (v[0] / v[1]).item())(torch.stack([d[key] for d in store]).sum(0)) for key in store[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training iterations")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    parser.add_argument("--out", default=None, help="write rank 0's per-step figures to this JSON file")
    args = parser.parse_args()
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")

    from megatron.core import parallel_state

    dist.init_process_group("gloo")  # torchrun's environment
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    batches = make_batches()
    history = []
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        report = train_step(model, batches)
        optimizer.step()
        history.append(report)
        if dist.get_rank() == 0:
            print(f"step {step}: " + ", ".join(f"{key} {value:.4f}" for key, value in report.items()), flush=True)
    if dist.get_rank() == 0 and args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(history, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

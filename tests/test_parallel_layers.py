"""Tensor-parallel layers and collectives on real gloo ranks, against the same computation in plain torch."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy
from goldfish_ds.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                                  copy_to_tensor_parallel_region, destroy_model_parallel,
                                  gather_from_tensor_parallel_region, initialize_model_parallel, mpu,
                                  reduce_from_tensor_parallel_region, scatter_to_tensor_parallel_region,
                                  tensor_parallel_group, vocab_parallel_goldfish_cross_entropy)

CFG = GoldfishConfig(k=4, h=3)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def gather(shard, dim):
    group = tensor_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def body_collectives(rank, world):
    initialize_model_parallel(world)
    try:
        x = torch.arange(2 * 4 * world, dtype=torch.float32).reshape(2, 4 * world).requires_grad_()
        # reduce: forward sums the ranks' tensors, backward passes the gradient through
        y = reduce_from_tensor_parallel_region(x * (rank + 1))
        assert torch.equal(y, x.detach() * sum(range(1, world + 1)))
        y.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, rank + 1.0))
        # copy: identity forward, backward sums the ranks' gradients
        x.grad = None
        copy_to_tensor_parallel_region(x).mul(rank + 1).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, float(sum(range(1, world + 1)))))
        # scatter / gather along the last dimension are inverse
        part = scatter_to_tensor_parallel_region(x)
        assert torch.equal(part, x.detach()[:, rank * 4:(rank + 1) * 4])
        assert torch.equal(gather_from_tensor_parallel_region(part), x.detach())
        # mpu as DeepSpeed reads it
        assert mpu.get_model_parallel_world_size() == world and mpu.get_data_parallel_world_size() == 1
        assert mpu.get_tensor_model_parallel_rank() == rank and not hasattr(mpu, "initialize_sequence_parallel")
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("world", [2, 4])
def test_collectives(world):
    run_distributed(body_collectives, world)


def body_model(rank, world, vocab):
    """Embedding -> column -> gelu -> row -> tied LM head -> vocab-parallel goldfish loss, vs plain torch."""
    initialize_model_parallel(world)
    try:
        hidden, ffn = 16, 8 * world
        embed = VocabParallelEmbedding(vocab, hidden, seed=1)
        up = ColumnParallelLinear(hidden, ffn, seed=2)
        down = RowParallelLinear(ffn, hidden, seed=3)
        head = VocabParallelLMHead(hidden, vocab, tied=embed)
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        labels = torch.randint(0, vocab, (2, 12), generator=g)

        h = embed(ids)
        h = h + down(F.gelu(up(h)))
        loss = vocab_parallel_goldfish_cross_entropy(head(h), labels, CFG)
        loss.backward()
        assert all(p.tensor_model_parallel for p in (embed.weight, up.weight, down.weight))

        full_embed = gather(embed.weight.detach(), 0).requires_grad_()
        full_up, full_down = gather(up.weight.detach(), 0).requires_grad_(), gather(down.weight.detach(), 1).requires_grad_()
        assert torch.count_nonzero(full_embed[vocab:]) == 0  # vocabulary padding rows stay zero
        h = F.embedding(ids, full_embed)
        h = h + F.linear(F.gelu(F.linear(h, full_up)), full_down)
        ref = goldfish_cross_entropy(F.linear(h, full_embed[:vocab]), labels, CFG, in_place=False)
        ref.backward()
        assert rel(loss, ref) <= 1e-6
        assert rel(gather(embed.weight.grad, 0), full_embed.grad) <= 1e-5
        assert rel(gather(up.weight.grad, 0), full_up.grad) <= 1e-5
        assert rel(gather(down.weight.grad, 1), full_down.grad) <= 1e-5
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("world, vocab", [(2, 100), (2, 101), (4, 98)])
def test_tensor_parallel_model_matches_plain_torch(world, vocab):
    run_distributed(body_model, world, vocab)


def body_data_parallel_groups(rank, world):
    initialize_model_parallel(2)
    try:
        assert mpu.get_model_parallel_rank() == rank % 2 and mpu.get_data_parallel_rank() == rank // 2
        assert mpu.get_data_parallel_world_size() == 2
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
        assert t.item() == (0 + 2 if rank % 2 == 0 else 1 + 3)  # ranks holding the same TP shard
    finally:
        destroy_model_parallel()


def test_tp2_dp2_groups():
    run_distributed(body_data_parallel_groups, 4)


def test_weights_are_drawn_on_the_cpu_and_copied_where_allocated(monkeypatch):
    """zero.Init on a GPU allocates parameters on the accelerator, where a CPU generator cannot draw. The default
    device `meta` stands for it here: every draw with a generator must land on the generator's device (the CPU),
    and the parameters stay where the allocation put them."""
    draws = []

    def on_generator_device(fn):
        def checked(*args, generator=None, **kwargs):
            out = fn(*args, generator=generator, **kwargs)
            if generator is not None:
                assert out.device == generator.device, f"a {generator.device} generator drew into {out.device}"
                draws.append(out.device)
            return out
        return checked

    for owner, name in ((torch, "normal"), (torch, "randn"), (torch, "rand"), (torch.Tensor, "normal_"),
                        (torch.Tensor, "uniform_")):
        monkeypatch.setattr(owner, name, on_generator_device(getattr(owner, name)))
    with torch.device("meta"):
        embedding = VocabParallelEmbedding(11, 8)
        layers = [embedding, ColumnParallelLinear(8, 12), RowParallelLinear(12, 8), VocabParallelLMHead(8, 11),
                  VocabParallelLMHead(8, 11, tied=embedding)]
    assert len(draws) == 4
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())

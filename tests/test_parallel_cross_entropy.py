"""vocab_parallel_goldfish_cross_entropy on real gloo ranks against the single-process loss and torch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import DEVICES
from distributed import run_distributed
from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy
from goldfish_ds.parallel import (initialize_model_parallel, destroy_model_parallel, tensor_parallel_group,
                                  tensor_parallel_rank, vocab_parallel_goldfish_cross_entropy)

CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def batch(V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 24, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (2, 24), generator=g)
    labels[0, -5:] = -100
    labels[:, 0] = 1
    return logits, labels


def check_against_single_process(rank, world, V, dtype, reduction, in_place):
    """Every rank: loss equal to TP=1 and to torch in float64; its gradient slice equal to theirs."""
    shard = -(-V // world)
    logits, labels = batch(V, dtype)
    padded = torch.full((2, 24, shard * world), float("-inf"), dtype=dtype)  # vocabulary padded with -inf
    padded[..., :V] = logits
    local = padded[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()

    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    try:
        loss, stats = vocab_parallel_goldfish_cross_entropy(local, labels, CFG, dist.group.WORLD,
                                                            reduction=reduction, in_place=in_place,
                                                            return_stats=True)
    finally:
        dist.all_reduce = all_reduce
    assert len(calls) == 2  # MAX of [N], SUM of [2, N]: O(N) floats, never the logits
    loss.sum().backward()

    full = logits.clone().requires_grad_()
    ref_loss, ref_stats = goldfish_cross_entropy(full, labels, CFG, reduction, in_place=False, return_stats=True)
    ref_loss.sum().backward()
    x64 = logits.double().requires_grad_()
    torch64 = F.cross_entropy(x64.reshape(-1, V), apply_goldfish(labels, CFG).reshape(-1), reduction=reduction)
    torch64.sum().backward()

    assert rel(loss, ref_loss) <= 1e-6 and rel(loss, torch64.reshape(loss.shape)) <= 1e-6
    for name in ("loss_all_tokens", "loss_dropped_tokens", "drop_rate"):
        assert rel(getattr(stats, name), getattr(ref_stats, name)) <= 1e-6, name
    my_columns = slice(rank * shard, min((rank + 1) * shard, V))
    width = my_columns.stop - my_columns.start
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert rel(local.grad[..., :width], full.grad[..., my_columns]) <= tol
    assert rel(local.grad[..., :width], x64.grad[..., my_columns]) <= tol
    assert torch.equal(local.grad[..., width:], torch.zeros_like(local.grad[..., width:]))  # padding: no gradient


def body_matches_single_process(rank, world):
    for V, dtype, reduction, in_place in [(1000, torch.float32, "mean", True), (1001, torch.float32, "sum", False),
                                          (999, torch.float32, "none", True), (1000, torch.bfloat16, "mean", True)]:
        check_against_single_process(rank, world, V, dtype, reduction, in_place)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world):
    run_distributed(body_matches_single_process, world)


def body_tp_groups(rank, world):
    """TP=2 inside a world of 4: two independent TP groups, each reducing only over its own ranks."""
    initialize_model_parallel(2)
    try:
        logits, labels = batch(800, torch.float32, seed=rank // 2)  # the two TP groups see different batches
        tp_rank = tensor_parallel_rank()
        local = logits[..., tp_rank * 400:(tp_rank + 1) * 400].clone().requires_grad_()
        loss = vocab_parallel_goldfish_cross_entropy(local, labels, CFG)
        assert tensor_parallel_group() is not None
        assert rel(loss, goldfish_cross_entropy(logits, labels, CFG, in_place=False)) <= 1e-6
    finally:
        destroy_model_parallel()


def test_vocab_parallel_uses_the_tensor_parallel_group():
    run_distributed(body_tp_groups, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_single_process_without_groups_equals_the_fused_loss(device):
    logits, labels = batch(500, torch.float32)
    logits, labels = logits.to(device), labels.to(device)
    a = logits.clone().requires_grad_()
    loss = vocab_parallel_goldfish_cross_entropy(a, labels, CFG)
    loss.backward()
    b = logits.clone().requires_grad_()
    ref = goldfish_cross_entropy(b, labels, CFG)
    ref.backward()
    assert rel(loss, ref) <= 1e-6 and rel(a.grad, b.grad) <= 1e-6


def body_rank_dies(rank, world):
    if rank == 1:
        os._exit(0)  # dies without a word (exit code 0, so only rank 0's own behaviour decides the test)
    logits, labels = batch(200, torch.float32)
    with pytest.raises(RuntimeError):  # the collective fails (peer gone, or the process group's timeout)
        vocab_parallel_goldfish_cross_entropy(logits[..., :100].contiguous(), labels, CFG, dist.group.WORLD)
    os._exit(0)  # the default group cannot be torn down cleanly without its peer


def test_a_dead_rank_makes_the_others_fail_not_hang():
    run_distributed(body_rank_dies, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4001])
def test_vocab_parallel_kernels_against_torch(device, dtype, V):
    """The two compiled passes on one shard, with targets in other shards (-1) and skipped rows."""
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(64, V, generator=g) * 3).to(dtype)
    local = torch.randint(-1, V, (64,), generator=g)
    skip = torch.rand(64, generator=g) < 0.25
    lse_global = torch.logsumexp(x.double(), -1) + torch.rand(64, generator=g, dtype=torch.float64)  # other shards
    scale = torch.tensor([0.25])
    ops = torch.ops.goldfish_ds
    lse, target = ops.vocab_parallel_stats(x.to(device), local.to(device), skip.to(device))
    rows = ~skip
    ref_target = torch.where(local >= 0, x.double().gather(1, local.clamp(min=0)[:, None])[:, 0], 0.0)
    assert torch.equal(lse.cpu()[skip], torch.zeros(int(skip.sum()))) and torch.equal(target.cpu()[skip], lse.cpu()[skip])
    assert rel(lse.cpu()[rows], torch.logsumexp(x.double(), -1)[rows]) <= 1e-6
    assert rel(target.cpu()[rows], ref_target[rows]) <= 1e-7 or not (local[rows] >= 0).any()
    grad = ops.vocab_parallel_grad(x.to(device), local.to(device), skip.to(device), lse_global.float().to(device),
                                   scale.to(device)).cpu()
    ref = torch.exp(x.double() - lse_global[:, None])
    ref[local >= 0, local[local >= 0]] -= 1.0
    ref = ref * 0.25
    ref[skip] = 0.0
    tol = {"rtol": 1e-5, "atol": 1e-8} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.double(), ref, **tol)
    in_place = x.clone().to(device)
    ops.vocab_parallel_grad_(in_place, local.to(device), skip.to(device), lse_global.float().to(device), scale.to(device))
    assert torch.equal(in_place.cpu(), grad)

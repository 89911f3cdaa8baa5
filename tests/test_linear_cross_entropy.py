"""goldfish_linear_cross_entropy and its vocab-parallel form against torch in float64 (logits = hidden @ W^T,
then F.cross_entropy on the labels masked by the plain-torch reference mask), and TP=2 against TP=1.

Tolerances come from the dtype, on norm-relative errors: 2 eps(dtype) + KERNEL_EXP_ERROR. The op rounds to
the input dtype four times on the way to a gradient (the logits chunk, the gradient chunk, the GEMM output, the
accumulated weight gradient), each within eps/2 relative, accumulates every GEMM in float32, and the compiled
kernels' exponential is within 2e-7 relative (csrc/cross_entropy_cpu.cpp); the reference is float64 on the
same (dtype-rounded) inputs. (Logits of ~1e4 in bfloat16 carry an absolute rounding of ~40, which moves the
softmax itself; the extreme-logits test is float32, as for the unfused loss.)

The compiled kernels compute in float32 whatever the inputs (float32 row losses and log-sum-exps are part of
their contract), so gradcheck runs in float32, with a step and tolerances sized for float32 finite differences
(test_gradcheck_float32); the gradients' exactness is checked against float64 torch autograd, and linearity in
the upstream gradient by the "none" reduction with random row weights.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import DEVICES
from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy, goldfish_linear_cross_entropy, goldfish_mask
from goldfish_ds.linear_cross_entropy import plan_chunk_rows
from goldfish_ds.parallel import (copy_to_tensor_parallel_region, vocab_parallel_goldfish_cross_entropy,
                                  vocab_parallel_goldfish_linear_cross_entropy)
from goldfish_ds.reference import reference_goldfish_mask

CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))
KERNEL_EXP_ERROR = 2e-7
EXEMPT = 1


def tol(dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).eps + KERNEL_EXP_ERROR


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def case(shape=(3, 40), H=24, V=97, dtype=torch.float32, scale=1.0, seed=0, device="cpu"):
    """hidden [*shape, H], weight [V, H], labels [*shape] with ignored positions and many exempt ids."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    flat[5:9] = -100
    flat[::7] = EXEMPT
    return hidden.to(device), weight.to(device), labels.to(device)


def torch_reference(hidden, weight, labels, cfg, reduction, upstream, window_ids=None):
    """(loss, dL/dhidden, dL/dweight) in float64 through torch's F.cross_entropy; upstream weights the
    per-row losses of reduction "none"."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    target = labels.clone()
    if cfg is not None:
        target[reference_goldfish_mask(labels, cfg, window_ids=window_ids)] = cfg.ignore_index
    logits = (h @ w.t()).reshape(-1, w.shape[0])
    loss = F.cross_entropy(logits, target.reshape(-1), reduction=reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    (loss * upstream if reduction == "none" else loss).sum().backward()
    return loss.detach(), h.grad, w.grad


def run_op(hidden, weight, labels, cfg, reduction, upstream, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = goldfish_linear_cross_entropy(h, w, labels, cfg, reduction, **kwargs)
    (loss * upstream if reduction == "none" else loss).sum().backward()
    return loss.detach(), h.grad, w.grad


def upstream_for(labels, reduction):
    g = torch.Generator().manual_seed(1)
    return torch.rand(labels.shape, generator=g).to(labels.device) + 0.5 if reduction == "none" else None


def assert_matches(ours, ref, dtype):
    for name, a, b in zip(("loss", "dL/dhidden", "dL/dweight"), ours, ref):
        assert a.dtype == (torch.float32 if name == "loss" else dtype), name
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= tol(dtype), (name, rel(a, b), tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 40), (120,)], ids=["BTH", "NH"])
@pytest.mark.parametrize("cfg", [CFG, None], ids=["goldfish", "standard"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_float64(reduction, cfg, shape, device):
    hidden, weight, labels = case(shape, device=device)
    upstream = upstream_for(labels, reduction)
    ours = run_op(hidden, weight, labels, cfg, reduction, upstream)
    assert_matches(ours, torch_reference(hidden, weight, labels, cfg, reduction, upstream), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_matches_torch_float64(reduction, dtype, device):
    hidden, weight, labels = case(dtype=dtype, V=300, device=device)
    upstream = upstream_for(labels, reduction)
    ours = run_op(hidden, weight, labels, CFG, reduction, upstream)
    assert_matches(ours, torch_reference(hidden, weight, labels, CFG, reduction, upstream), dtype)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # gradcheck's advice to use float64, see above
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float32(reduction):
    """torch.autograd.gradcheck (central differences, step 1e-2; also undefined upstream gradients) of both inputs,
    in chunks of 2 rows, with dropped, ignored and exempt targets: the finite differences of our own forward
    against our backward. The step's truncation error is ~1e-4 and float32 rounding adds ~1e-4 to a difference
    quotient, so atol 2e-3 and rtol 1e-2 sit well above both and far below any real error (a row's gradient is
    O(0.1)-O(1))."""
    hidden, weight, labels = case(shape=(12,), H=5, V=7, seed=3)
    dropped = goldfish_mask(labels, CFG).sum().item()
    assert dropped > 0 and labels.eq(-100).any() and labels.eq(EXEMPT).any()
    hidden.requires_grad_(), weight.requires_grad_()
    chunk_bytes = 2 * (7 + 2 * 5) * 4  # 2 rows per chunk

    def loss(h, w):
        return goldfish_linear_cross_entropy(h, w, labels, CFG, reduction, chunk_bytes=chunk_bytes)

    assert torch.autograd.gradcheck(loss, (hidden, weight), eps=1e-2, atol=2e-3, rtol=1e-2)


LOSSES = {
    "goldfish_cross_entropy": lambda h, w, labels, red: goldfish_cross_entropy(h @ w.t(), labels, CFG, red),
    "vocab_parallel_goldfish_cross_entropy": lambda h, w, labels, red: vocab_parallel_goldfish_cross_entropy(
        h @ w.t(), labels, CFG, reduction=red),
    "goldfish_linear_cross_entropy": lambda h, w, labels, red: goldfish_linear_cross_entropy(
        h, w, labels, CFG, red, chunk_bytes=4 * (97 + 48) * 4),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_backward_twice_through_a_retained_graph(loss_name, reduction):
    """The fused losses scale their stored gradient in place; a second backward (retain_graph=True) with another
    upstream gradient still gets the torch float64 gradient times that upstream gradient, and one after a zero
    upstream gradient is refused rather than returning zeros."""
    hidden, weight, labels = case()
    hidden.requires_grad_(), weight.requires_grad_()
    upstream = torch.linspace(0.5, 1.5, labels.numel()).reshape(labels.shape) if reduction == "none" \
        else torch.tensor(0.7)
    _, ref_hidden, ref_weight = torch_reference(hidden, weight, labels, CFG, reduction, upstream)
    if reduction != "none":  # torch_reference weights only the rows of "none"
        ref_hidden, ref_weight = ref_hidden * 0.7, ref_weight * 0.7
    loss = LOSSES[loss_name](hidden, weight, labels, reduction)
    first = torch.autograd.grad(loss, (hidden, weight), torch.ones_like(loss), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight), upstream.expand_as(loss), retain_graph=True)
    for got, want in zip(second, (ref_hidden, ref_weight)):
        assert rel(got, want) <= tol(torch.float32)
    if reduction != "none":  # the first backward's gradient (upstream 1) was not changed by the second
        assert rel(first[0] * 0.7, ref_hidden) <= tol(torch.float32)
    loss = LOSSES[loss_name](hidden, weight, labels, reduction)
    torch.autograd.grad(loss, (hidden, weight), torch.zeros_like(loss), retain_graph=True)
    if loss_name == "goldfish_linear_cross_entropy" and reduction == "none":  # recomputed, nothing stored
        again = torch.autograd.grad(loss, (hidden, weight), upstream.expand_as(loss))
        assert rel(again[1], ref_weight) <= tol(torch.float32)
    else:
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(loss, (hidden, weight), upstream.expand_as(loss))


def test_window_ids_and_exempt_ids_decide_the_mask():
    """SFT: -100 prompt labels, the mask hashed over window_ids; exempt targets always in the loss."""
    hidden, weight, labels = case()
    window_ids = labels.clamp(min=0)
    labels[:, :12] = -100  # the prompts
    ours = run_op(hidden, weight, labels, CFG, "sum", None, window_ids=window_ids)
    assert_matches(ours, torch_reference(hidden, weight, labels, CFG, "sum", None, window_ids), torch.float32)
    without = run_op(hidden, weight, labels, CFG, "sum", None)  # hashed over labels: another mask
    assert rel(without[0], ours[0]) > 1e-3
    exempt = labels.eq(EXEMPT)
    assert exempt.sum() >= 10 and (ours[1][exempt].abs().sum(-1) > 0).all()


def test_dropped_and_ignored_rows_get_exactly_zero_hidden_gradient():
    hidden, weight, labels = case()
    _, grad_hidden, _ = run_op(hidden, weight, labels, CFG, "mean", None)
    left_out = reference_goldfish_mask(labels, CFG) | labels.eq(-100)
    assert left_out.sum() >= 20
    assert torch.equal(grad_hidden[left_out], torch.zeros_like(grad_hidden[left_out]))
    assert (grad_hidden[~left_out].abs().sum(-1) > 0).all()


def test_extreme_logits_stay_finite_and_exact():
    """Hidden norms of ~1e4 give logits of ~1e4 (a one-hot softmax): no overflow, no NaN."""
    hidden, weight, labels = case(scale=3e3)
    ours = run_op(hidden, weight, labels, CFG, "mean", None)
    ref = torch_reference(hidden, weight, labels, CFG, "mean", None)
    assert ref[0] > 1e3
    assert_matches(ours, ref, torch.float32)


def test_many_small_chunks_equal_one_chunk():
    hidden, weight, labels = case()
    one_row = run_op(hidden, weight, labels, CFG, "mean", None, chunk_bytes=1)
    seven_rows = run_op(hidden, weight, labels, CFG, "mean", None, chunk_bytes=7 * (97 + 2 * 24) * 4)
    one_chunk = run_op(hidden, weight, labels, CFG, "mean", None, chunk_bytes=1 << 40)
    for ours in (one_row, seven_rows):
        assert torch.equal(ours[0], one_chunk[0])  # the kernel's rows do not depend on the chunking
        assert rel(ours[1], one_chunk[1]) <= tol(torch.float32)  # GEMM blocking and
        assert rel(ours[2], one_chunk[2]) <= tol(torch.float32)  # accumulation order differ


def test_the_chunk_budget_rule():
    # the default: 5% of the N x V logits less 64 bytes a row (the O(N) buffers), divided by one row's logits +
    # hidden row + its gradient
    budget = int(0.05 * 8192 * 128256 * 2) - 8192 * 64
    assert plan_chunk_rows(8192, 128256, 2048, 2, None) == budget // ((128256 + 4096) * 2)
    assert plan_chunk_rows(8192, 128256, 2048, 2, None) * (128256 + 4096) * 2 + 8192 * 64 <= 0.05 * 8192 * 128256 * 2
    assert plan_chunk_rows(256, 128256, 2048, 2, None) == 128  # the default never has fewer than 128 rows
    assert plan_chunk_rows(10, 1000, 64, 4, None) == 10  # nor more than there are
    assert plan_chunk_rows(10, 1000, 64, 4, 1) == 1  # an explicit budget: never below one row
    assert plan_chunk_rows(10, 1000, 64, 4, 3 * 1128 * 4) == 3


class TensorsMade(TorchDispatchMode):
    """Records (shape, bytes) of every tensor an ATen op returns (allocations and in-place results alike)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(tuple(t.shape), t.nbytes) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_no_temporary_exceeds_the_chunk_budget():
    """Besides the two gradient buffers ([N, H], [V, H]), no tensor is larger than 5% of the N x V logits, and
    the chunks are the planned size; the unfused path, watched the same way, makes the whole logits."""
    N, H, V = 3000, 16, 4000  # enough rows that the 5% rule, not the 128-row floor, sizes the chunks
    hidden, weight, labels = case((N,), H=H, V=V)
    logits_bytes = N * V * 4
    rows = plan_chunk_rows(N, V, H, 4, None)
    assert rows == (int(0.05 * logits_bytes) - N * 64) // ((V + 2 * H) * 4) == 136  # 64 bytes a row: O(N) buffers
    goldfish_mask(labels, CFG)  # builds and caches the hash-table strategy's table (8 MB) once per process
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with TensorsMade() as fused:
        goldfish_linear_cross_entropy(h, w, labels, CFG).backward()
    temporaries = [(shape, size) for shape, size in fused.made if shape not in ((N, H), (V, H))]
    assert max(size for _, size in temporaries) <= 0.05 * logits_bytes
    assert (rows, V) in [shape for shape, _ in temporaries]
    with TensorsMade() as unfused:
        goldfish_cross_entropy(F.linear(hidden.clone().requires_grad_(), weight), labels, CFG).backward()
    assert max(size for _, size in unfused.made) >= logits_bytes


def test_stats_equal_the_fused_loss_on_the_same_logits():
    hidden, weight, labels = case()
    loss, stats = goldfish_linear_cross_entropy(hidden, weight, labels, CFG, return_stats=True, chunk_bytes=2000)
    ref_loss, ref_stats = goldfish_cross_entropy(hidden @ weight.t(), labels, CFG, return_stats=True)
    assert rel(loss, ref_loss) <= tol(torch.float32)
    assert stats.dropped_tokens > 0
    for name in ("kept_tokens", "dropped_tokens"):
        assert torch.equal(getattr(stats, name), getattr(ref_stats, name)), name
    for name in ("drop_rate", "loss_kept", "loss_all_tokens", "loss_dropped_tokens"):
        assert rel(getattr(stats, name), getattr(ref_stats, name)) <= tol(torch.float32), name


def test_without_gradients_only_the_loss():
    hidden, weight, labels = case()
    with torch.no_grad():
        loss = goldfish_linear_cross_entropy(hidden, weight, labels, CFG)
    assert rel(loss, torch_reference(hidden, weight, labels, CFG, "mean", None)[0]) <= tol(torch.float32)
    w = weight.clone().requires_grad_()  # a frozen body: only the head trains
    goldfish_linear_cross_entropy(hidden, w, labels, CFG).backward()
    assert rel(w.grad, torch_reference(hidden, weight, labels, CFG, "mean", None)[2]) <= tol(torch.float32)


def test_non_contiguous_hidden_and_weight():
    hidden, weight, labels = case()
    h = hidden.transpose(0, 1).contiguous().requires_grad_()  # [T, B, H], viewed as [B, T, H] below
    w = weight.t().contiguous().requires_grad_()  # [H, V], viewed as [V, H] below
    goldfish_linear_cross_entropy(h.transpose(0, 1), w.t(), labels, CFG, "sum").backward()
    ref = torch_reference(hidden, weight, labels, CFG, "sum", None)
    assert rel(h.grad.transpose(0, 1), ref[1]) <= tol(torch.float32)
    assert rel(w.grad.t(), ref[2]) <= tol(torch.float32)


def test_no_kept_row_is_a_zero_loss_and_zero_gradients():
    hidden, weight, labels = case()
    labels.fill_(-100)
    loss, grad_hidden, grad_weight = run_op(hidden, weight, labels, CFG, "mean", None)
    assert loss == 0 and not grad_hidden.any() and not grad_weight.any()


# ---- tensor parallelism: 2 gloo ranks against TP=1 ------------------------------------------------------------

def check_tp_matches_tp1(rank, world, V, dtype, reduction, return_stats):
    """Each rank holds ceil(V/2) weight rows (rank 1 a padding row holding huge values: never in the softmax)."""
    shard = -(-V // world)
    hidden, weight, labels = case(V=V, dtype=dtype)
    padded = torch.cat([weight, torch.full((shard * world - V, weight.shape[1]), 1e4, dtype=dtype)])
    local = padded[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    upstream = upstream_for(labels, reduction)

    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(a[0].shape) or all_reduce(*a, **k)
    try:
        out = vocab_parallel_goldfish_linear_cross_entropy(
            copy_to_tensor_parallel_region(h, dist.group.WORLD), local, labels, CFG, dist.group.WORLD, reduction,
            return_stats=return_stats, vocab_size=V, chunk_bytes=3000)
        n = labels.numel()
        assert calls == [(n,), (2, n)]  # the MAX of [N] and the SUM of [2, N] floats, stats included
        loss, stats = out if return_stats else (out, None)
        (loss * upstream if reduction == "none" else loss).sum().backward()
        assert calls[2:] == [h.shape]  # backward: only copy_to_tensor_parallel_region's all-reduce of dL/dhidden
    finally:
        dist.all_reduce = all_reduce

    ref = run_op(hidden, weight, labels, CFG, reduction, upstream)
    real = min(shard, V - rank * shard)
    assert rel(loss, ref[0]) <= tol(dtype)
    assert rel(h.grad, ref[1]) <= tol(dtype)
    assert rel(local.grad[:real], ref[2][rank * shard:rank * shard + real]) <= tol(dtype)
    assert torch.equal(local.grad[real:], torch.zeros_like(local.grad[real:]))  # padding: no gradient
    if return_stats:
        _, ref_stats = goldfish_linear_cross_entropy(hidden, weight, labels, CFG, return_stats=True)
        for name in ("kept_tokens", "dropped_tokens", "loss_kept", "loss_all_tokens", "loss_dropped_tokens"):
            assert rel(getattr(stats, name), getattr(ref_stats, name)) <= tol(dtype), name


def body_tp_matches_tp1(rank, world):
    for V, dtype, reduction, return_stats in [(97, torch.float32, "mean", True), (97, torch.float32, "none", False),
                                              (96, torch.float32, "sum", True),
                                              (301, torch.bfloat16, "mean", False)]:
        check_tp_matches_tp1(rank, world, V, dtype, reduction, return_stats)


def test_tp2_matches_tp1_with_vocabulary_padding():
    run_distributed(body_tp_matches_tp1, 2)


def test_tp1_with_padding_rows_equals_the_single_device_op():
    hidden, weight, labels = case(V=97)
    padded = torch.cat([weight, torch.full((3, weight.shape[1]), 1e4)])
    w = padded.clone().requires_grad_()
    loss = vocab_parallel_goldfish_linear_cross_entropy(hidden, w, labels, CFG, vocab_size=97)
    loss.backward()
    ref = run_op(hidden, weight, labels, CFG, "mean", None)
    assert rel(loss, ref[0]) <= tol(torch.float32) and rel(w.grad[:97], ref[2]) <= tol(torch.float32)
    assert not w.grad[97:].any()

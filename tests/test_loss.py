"""goldfish_cross_entropy against torch.nn.functional.cross_entropy with the same labels set to ignore_index."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy, goldfish_mask

CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))


def make_batch(B, T, V, dtype, device, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if pad:
        labels[0, -T // 4:] = -100  # right padding
        labels[:, 0] = min(1, V - 1)  # an exempt id (BOS-like)
    return logits.to(device), labels.to(device)


def reference(logits, labels, cfg, reduction="mean"):
    """torch's cross-entropy in float64 on the goldfish-masked labels: loss and d loss / d logits.

    float64, because torch's own float32 cross-entropy is less accurate than the fused kernel (its gradient
    is off by ~1e-6 relative at V = 32k and ~4e-6 at V = 128k, ours by < 1e-7)."""
    x = logits.detach().double().requires_grad_()
    target = apply_goldfish(labels, cfg) if cfg is not None else labels
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1), reduction=reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    loss.sum().backward()
    return loss.detach(), x.grad


def ours(logits, labels, cfg, reduction="mean", in_place=False):
    x = logits.detach().clone().requires_grad_()
    loss = goldfish_cross_entropy(x, labels, cfg, reduction, in_place=in_place)
    loss.sum().backward()
    return loss.detach(), x.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 64, 1000), (3, 17, 32001), (1, 5, 7), (2, 4, 1), (1, 8, 128256)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_matches_torch(shape, reduction, device):
    B, T, V = shape
    logits, labels = make_batch(B, T, V, torch.float32, device)
    ref_loss, ref_grad = reference(logits, labels, CFG, reduction)
    loss, grad = ours(logits, labels, CFG, reduction)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel(loss, ref_loss) <= 1e-6
    assert rel(grad, ref_grad) <= 1e-6
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 64, 1000), (2, 33, 32000), (1, 6, 128256)])
def test_reduced_precision_matches_float32_reference(dtype, shape, device):
    """bf16/fp16 logits are accumulated in float32: the loss is exact for the rounded logits, the
    gradient is rounded once to the logits' dtype."""
    logits, labels = make_batch(*shape, dtype, device)
    ref_loss, ref_grad = reference(logits, labels, CFG)
    loss, grad = ours(logits, labels, CFG)
    assert grad.dtype == dtype
    assert rel(loss, ref_loss) <= 1e-6
    torch.testing.assert_close(grad.double(), ref_grad, **({"rtol": 1.6e-2, "atol": 1e-5} if dtype == torch.bfloat16
                                                          else {"rtol": 1e-3, "atol": 1e-5}))


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_gradient_reuses_the_logits_buffer(device):
    """Default training mode: the gradient is written into the logits (no new N x V buffer)."""
    logits, labels = make_batch(2, 32, 5000, torch.float32, device)
    ref_loss, ref_grad = reference(logits, labels, CFG)
    weight = torch.ones((), device=device, requires_grad=True)
    fresh = logits * weight  # a non-leaf, like the LM head's output
    seen = []
    fresh.register_hook(lambda g: seen.append(g))
    loss = goldfish_cross_entropy(fresh, labels, CFG)
    loss.backward()
    assert seen[0].data_ptr() == fresh.data_ptr()
    assert rel(loss, ref_loss) <= 1e-6 and rel(seen[0], ref_grad) <= 1e-6
    # and the gradient keeps flowing: d loss / d weight = sum(grad * logits)
    assert rel(weight.grad, (ref_grad * logits).sum()) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_logits_kept_when_not_in_place(device):
    logits, labels = make_batch(2, 8, 300, torch.float32, device)
    x = logits.clone().requires_grad_()
    goldfish_cross_entropy(x, labels, CFG, in_place=False).backward()
    assert torch.equal(x.detach(), logits)


def test_in_place_detects_logits_needed_elsewhere():
    """If another op saved the logits for its backward, autograd refuses instead of using the gradient."""
    logits, labels = make_batch(1, 8, 50, torch.float32, "cpu")
    x = logits.clone().requires_grad_()
    y = x.exp()  # exp saves its output for backward
    loss = goldfish_cross_entropy(y, labels, CFG) + y.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_gradient_scales_the_stored_gradient(device):
    logits, labels = make_batch(2, 16, 400, torch.float32, device)
    _, ref_grad = reference(logits, labels, CFG)
    x = logits.clone().requires_grad_()
    (3.5 * goldfish_cross_entropy(x, labels, CFG, in_place=False)).backward()
    assert rel(x.grad, 3.5 * ref_grad) <= 1e-6
    ref_loss, ref_grad = reference(logits, labels, CFG, "none")
    x = logits.clone().requires_grad_()
    weights = torch.rand(labels.shape, device=device)
    (goldfish_cross_entropy(x, labels, CFG, "none", in_place=False) * weights).sum().backward()
    y = logits.clone().double().requires_grad_()
    (F.cross_entropy(y.reshape(-1, 400), apply_goldfish(labels, CFG).reshape(-1), reduction="none")
     * weights.reshape(-1).double()).sum().backward()
    assert rel(x.grad, y.grad) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_place", [True, False])
def test_all_dropped_or_ignored_gives_zero_not_nan(device, in_place):
    logits, labels = make_batch(2, 16, 100, torch.float32, device, pad=False)
    everything_static = GoldfishConfig(k=2, h=1, strategy="static")  # drops even positions
    for labels_case, cfg in [(torch.full_like(labels, -100), CFG),
                             (labels[:, ::2].repeat_interleave(2, 1) * 0 + labels[:, :1], everything_static)]:
        if cfg is everything_static:
            labels_case = labels.clone()
            labels_case[:, 1::2] = -100  # odd positions ignored, even positions dropped
        x = logits.clone().requires_grad_()
        loss = goldfish_cross_entropy(x, labels_case, cfg, in_place=in_place)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("device", DEVICES)
def test_stats_match_torch(device):
    logits, labels = make_batch(4, 64, 700, torch.float32, device)
    x = logits.clone().requires_grad_()
    loss, stats = goldfish_cross_entropy(x, labels, CFG, return_stats=True, in_place=False)
    dropped = goldfish_mask(labels, CFG)
    valid = labels != -100
    flat = logits.reshape(-1, 700).double()
    assert stats.kept_tokens.item() == (valid & ~dropped).sum().item()
    assert stats.dropped_tokens.item() == dropped.sum().item() > 0
    assert stats.drop_rate.item() == pytest.approx(dropped.sum().item() / valid.sum().item(), rel=1e-6)
    all_tokens = F.cross_entropy(flat, labels.reshape(-1))
    dropped_only = F.cross_entropy(flat, labels.masked_fill(~dropped, -100).reshape(-1))
    assert rel(stats.loss_kept, loss.detach()) == 0
    assert rel(stats.loss_all_tokens, all_tokens) <= 1e-6
    assert rel(stats.loss_dropped_tokens, dropped_only) <= 1e-6
    # the gradient ignores the dropped rows' loss even though it was computed
    _, ref_grad = reference(logits, labels, CFG)
    loss.backward()
    assert rel(x.grad, ref_grad) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_standard_loss_without_config(device):
    logits, labels = make_batch(2, 16, 300, torch.float32, device)
    ref_loss, ref_grad = reference(logits, labels, None)
    loss, grad = ours(logits, labels, None)
    assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6


def test_no_grad_leaves_logits_untouched():
    logits, labels = make_batch(2, 16, 300, torch.float32, "cpu")
    x = logits.clone()
    with torch.no_grad():
        loss = goldfish_cross_entropy(x, labels, CFG)
    assert torch.equal(x, logits)
    assert rel(loss, reference(logits, labels, CFG)[0]) <= 1e-6


def test_llm_head_end_to_end_gradients():
    """Through a real LM head: weight gradients equal torch's."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 24, 32, generator=g)
    head = torch.nn.Linear(32, 500, bias=False)
    labels = torch.randint(0, 500, (2, 24), generator=g)
    goldfish_cross_entropy(head(hidden), labels, CFG).backward()
    ours_grad = head.weight.grad.clone()
    head.weight.grad = None
    F.cross_entropy(head(hidden).reshape(-1, 500), apply_goldfish(labels, CFG).reshape(-1)).backward()
    assert rel(ours_grad, head.weight.grad) <= 1e-6


def test_torch_compile():
    logits, labels = make_batch(2, 16, 300, torch.float32, "cpu")
    ref_loss, ref_grad = reference(logits, labels, CFG)

    @torch.compile(backend="aot_eager")
    def step(x, y):
        return goldfish_cross_entropy(x, y, CFG, in_place=False)

    x = logits.clone().requires_grad_()
    loss = step(x, labels)
    loss.backward()
    assert rel(loss, ref_loss) <= 1e-6 and rel(x.grad, ref_grad) <= 1e-6


def test_opcheck_cross_entropy_ops():
    logits, labels = make_batch(1, 6, 40, torch.float32, "cpu")
    flat, y = logits.reshape(-1, 40), labels.reshape(-1)
    dropped = torch.zeros(6, dtype=torch.bool)
    dropped[2] = True
    scale = torch.tensor([0.5])
    ops = torch.ops.goldfish_ds
    torch.library.opcheck(ops.cross_entropy_loss.default, (flat, y, dropped, -100, True))
    torch.library.opcheck(ops.cross_entropy_loss_grad.default, (flat, y, dropped, -100, False, scale))
    torch.library.opcheck(ops.cross_entropy_loss_grad_.default, (flat.clone(), y, dropped, -100, False, scale))
    torch.library.opcheck(ops.scale_rows_.default, (flat.clone(), scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype, device):
    """Large spreads (a max far into the row), -inf entries (masked or padded vocabulary) and huge values."""
    V = 9000  # several CPU blocks
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, V, generator=g)
    logits[0, 8500] = 300.0  # max found late: earlier blocks were exponentiated against a far smaller value
    logits[1, :4096] = float("-inf")  # the first blocks entirely -inf
    logits[2, ::3] = float("-inf")
    logits[3] *= 1000.0
    logits[4, 0] = -1e30
    labels = torch.tensor([8500, 5000, 1, 7, 3, 100])
    logits, labels = logits.to(dtype).to(device), labels.to(device)
    ref_loss, ref_grad = reference(logits[None], labels[None], None)
    loss, grad = ours(logits[None], labels[None], None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel(loss, ref_loss) <= 1e-6
    tol = {"rtol": 1e-5, "atol": 1e-9} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.double(), ref_grad, **tol)

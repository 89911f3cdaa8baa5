"""Goldfish SFT: masks hashed over window_ids (the unmasked targets), SFT data formats and their supervision."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy, goldfish_mask
from goldfish_ds.parallel import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.reference import reference_goldfish_mask

HASHED = ["hash-table", "hash-avalanche", "hash-rolling"]


def sft_row(prompt: torch.Tensor, response: torch.Tensor, supervise_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, window_ids) of one row: the prompt's targets -100 unless supervised, the response's its ids."""
    ids = torch.cat([prompt, response])
    labels = ids.clone()
    if not supervise_prompt:
        labels[:len(prompt)] = -100
    return labels, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED)
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
def test_response_mask_ignores_the_prompt_beyond_the_window(strategy, window, device):
    gen = torch.Generator().manual_seed(3)
    h = 5
    cfg = GoldfishConfig(k=3, h=h, strategy=strategy, window=window)
    response = torch.randint(4, 500, (200,), generator=gen)
    masks = []
    for seed in (1, 2):
        prompt = torch.randint(4, 500, (37,), generator=torch.Generator().manual_seed(seed))
        labels, ids = sft_row(prompt, response, supervise_prompt=False)
        masks.append(goldfish_mask(labels.to(device), cfg, window_ids=ids.to(device)).cpu()[37:])
    reach = h if window == "preceding" else h - 1  # response targets whose window still holds prompt tokens
    assert torch.equal(masks[0][reach:], masks[1][reach:])
    assert masks[0][reach:].any() and not masks[0][reach:].all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED + ["static"])
def test_supervising_the_prompt_or_not_leaves_the_response_mask(strategy, device):
    gen = torch.Generator().manual_seed(5)
    cfg = GoldfishConfig(k=4, h=13, strategy=strategy, exempt_ids=(2,))
    prompt, response = torch.randint(3, 4000, (50,), generator=gen), torch.randint(3, 4000, (300,), generator=gen)
    response[::17] = 2
    hidden, ids = sft_row(prompt, response, supervise_prompt=False)
    shown, _ = sft_row(prompt, response, supervise_prompt=True)
    with_ids = goldfish_mask(hidden.to(device), cfg, window_ids=ids.to(device)).cpu()
    assert torch.equal(with_ids[50:], goldfish_mask(shown.to(device), cfg).cpu()[50:])
    assert not with_ids[:50].any()  # -100 targets are never dropped, whatever their window
    assert not with_ids[50:][response == 2].any()  # exempt ids looked up on the labels
    if strategy != "static":  # without window_ids the -100 prompt is hashed and the mask changes
        assert not torch.equal(goldfish_mask(hidden, cfg)[50:], goldfish_mask(shown, cfg)[50:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED + ["static", "random"])
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
def test_window_ids_masks_equal_the_reference(strategy, window, device):
    gen = torch.Generator().manual_seed(11)
    cfg = GoldfishConfig(k=3, h=7, strategy=strategy, window=window, exempt_ids=(0, 2), start_position=1, seed=9)
    for B, T, vocab in [(1, 1, 5), (3, 100, 7), (4, 777, 32000)]:
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        ids[-1, ::11] = -100  # a window id equal to ignore_index is never dropped, as in labels
        labels = torch.where(torch.rand(B, T, generator=gen) < 0.3, -100, ids)
        labels[0, ::5] = torch.randint(0, vocab, (len(range(0, T, 5)),), generator=gen)  # labels other than ids
        expected = reference_goldfish_mask(labels, cfg, step=4, window_ids=ids)
        got = goldfish_mask(labels.to(device), cfg, step=4, window_ids=ids.to(device)).cpu()
        assert torch.equal(got, expected), (B, T)
        applied = apply_goldfish(labels.to(device), cfg, step=4, window_ids=ids.to(device)).cpu()
        assert torch.equal(applied, torch.where(expected, -100, labels))
        flat = goldfish_mask(labels[0].to(device), cfg, step=4, window_ids=ids[0].to(device)).cpu()
        assert torch.equal(flat, expected[0])


def torch_ce_over(logits: torch.Tensor, labels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    kept = torch.where(dropped, -100, labels)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), kept.reshape(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_losses_with_window_ids_equal_torch_over_that_mask(device):
    gen = torch.Generator().manual_seed(2)
    B, T, V = 3, 64, 101
    cfg = GoldfishConfig(k=3, h=4)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :20] = -100  # the prompts
    dropped = reference_goldfish_mask(labels, cfg, window_ids=ids)
    assert not torch.equal(dropped, reference_goldfish_mask(labels, cfg))  # window_ids changes this mask
    logits = torch.randn(B, T, V, generator=gen)
    expected = torch_ce_over(logits, labels, dropped)
    x = logits.clone().to(device).requires_grad_()
    loss, stats = goldfish_cross_entropy(x, labels.to(device), cfg, window_ids=ids.to(device), in_place=False,
                                         return_stats=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats.dropped_tokens.item() == dropped.sum().item()
    loss.backward()
    ref = logits.double().requires_grad_()
    torch_ce_over(ref, labels, dropped).backward()
    torch.testing.assert_close(x.grad.cpu().double(), ref.grad, rtol=1e-5, atol=1e-7)
    parallel = vocab_parallel_goldfish_cross_entropy(logits.to(device), labels.to(device), cfg,
                                                     window_ids=ids.to(device))
    assert parallel.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_window_ids_are_refused():
    cfg = GoldfishConfig(k=3, h=4)
    labels = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="window_ids must have labels' shape"):
        goldfish_mask(labels, cfg, window_ids=torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="window_ids must be an int64 tensor"):
        goldfish_mask(labels, cfg, window_ids=torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="window_ids must be an int64 tensor"):
        apply_goldfish(labels, cfg, window_ids=[[0] * 8] * 2)

"""goldfish_ds.mask against the official implementation's outputs and the pure-torch reference."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import DEVICES
from goldfish_ds import GoldfishConfig, STRATEGIES, apply_goldfish, goldfish_mask
from goldfish_ds.reference import reference_goldfish_mask
from goldfish_ds.table import TABLE_SIZE, generate_table, hash_table, save_table

VECTORS = json.loads((Path(__file__).parent / "data" / "goldfish_official_vectors.json").read_text())


def official_config(case: dict) -> GoldfishConfig:
    return GoldfishConfig(k=case["k"], h=case["context_width"], strategy=case["strategy"],
                          start_position=case["start_position"], ignore_index=case["ignore_index"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_official_vectors_bit_exact(case, device):
    cfg = official_config(case)
    labels = torch.tensor(case["tokens"], dtype=torch.int64, device=device)
    assert apply_goldfish(labels, cfg).tolist() == case["masked_targets"]
    dropped = goldfish_mask(labels, cfg)
    assert [row.nonzero().flatten().tolist() for row in dropped] == case["dropped_positions"]


def test_official_table_matches_meta():
    meta = VECTORS["meta"]["table"]
    table = generate_table("cpu")
    assert table.numel() == meta["size"] == TABLE_SIZE
    assert table[:8].tolist() == meta["first_values"]
    assert hashlib.sha256(table.numpy().astype("<f4").tobytes()).hexdigest() == meta["sha256_float32_le"]


SHAPES = [(1, 1), (1, 12), (2, 13), (3, 100), (4, 1000), (2, 2048)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("h", [1, 2, 13, 50, 512])
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
@pytest.mark.parametrize("exempt_ids", [(), (0, 2)])  # without exempt ids the CPU fuses the output pass
def test_compiled_mask_equals_reference(strategy, h, window, exempt_ids, device):
    gen = torch.Generator().manual_seed(h * 31 + len(strategy))
    for B, T in SHAPES:
        for vocab in (3, 32000, 128256):  # tiny vocabularies make many zeros and repeated windows
            labels = torch.randint(0, vocab, (B, T), generator=gen)
            labels[0, : T // 10] = -100  # padding inside windows is hashed like any other id
            labels[-1, ::7] = -100  # ignored targets are never dropped, wherever they are
            cfg = GoldfishConfig(k=3, h=h, strategy=strategy, window=window, exempt_ids=exempt_ids, seed=7,
                                 start_position=1)
            expected = reference_goldfish_mask(labels, cfg, step=11)
            got = goldfish_mask(labels.to(device), cfg, step=11).cpu()
            assert torch.equal(got, expected), (B, T, vocab)
            masked = apply_goldfish(labels.to(device), cfg, step=11).cpu()
            assert torch.equal(masked, torch.where(expected, torch.tensor(-100), labels)), (B, T, vocab)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("h", [1, 3, 13, 1500])
def test_extreme_ids_and_chunk_boundaries_equal_reference(strategy, h, device):
    """Any int64 ids (negative, INT64_MIN/MAX products through the table modulo), rows that end inside a
    CPU chunk (256 targets, or h when larger), and apply_goldfish writing exactly the masked positions."""
    gen = torch.Generator().manual_seed(h)
    i64 = torch.iinfo(torch.int64)
    labels = torch.randint(i64.min, i64.max, (3, 3001), generator=gen)
    labels[1] = torch.randint(-3, 3, (3001,), generator=gen)  # many zero, +-1 and small negative products
    labels[2, ::3] = torch.tensor([i64.min, i64.max, -1, -100, 1000003, -1000003], dtype=torch.int64)[
        torch.randint(0, 6, (1001,), generator=gen)]
    cfg = GoldfishConfig(k=3, h=h, strategy=strategy, exempt_ids=(-1,), start_position=5)
    expected = reference_goldfish_mask(labels, cfg, step=3)
    assert torch.equal(goldfish_mask(labels.to(device), cfg, step=3).cpu(), expected)
    masked = apply_goldfish(labels.to(device), cfg, step=3).cpu()
    assert torch.equal(masked, torch.where(expected, torch.tensor(-100), labels))


@pytest.mark.parametrize("shape", [(32, 8192), (33, 8191)])
def test_large_masked_labels_equal_reference(shape):
    """Masked labels of 2 MiB or more are streamed to memory on the CPU: rows that start on a 64-byte
    boundary with streaming stores, the others (odd T) with plain ones."""
    labels = torch.randint(0, 32000, shape, generator=torch.Generator().manual_seed(shape[1]))
    labels[:, -5:] = -100
    cfg = GoldfishConfig(k=4, h=13)
    expected = torch.where(reference_goldfish_mask(labels, cfg), torch.tensor(-100), labels)
    assert torch.equal(apply_goldfish(labels, cfg), expected)


@pytest.mark.parametrize("strategy", ["hash-table", "hash-avalanche", "hash-rolling"])
def test_same_passage_same_mask_at_any_offset(strategy):
    """The goldfish property: a passage gets the same mask wherever it recurs (past its first h-1 tokens)."""
    h = 13
    cfg = GoldfishConfig(k=4, h=h, strategy=strategy)
    passage = torch.randint(0, 32000, (400,), generator=torch.Generator().manual_seed(0))
    rows = torch.randint(0, 32000, (3, 600), generator=torch.Generator().manual_seed(1))
    for row, offset in enumerate([0, 37, 200]):
        rows[row, offset: offset + 400] = passage
    dropped = goldfish_mask(rows, cfg)
    views = [dropped[row, offset + h - 1: offset + 400] for row, offset in enumerate([0, 37, 200])]
    assert views[0].any()
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])


def test_ignore_and_exempt_positions_never_dropped():
    labels = torch.randint(0, 50, (4, 500), generator=torch.Generator().manual_seed(2))
    labels[:, ::5] = -100
    cfg = GoldfishConfig(k=2, h=3, strategy="hash-rolling", exempt_ids=(1, 2, 3))
    dropped = goldfish_mask(labels, cfg)
    assert dropped.any()
    assert not dropped[labels == -100].any()
    assert not dropped[(labels >= 1) & (labels <= 3)].any()
    masked = apply_goldfish(labels, cfg)
    assert torch.equal(masked == -100, dropped | (labels == -100))


def test_one_dimensional_labels_are_one_row():
    labels = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(3))
    cfg = GoldfishConfig(k=4, h=13)
    assert torch.equal(goldfish_mask(labels, cfg), goldfish_mask(labels[None], cfg)[0])


def test_random_strategy_changes_with_step_and_seed_only():
    labels = torch.randint(0, 1000, (8, 4096), generator=torch.Generator().manual_seed(4))
    cfg = GoldfishConfig(k=4, h=13, strategy="random", seed=5)
    a, b = goldfish_mask(labels, cfg, step=1), goldfish_mask(labels, cfg, step=2)
    assert torch.equal(a, goldfish_mask(labels, cfg, step=1))
    assert not torch.equal(a, b)
    assert not torch.equal(a, goldfish_mask(labels, GoldfishConfig(k=4, h=13, strategy="random", seed=6), step=1))
    assert abs(a.float().mean().item() - 0.25) < 0.01


def test_table_file_round_trip_and_use(tmp_path):
    custom = torch.rand(TABLE_SIZE, generator=torch.Generator().manual_seed(9))
    path = tmp_path / "table.bin"
    save_table(custom, str(path))
    pt_path = tmp_path / "table.pt"
    torch.save(custom, pt_path)
    labels = torch.randint(0, 32000, (2, 300), generator=torch.Generator().manual_seed(5))
    for file in (path, pt_path):
        cfg = GoldfishConfig(k=4, h=4, table_path=str(file))
        assert torch.equal(hash_table(str(file)), custom)
        assert torch.equal(goldfish_mask(labels, cfg), reference_goldfish_mask(labels, cfg))
    assert not torch.equal(goldfish_mask(labels, GoldfishConfig(k=4, h=4, table_path=str(path))),
                           goldfish_mask(labels, GoldfishConfig(k=4, h=4)))


# --- drop rate of our hash ---------------------------------------------------------------------------------


def drop_rate(labels: torch.Tensor, cfg: GoldfishConfig) -> float:
    rows = labels[: labels.numel() // 4096 * 4096].reshape(-1, 4096)
    dropped = goldfish_mask(rows, cfg)
    eligible = rows.shape[0] * (rows.shape[1] - cfg.h + 1)  # positions with a full window
    return dropped.sum().item() / eligible


@pytest.mark.parametrize("k", [2, 4, 50, 100])
@pytest.mark.parametrize("h", [13, 50, 256, 1024])
def test_rolling_hash_drop_rate_on_real_text(wiki_token_ids, k, h):
    rate = drop_rate(wiki_token_ids, GoldfishConfig(k=k, h=h, strategy="hash-rolling"))
    assert abs(rate - 1 / k) <= 0.005, rate


def test_product_hash_drifts_where_rolling_hash_does_not(wiki_token_ids):
    """The known weakness of the official hash at large h (Apertus' k=50, h=50): windows wrap to product 0."""
    official = drop_rate(wiki_token_ids, GoldfishConfig(k=50, h=50, strategy="hash-table"))
    ours = drop_rate(wiki_token_ids, GoldfishConfig(k=50, h=50, strategy="hash-rolling"))
    assert abs(ours - 0.02) <= 0.001
    assert abs(official - 0.02) > 0.003


# Id-heavy, not constant: a window of h identical ids recurs with probability p^h, and identical windows
# must share one decision under any content hash, so p^h is kept small.
ADVERSARIAL = {
    "zero-heavy": lambda g: torch.where(torch.rand(200_000, generator=g) < 0.5, 0,
                                        torch.randint(0, 32000, (200_000,), generator=g)),
    "zeros-and-ones": lambda g: torch.randint(0, 2, (200_000,), generator=g),
    "one-heavy": lambda g: torch.where(torch.rand(200_000, generator=g) < 0.5, 1,
                                                torch.randint(0, 128256, (200_000,), generator=g)),
    "powers-of-two": lambda g: 2 ** torch.randint(1, 17, (200_000,), generator=g),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("h", [13, 50, 1024])
@pytest.mark.parametrize("k", [4, 50])
def test_rolling_hash_drop_rate_on_adversarial_ids(name, h, k):
    labels = ADVERSARIAL[name](torch.Generator().manual_seed(h + k))
    assert abs(drop_rate(labels, GoldfishConfig(k=k, h=h, strategy="hash-rolling")) - 1 / k) <= 0.005


def test_rolling_hash_is_order_sensitive():
    """The product hash ignores order; ours tells a window from its permutations."""
    labels = torch.arange(1, 14).repeat(64, 1)
    for row in range(1, 64):
        labels[row] = labels[row][torch.randperm(13, generator=torch.Generator().manual_seed(row))]
    last = lambda strategy: goldfish_mask(labels, GoldfishConfig(k=2, h=13, strategy=strategy))[:, -1]
    assert last("hash-table").all() or not last("hash-table").any()  # one decision for all permutations
    assert 0 < last("hash-rolling").sum() < 64


def test_opcheck_mask():
    labels = torch.randint(0, 100, (2, 50))
    torch.library.opcheck(torch.ops.goldfish_ds.goldfish_mask.default,
                          (labels, 4, 4, 13, 0, -100, False, None, torch.tensor([1, 2]), 0, 0))

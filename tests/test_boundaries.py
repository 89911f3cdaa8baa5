"""Document boundaries in the goldfish mask (GoldfishConfig.boundary_id, --goldfish_boundaries reset): the CPU and
CUDA kernels against the reference, which masks every segment as a row of its own, on packed rows of real text."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, REPO, wiki_texts
from test_training import ds_config, launch, records, train_args

from goldfish_ds import GoldfishConfig, STRATEGIES, apply_goldfish, goldfish_cross_entropy, goldfish_mask
from goldfish_ds.data import (
    PackedTokenDataset,
    ShardedSampler,
    builtin_documents,
    load_tokenizer,
    train_sentencepiece,
    write_packed_shards,
)
from goldfish_ds.integrations.megatron import goldfish_loss_mask
from goldfish_ds.integrations.transformers import causal_lm_targets, goldfish_labels
from goldfish_ds.parallel import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.reference import reference_goldfish_mask
from goldfish_ds.training.arguments import goldfish_boundary_id, parse_args

ROW = 512  # tokens per packed row


def packed_rows(texts: list, tmp_path, name: str, vocab_size: int):
    """(rows [R, ROW] of the documents encoded as the pipeline stores them (BOS + ids + EOS) and concatenated,
    the tokenizer): the layout of packed pretraining rows, where documents meet inside a row."""
    tok = load_tokenizer(train_sentencepiece(texts, str(tmp_path / name), vocab_size))
    ids = torch.tensor([i for text in texts for i in tok.encode_document(text)], dtype=torch.int64)
    rows = ids[: ids.numel() // ROW * ROW].reshape(-1, ROW)
    return rows, tok


@pytest.fixture(scope="module", params=["builtin", "wiki"])
def corpus(request, tmp_path_factory):
    """Packed rows of real text with EOS boundaries where the documents meet, plus 4 rows where boundary labels
    were written at the edges the kernels treat apart: the row's first and last targets, consecutive
    boundaries, the CPU's chunks of 256 targets, boundaries closer than h."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "builtin":  # Python's bundled documentation: short documents, always available
        rows, tok = packed_rows(builtin_documents(), tmp, "builtin", 2048)
    else:  # the wiki canary set (articles 0..31) and the held-out articles 32..63
        rows, tok = packed_rows(wiki_texts()[:64], tmp, "wiki", 4096)
    rows = rows[:24]
    edges = rows[:4].clone()
    eos = tok.eos_id
    edges[0, [0, 1, 2, ROW - 1]] = eos  # consecutive boundaries at the row start, one at the end
    edges[1, [250, 255, 256, 257, 262, ROW - 2]] = eos  # around the CPU's chunk edge, closer than h = 13
    edges[2, 3:200:7] = eos  # a boundary every 7 labels
    edges[3, 100:140] = eos  # a run of boundaries (40 one-label segments)
    rows = torch.cat([rows, edges])
    assert (rows[:24] == eos).sum() >= 3, "the real rows must hold documents meeting inside a row"
    return rows, tok


def boundary_configs(strategy: str, window: str, tok):
    """The configs of one strategy and window: h in {1, 2, 13}, with and without the special ids exempt."""
    for h, exempt in itertools.product((1, 2, 13), ((), tok.special_ids)):
        yield GoldfishConfig(k=3, h=h, strategy=strategy, window=window, exempt_ids=exempt, start_position=1,
                             seed=5, boundary_id=tok.eos_id)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_kernels_equal_the_segment_reference_on_packed_text(corpus, strategy, window, device):
    rows, tok = corpus
    for cfg in boundary_configs(strategy, window, tok):
        expected = reference_goldfish_mask(rows, cfg, step=3)
        assert torch.equal(goldfish_mask(rows.to(device), cfg, step=3).cpu(), expected), cfg
        masked = apply_goldfish(rows.to(device), cfg, step=3).cpu()
        assert torch.equal(masked, torch.where(expected, torch.tensor(-100), rows)), cfg
        plain = reference_goldfish_mask(rows, replace(cfg, boundary_id=None), step=3)
        if strategy == "static":
            assert not torch.equal(expected, plain), cfg  # positions restart after each boundary
        elif strategy == "random" or (cfg.h == 1 and window == "inclusive"):  # no window crosses a boundary
            assert torch.equal(expected, plain), cfg
        else:  # boundaries only keep targets: those whose window crossed one (with h = 1 the lone EOS window)
            assert not (expected & ~plain).any(), cfg
            assert cfg.h == 1 or (plain & ~expected).any(), cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_kernels_equal_the_reference_with_dense_boundaries(strategy, device):
    """Random ids of a vocabulary of 10 (boundary 2: about every 10th label), rows that end inside a CPU chunk, h
    up to past the chunk (300), ignored labels that are not boundaries."""
    gen = torch.Generator().manual_seed(len(strategy))
    labels = torch.randint(0, 10, (3, 1100), generator=gen)
    labels[1, ::5] = -100
    labels[2, :700] = 4  # a long segment: static positions counted across several chunks
    for h, window in itertools.product((3, 13, 300), ("inclusive", "preceding")):
        cfg = GoldfishConfig(k=2, h=h, strategy=strategy, window=window, start_position=2, boundary_id=2)
        expected = reference_goldfish_mask(labels, cfg, step=1)
        assert torch.equal(goldfish_mask(labels.to(device), cfg, step=1).cpu(), expected), (h, window)
        assert torch.equal(apply_goldfish(labels.to(device), cfg, step=1).cpu(),
                           torch.where(expected, torch.tensor(-100), labels)), (h, window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["hash-table", "hash-rolling", "static"])
def test_sft_boundaries_are_read_in_the_window_ids(strategy, device):
    """Packed SFT rows: the boundaries are found in window_ids (the token content), so a prompt's EOS that labels
    mask as -100 still starts a new segment; the kernels equal the reference, and hashing the -100 labels would not
    give this mask."""
    gen = torch.Generator().manual_seed(3)
    window_ids = torch.randint(3, 50, (4, 600), generator=gen)
    window_ids[:, 97::120] = 2  # a document ends every 120 targets
    labels = window_ids.clone()
    labels[:, :35] = -100
    for eos in range(97, 600, 120):  # unsupervised: the end of each document and the prompt after it
        labels[:, eos - 5:eos + 36] = -100
    cfg = GoldfishConfig(k=3, h=13, strategy=strategy, boundary_id=2, exempt_ids=(2,))
    expected = reference_goldfish_mask(labels, cfg, window_ids=window_ids)
    got = goldfish_mask(labels.to(device), cfg, window_ids=window_ids.to(device)).cpu()
    assert torch.equal(got, expected)
    assert torch.equal(apply_goldfish(labels.to(device), cfg, window_ids=window_ids.to(device)).cpu(),
                       torch.where(expected, torch.tensor(-100), labels))
    segments = [reference_goldfish_mask(labels[:, a:b], cfg, window_ids=window_ids[:, a:b])
                for a, b in zip([0, *range(98, 600, 120)], [*range(98, 600, 120), 600])]
    assert torch.equal(expected, torch.cat(segments, dim=1))  # each document masked as if alone
    assert not expected[labels == -100].any() and expected.any()
    assert not torch.equal(expected, reference_goldfish_mask(labels, cfg))


@pytest.mark.parametrize("device", DEVICES)
def test_large_outputs_with_boundaries_equal_the_reference(device):
    """64 x 4096 labels (2 MiB of masked labels: the CPU streams them) with a boundary every 1000 labels, through
    the hash-table pass that writes the outputs itself and then rewrites those whose window crossed a boundary."""
    labels = torch.randint(3, 32000, (64, 4096), generator=torch.Generator().manual_seed(1))
    labels.view(-1)[999::1000] = 2
    cfg = GoldfishConfig(k=4, h=13, boundary_id=2)
    expected = reference_goldfish_mask(labels, cfg)
    assert torch.equal(goldfish_mask(labels.to(device), cfg).cpu(), expected)
    assert torch.equal(apply_goldfish(labels.to(device), cfg).cpu(), torch.where(expected, torch.tensor(-100), labels))


@pytest.mark.parametrize("op", ["goldfish_mask", "apply_goldfish"])
def test_opcheck_with_a_boundary(op):
    """The operators' schema, fake (meta) implementation and autograd registration with boundary_id given."""
    labels = torch.randint(0, 10, (2, 50), generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(getattr(torch.ops.goldfish_ds, op).default,
                          (labels, 4, 4, 13, 0, -100, False, None, torch.tensor([1]), 0, 0, 2))


def test_reference_static_positions_restart_after_each_boundary():
    labels = torch.tensor([5, 2, 5, 5, 2, 2, 5, 5, 5])  # segments [5 2] [5 5 2] [2] [5 5 5]
    cfg = GoldfishConfig(k=2, h=1, strategy="static", boundary_id=2)
    assert reference_goldfish_mask(labels, cfg).int().tolist() == [1, 0, 1, 0, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["hash-table", "hash-rolling", "static"])
def test_a_document_after_a_boundary_is_masked_as_at_a_row_start(corpus, strategy, device):
    """The point of reset: a document gets the same mask wherever packing put it (the official mask depends on
    the previous document's last h - 1 labels and on its offset in the row)."""
    rows, tok = corpus
    cfg = GoldfishConfig(k=4, h=13, strategy=strategy, boundary_id=tok.eos_id)
    official = GoldfishConfig(k=4, h=13, strategy=strategy)
    document = rows[5, :200].to(device)
    official_differs = []
    for row, length in ((7, 37), (9, 301), (11, 101)):  # the document lands at offsets 38, 302, 102 (not 0 mod k)
        before = torch.cat([rows[row][rows[row] != tok.eos_id][:length], torch.tensor([tok.eos_id])]).to(device)
        packed = torch.cat([before, document])
        assert torch.equal(goldfish_mask(packed, cfg)[before.numel():], goldfish_mask(document, cfg))
        official_differs.append(not torch.equal(goldfish_mask(packed, official)[before.numel():],
                                                goldfish_mask(document, official)))
    assert any(official_differs)


@pytest.mark.parametrize("device", DEVICES)
def test_losses_with_boundaries_equal_torch_over_the_reference_mask(corpus, device):
    rows, tok = corpus
    labels = rows[:4].clone()
    labels[0, 40:60] = -100
    cfg = GoldfishConfig(k=3, h=13, exempt_ids=tok.special_ids, boundary_id=tok.eos_id)
    kept = ~reference_goldfish_mask(labels, cfg) & (labels != -100)
    logits = torch.randn(*labels.shape, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    ref_logits = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits[kept], labels[kept])
    ref_loss.backward()
    for loss_fn in (goldfish_cross_entropy, vocab_parallel_goldfish_cross_entropy):  # the latter: one shard
        x = logits.clone().to(device).requires_grad_()
        loss = loss_fn(x, labels.to(device), cfg, in_place=False)
        loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item(), loss_fn.__name__
        torch.testing.assert_close(x.grad.cpu().double(), ref_logits.grad, rtol=1e-5, atol=1e-9)


def test_integrations_apply_the_boundaries(corpus):
    rows, tok = corpus
    cfg = GoldfishConfig(k=3, h=13, boundary_id=tok.eos_id)
    megatron_mask = goldfish_loss_mask(rows, torch.ones(rows.shape), cfg)
    assert torch.equal(megatron_mask == 0, reference_goldfish_mask(rows, cfg))
    targets = causal_lm_targets(rows)
    expected = torch.where(reference_goldfish_mask(targets, cfg), torch.tensor(-100), targets)
    assert torch.equal(goldfish_labels(rows, cfg)[:, 1:], expected[:, :-1])


def test_boundary_id_is_validated():
    for bad in (True, "2", 2.0, 2**63):
        with pytest.raises(ValueError, match="boundary_id must be None .* or a 64-bit integer label id"):
            GoldfishConfig(k=4, h=13, boundary_id=bad)


def test_reset_needs_a_tokenizer_with_eos(tmp_path):
    import sentencepiece as spm

    args = parse_args(["--goldfish_boundaries", "reset"])
    assert goldfish_boundary_id(parse_args([]), None) is None  # none, the default: no boundaries
    with pytest.raises(ValueError, match="--goldfish_boundaries reset .* this run has no tokenizer"):
        goldfish_boundary_id(args, None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(builtin_documents()[:20]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "no_eos"), vocab_size=300,
                                   eos_id=-1, minloglevel=2, num_threads=2)
    no_eos = load_tokenizer(str(tmp_path / "no_eos.model"))
    with pytest.raises(ValueError, match=r"--goldfish_boundaries reset .*no_eos.model has no EOS token.*"
                                         "--goldfish_boundaries none"):
        goldfish_boundary_id(args, no_eos)
    with pytest.raises(SystemExit):
        parse_args(["--goldfish_boundaries", "eos"])  # argparse names the choices


def test_reset_reaches_the_loss_of_a_training_job(tmp_path):
    """A 1-rank DeepSpeed job of 2 steps with --goldfish_boundaries reset: each step's logged drop rate is the
    reference's (boundaries at the tokenizer's EOS, special ids exempt) over the step's rows, not the official's."""
    docs = builtin_documents()
    train = [text for text in docs[8:] if len(text) < 3000]  # short documents: most rows hold a boundary
    tok = load_tokenizer(train_sentencepiece(docs[8:], str(tmp_path / "tok"), vocab_size=2048))
    for name, texts in (("train", train), ("val", docs[:8])):
        write_packed_shards(map(tok.encode_document, texts), str(tmp_path / name), tok.vocab_size)
    model = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**model, "vocab_size": 2048}))
    out = tmp_path / "run"
    launch("python", 1, train_args(tmp_path, out, ds_config(tmp_path / "ds.json", 4, 1), "--max_steps", "2",
                                   "--seq_len", "256", "--eval_interval", "0", "--goldfish_boundaries", "reset"))
    data = PackedTokenDataset(str(tmp_path / "train"), 256)
    rows = list(itertools.islice(iter(ShardedSampler(len(data), micro_batch_size=4, accumulation_steps=1)), 8))
    reset = GoldfishConfig(k=4, h=13, exempt_ids=tok.special_ids, boundary_id=tok.eos_id)
    official = GoldfishConfig(k=4, h=13, exempt_ids=tok.special_ids)
    official_rates = []
    for record, step_rows in zip(records(out), (rows[:4], rows[4:])):
        labels = torch.stack([data[r] for r in step_rows])[:, 1:]
        assert (labels == tok.eos_id).any()  # documents meet in these rows
        assert record["drop_rate"] == reference_goldfish_mask(labels, reset).sum().item() / labels.numel()
        official_rates.append(goldfish_mask(labels, official).sum().item() / labels.numel())
    assert [r["drop_rate"] for r in records(out)] != official_rates

"""Document attention in packed rows (Llama.forward(documents=...), documents_from_eos, --document_attention).

The reference throughout is each document run on its own: a row cut after every EOS input token, each piece a
padding-free row of its own at positions 0, 1, ... The float32 logits of a packed row must equal it within
atol 1e-5 (the measured gap is about 1e-7; plain causal attention misses it by about 0.24).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy
from goldfish_ds.data import (PackedTokenDataset, ShardedSampler, builtin_documents, load_tokenizer,
                              train_sentencepiece, write_packed_shards)
from goldfish_ds.models import (Llama, LlamaConfig, RopeParameters, documents_from_eos, export_hf_state_dict,
                                llama_from_hf, save_hf_llama)
from goldfish_ds.models.rope import rope_inverse_frequencies
from goldfish_ds.parallel import (destroy_model_parallel, gather_from_tensor_parallel_region, initialize_model_parallel,
                                  vocab_parallel_goldfish_cross_entropy)

REPO = Path(__file__).resolve().parents[1]
EOS = 2
ATOL = 1e-5  # float32 logits against the documents run one by one
CFG = GoldfishConfig(k=3, h=2)


def small_config(kv_heads: int = 2, vocab: int = 97) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads,
                       rope_parameters=RopeParameters(rope_theta=500.0))  # positions off by a few show clearly


def packed_rows(eos_positions: list[list[int]], T: int = 24, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    """Rows [B, T] of random non-EOS ids with EOS exactly at the given positions of each row."""
    ids = torch.randint(EOS + 1, vocab, (len(eos_positions), T), generator=torch.Generator().manual_seed(seed))
    for row, positions in enumerate(eos_positions):
        ids[row, positions] = EOS
    return ids


# documents of 7, 1 and 16 tokens; 5, 6, 2, 11; one document (the row starts mid-document); 10 and 14 with the
# row ending in EOS; an EOS first (a 1-token document) then two documents
ROWS = [[6, 7], [4, 10, 12], [], [9, 23], [0, 13]]


def split_after_eos(row: torch.Tensor) -> list[slice]:
    """The documents of one row as slices, cut after every EOS (written out plainly, as the reference)."""
    pieces, start = [], 0
    for t, token in enumerate(row.tolist()):
        if token == EOS:
            pieces.append(slice(start, t + 1))
            start = t + 1
    if start < len(row):
        pieces.append(slice(start, len(row)))
    return pieces


def one_by_one(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] with every document of every row run as a row of its own at positions 0, 1, ..."""
    return torch.stack([torch.cat([model(row[None, piece])[0] for piece in split_after_eos(row)]) for row in ids])


def test_documents_from_eos_starts_a_document_after_each_eos():
    a, b, c, d = 11, 12, 13, 14
    ids = torch.tensor([[a, b, EOS, c, EOS, d],      # three documents
                        [a, b, c, d, a, b],          # mid-document, no EOS: one document
                        [a, EOS, b, c, d, EOS],      # ends in EOS: nothing starts after the row
                        [EOS, EOS, a, EOS, b, c]])   # EOS first, then a document of one EOS token
    expected = torch.tensor([[0, 0, 0, 1, 1, 2],
                             [0, 0, 0, 0, 0, 0],
                             [0, 0, 1, 1, 1, 1],
                             [0, 1, 2, 2, 3, 3]])
    documents = documents_from_eos(ids, EOS)
    assert documents.dtype == torch.int64 and torch.equal(documents, expected)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_packed_logits_equal_each_document_on_its_own(kv_heads):
    model = Llama(small_config(kv_heads), seed=3).eval()
    ids = packed_rows(ROWS)
    with torch.no_grad():
        packed = model(ids, documents=documents_from_eos(ids, EOS))
        reference = one_by_one(model, ids)
        causal = model(ids)
    torch.testing.assert_close(packed, reference, rtol=0, atol=ATOL)
    assert (causal - reference).abs().amax() > 1000 * ATOL  # the check can fail: plain attention leaks
    torch.testing.assert_close(causal[2], reference[2], rtol=0, atol=ATOL)  # the row without a boundary


def test_given_positions_are_used_with_documents():
    """positions and documents together: the mask from documents, the positions as given (here 0..T-1)."""
    model = Llama(small_config(), seed=4).eval()
    ids = packed_rows(ROWS[:2])
    T = ids.shape[1]
    with torch.no_grad():
        packed = model(ids, positions=torch.arange(T), documents=documents_from_eos(ids, EOS))
        reference = torch.stack([torch.cat([model(row[None, s], positions=torch.arange(s.start, s.stop))[0]
                                            for s in split_after_eos(row)]) for row in ids])
    torch.testing.assert_close(packed, reference, rtol=0, atol=ATOL)


def test_bf16_packed_logits_follow_the_float32_reference():
    model = Llama(small_config(), seed=5).eval()
    ids = packed_rows(ROWS)
    with torch.no_grad():
        reference = one_by_one(model, ids)
        packed = model.to(torch.bfloat16)(ids, documents=documents_from_eos(ids, EOS)).float()
    assert (packed - reference).abs().amax() < 0.01  # measured 2.3e-3, as each document alone in bf16; plain: 0.24


def todays_causal_forward(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """The forward as it was before documents existed: one [T] rotary table, is_causal attention."""
    T = ids.shape[1]
    cfg = model.cfg
    freqs = torch.arange(T).float()[:, None] * rope_inverse_frequencies(cfg.rope_parameters, cfg.head_dim)[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    half = cfg.head_dim // 2

    def rotate(x):
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    x = model.embed_tokens(ids)
    for layer in model.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_proj(h).view(*ids.shape, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(*ids.shape, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(*ids.shape, attn.kv_heads, attn.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True,
                                           enable_gqa=attn.heads != attn.kv_heads)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(*ids.shape, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


def test_without_a_boundary_the_forward_is_bit_identical_to_plain_causal():
    model = Llama(small_config(), seed=6).eval()
    ids = packed_rows([[], []])
    with torch.no_grad():
        expected = todays_causal_forward(model, ids)
        assert torch.equal(model(ids), expected)
        assert torch.equal(model(ids, documents=torch.full_like(ids, 7)), expected)  # no boundary: same path


def test_no_gradient_crosses_a_document_boundary():
    """d(loss of document 1) / d(input embeddings) is exactly 0 on documents 0 and 2, and not on document 1; the
    parameter gradients are the same with activation checkpointing."""
    ids = packed_rows([[6, 13]])  # documents [0, 7), [7, 14), [14, 24)
    grads = {}
    for checkpointing in (False, True):
        model = Llama(small_config(), seed=7, activation_checkpointing=checkpointing).train()
        for documents in (documents_from_eos(ids, EOS), None):
            embeddings = []
            hook = model.embed_tokens.register_forward_hook(lambda module, inputs, out: embeddings.append(out))
            logits = model(ids, documents=documents)
            hook.remove()
            embeddings[0].retain_grad()
            model.zero_grad()
            goldfish_cross_entropy(logits[:, 7:14], ids[:, 8:15], None, in_place=False).backward()
            per_position = embeddings[0].grad[0].abs().sum(-1)
            if documents is None:
                assert per_position[:7].amin() > 0  # plain attention: document 1 reads document 0
            else:
                assert torch.equal(per_position[:7], torch.zeros(7)) and torch.equal(per_position[14:], torch.zeros(10))
                assert per_position[7:14].amin() > 0
                grads[checkpointing] = export_hf_state_dict(model, grads=True)
    assert all(torch.equal(grads[False][k], grads[True][k]) for k in grads[False])


def body_tensor_parallel(rank, world, path):
    """TP=2 with documents against the single-process model: logits within 1e-5, loss and gradients within 1e-5."""
    ids = packed_rows(ROWS, vocab=97, seed=8)
    documents = documents_from_eos(ids, EOS)
    single = llama_from_hf(path).train()
    single_logits = single(ids, documents=documents)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    ref_loss = goldfish_cross_entropy(single_logits, labels, CFG, in_place=False)
    ref_loss.backward()
    ref_grads = export_hf_state_dict(single, grads=True)
    initialize_model_parallel(world)
    try:
        model = llama_from_hf(path).train()
        local = model(ids, documents=documents)
        logits = gather_from_tensor_parallel_region(local.detach(), model.embed_tokens.group)
        loss = vocab_parallel_goldfish_cross_entropy(local, labels, CFG, in_place=False)
        loss.backward()
        grads = export_hf_state_dict(model, grads=True)
    finally:
        destroy_model_parallel()
    torch.testing.assert_close(logits[..., :97], single_logits.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for key, expected in ref_grads.items():
        torch.testing.assert_close(grads[key], expected, rtol=1e-5, atol=1e-7, msg=key)


def test_tensor_parallel_document_attention_matches_one_rank(tmp_path):
    save_hf_llama(Llama(small_config(kv_heads=2), seed=9), str(tmp_path))
    run_distributed(body_tensor_parallel, 2, str(tmp_path))


# ---- the pipeline: scripts/pretrain.py --document_attention ------------------------------------------------------

MICRO_BATCH, SEQ_LEN, EVAL_ROWS = 4, 64, 6


@pytest.fixture(scope="module")
def document_attention_job(tmp_path_factory) -> Path:
    """A 2-step, 1-rank ZeRO-3 job with --document_attention (and activation checkpointing) from a saved random
    Llama, on short documents (paragraphs of the built-in corpus: two or more per row); returns its directory."""
    root = tmp_path_factory.mktemp("job")
    paragraphs = [p.strip() for doc in builtin_documents() for p in doc.split("\n\n") if 20 <= len(p.strip()) <= 120]
    tok = load_tokenizer(train_sentencepiece(paragraphs, str(root / "tok"), vocab_size=512))
    assert tok.eos_id == EOS
    for name, texts in (("train", paragraphs[40:]), ("val", paragraphs[:40])):
        write_packed_shards(([tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts), str(root / name), 512)
    # weights drawn 10x larger than usual: the logits then depend on the context (at 0.02 they are near uniform)
    save_hf_llama(Llama(replace(small_config(vocab=512), initializer_range=0.2), seed=10), str(root / "init"))
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3_cpu.json").read_text())
    (root / "ds.json").write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": MICRO_BATCH}))
    command = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--document_attention",
               "--activation_checkpointing",  # the mask through DeepSpeed's hooks and torch's recomputation
               "--init_from_hf", str(root / "init"), "--deepspeed_config", str(root / "ds.json"),
               "--data", str(root / "train"), "--val_data", str(root / "val"), "--tokenizer", str(root / "tok.model"),
               "--seq_len", str(SEQ_LEN), "--max_steps", "2", "--eval_interval", "2", "--eval_rows", str(EVAL_ROWS),
               "--out_dir", str(root / "out"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def rows_as_batch(rows: list) -> tuple:
    """The trainer's inputs and labels of packed rows (PADDING: no target)."""
    tokens = torch.stack(rows)
    return tokens[:, :-1].clamp_min(0), torch.where(tokens[:, 1:] < 0, -100, tokens[:, 1:])


def test_pretrain_with_document_attention_trains_and_validates_each_document_alone(document_attention_job):
    """Step 1's goldfish loss (the initial weights) and the step-2 validation loss (the exported final weights)
    equal those of every document run on its own within rel 1e-6 (measured: 0 and 7e-8); plain attention is
    off by 8e-3 and 1.3e-3."""
    root = document_attention_job
    records = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    first_train = next(r for r in records if r["kind"] == "train" and r["step"] == 1)
    val = next(r for r in records if r["kind"] == "val" and r["step"] == 2)
    tok = load_tokenizer(str(root / "tok.model"))
    goldfish = GoldfishConfig(k=4, h=13, exempt_ids=tok.special_ids)  # the job's defaults

    train_set = PackedTokenDataset(str(root / "train"), SEQ_LEN)
    sampler = iter(ShardedSampler(len(train_set), 0, 1, seed=0, micro_batch_size=MICRO_BATCH, accumulation_steps=1))
    inputs, labels = rows_as_batch([train_set[next(sampler)] for _ in range(MICRO_BATCH)])
    assert inputs.eq(EOS).sum(1).amin() >= 1  # every row holds two documents or more
    initial = llama_from_hf(str(root / "init")).eval()
    with torch.no_grad():
        expected = goldfish_cross_entropy(one_by_one(initial, inputs), labels, goldfish).item()
        plain = goldfish_cross_entropy(initial(inputs), labels, goldfish).item()
    assert first_train["loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(plain - expected) > 100 * 1e-6 * expected

    val_set = PackedTokenDataset(str(root / "val"), SEQ_LEN)
    inputs, labels = rows_as_batch([val_set[row] for row in range(EVAL_ROWS)])
    final = llama_from_hf(str(root / "out" / "hf")).eval()
    with torch.no_grad():
        expected = goldfish_cross_entropy(one_by_one(final, inputs), labels, None, reduction="sum").item()
        plain = goldfish_cross_entropy(final(inputs), labels, None, reduction="sum").item()
    targets = labels.ne(-100).sum().item()
    assert val["val_loss"] == pytest.approx(expected / targets, rel=1e-6)
    assert abs(plain - expected) > 100 * 1e-6 * expected
